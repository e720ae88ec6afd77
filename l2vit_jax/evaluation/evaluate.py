"""Evaluation of restored checkpoints on the test split, and the side-by-side report.

  python -m l2vit_jax.main --config=configs/evaluate.py --workdir=runs/report \
      --config.checkpoints=pretrained=runs/finetune,scratch=runs/scratch

A finetuned checkpoint records the labelled file and split it trained with (``data_split``), and a
``config.split`` that differs from the model's own (another ``data.split_seed`` or file) is refused
before anything is written (``check_model_split``), since it could score jets the model trained on.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io
from l2vit_jax.evaluation import inference, probes
from l2vit_jax.runtime import console, paths, sharding
from l2vit_jax.baselines import bdt
from l2vit_jax.data import sources, split
from l2vit_jax.evaluation import metrics as metrics_lib
from l2vit_jax.evaluation import report


def parse_checkpoints(spec: str) -> dict[str, str]:
  """'name=DIR,name2=DIR2' → {name: DIR}; a bare 'DIR' is named after its last path component."""
  named = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, _, directory = item.rpartition("=")
    name = name or os.path.basename(os.path.normpath(directory))
    if name in named:
      raise ValueError(f"config.checkpoints names {name!r} twice")
    named[name] = directory
  if not named:
    raise ValueError("config.checkpoints is empty; give name=WORKDIR pairs separated by commas")
  return named


def predictor(model: nnx.Module, meta: dict, *, mesh) -> Callable[..., dict]:
  """``run(source, *, batch_size)``: class-1 probabilities and masses (GeV) of a finetuned ``model``
  for every record of ``source``, its forward pass jitted once for every source it is given.

  ``meta`` is the checkpoint's: its pixel scale is applied as in training, and its train-split mass
  standardisation is undone.
  """
  model.eval()
  graphdef, state = nnx.split(model)
  state = sharding.replicate(state, mesh)

  @jax.jit
  def forward(state, images):
    logits, mass_z = nnx.merge(graphdef, state)(images)
    return {
      "prob": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1],
      "mass_z": mass_z[:, 0].astype(jnp.float32),
    }

  def run(source, *, batch_size: int) -> dict:
    out = inference.map_source(
      lambda images: forward(state, images),
      source,
      pixel_scale=meta.get("pixel_scale", 1.0),
      batch_size=batch_size,
      mesh=mesh,
    )
    return {
      "index": out["index"],
      "prob": out["prob"],
      "mass_pred": split.destandardise_mass(out.pop("mass_z"), meta["mass_mean"], meta["mass_std"]),
    }

  return run


def predict(model: nnx.Module, source, meta: dict, *, batch_size: int, mesh) -> dict:
  """``predictor``'s predictions for one ``source``."""
  return predictor(model, meta, mesh=mesh)(source, batch_size=batch_size)


def predict_checkpoint(
  directory: str, labelled: sources.LabelledFile, indices: np.ndarray, *, batch_size: int, mesh
) -> dict:
  """``predict`` of the finetuned checkpoint in ``directory`` on the labelled jets ``indices``."""
  model, meta = model_io.restore_model_checkpoint(directory)
  labelled.check_image_size(meta["model_config"], directory)
  return predict(model, labelled.source(indices), meta, batch_size=batch_size, mesh=mesh)


def evaluated_indices(config, labelled: sources.LabelledFile) -> np.ndarray:
  """Indices into the labelled file of ``config.split`` ('all': every jet)."""
  if config.split == "all":
    return np.arange(len(labelled.labels["label"]))
  return labelled.parts[config.split]


def _labelled_file(config) -> sources.LabelledFile:
  return sources.open_labelled(config.data.labelled_path, split_seed=config.data.split_seed)


def _recorded_split(directory: str, meta: dict) -> dict | None:
  """The checkpoint's ``data_split`` (``split.split_fingerprint``), None where it has none.

  Raises:
    errors.CheckpointDamagedError: a ``data_split`` of another shape (a damaged or edited meta), which
      could vouch for no split.
  """
  recorded = meta.get("data_split")
  if recorded is None:
    return None
  fields = ("num_jets", "image_size", "labels_sha256", "split_seed", "numpy")
  if not (
    isinstance(recorded, dict)
    and all(field in recorded for field in fields)
    and isinstance(recorded.get("indices_sha256"), dict)
    and all(isinstance(recorded["indices_sha256"].get(name), str) for name in split.SPLIT_NAMES)
  ):
    raise errors.CheckpointDamagedError(
      f"{directory}: damaged checkpoint: meta 'data_split' is {str(recorded)[:60]!r}, expected the "
      f"object of split.split_fingerprint ({', '.join(fields)}, indices_sha256)"
    )
  return recorded


def check_model_split(directory: str, meta: dict, labelled: sources.LabelledFile, config) -> None:
  """Refuses to score a model on a ``config.split`` other than the same-named split it was trained
  with, which could hold jets it trained on (another ``data.split_seed``, another file, or a NumPy that
  splits differently). Called before anything is written.

  ``config.split='all'`` is not checked: it asks for every jet, the trained-on ones included. A
  finetuned checkpoint without a recorded split (saved before checkpoints recorded it, or imported
  from PyTorch) is evaluated with a warning; a pretraining one trained on no labelled split.

  Raises:
    errors.ConfigError: another ``data.split_seed`` than the model's, naming both; an unknown
      ``config.split``.
    errors.DataError: another labelled file, or the same seed splitting differently (NumPy).
    errors.CheckpointDamagedError: the recorded split is not a fingerprint.
  """
  name = config.split
  if name not in (*split.SPLIT_NAMES, "all"):
    raise errors.ConfigError(f"config.split={name!r}: expected one of {', '.join(split.SPLIT_NAMES)} or all")
  recorded = _recorded_split(directory, meta)
  if name == "all":
    return
  if recorded is None:
    if meta.get("mass_mean") is not None:
      logging.warning(
        "%s: its checkpoint records no data split (saved before checkpoints recorded "
        "it, or imported): cannot check that config.split=%r holds no jet it trained on",
        directory,
        name,
      )
    return
  current = labelled.fingerprint()
  if any(recorded[key] != current[key] for key in ("num_jets", "labels_sha256")):
    raise errors.DataError(
      f"{labelled.path}: not the labelled file the model of {directory} was trained on "
      f"({current['num_jets']} jets, labels {current['labels_sha256'][:19]}…; it trained on "
      f"{recorded['num_jets']} jets, labels {str(recorded['labels_sha256'])[:19]}…), so its {name} split "
      "may hold jets the model trained on; evaluate on that file, or on every jet of an independent "
      "file with --config.split=all"
    )
  if recorded["indices_sha256"][name] == current["indices_sha256"][name]:
    return
  if recorded["split_seed"] != labelled.split_seed:
    raise errors.ConfigError(
      f"config.data.split_seed={labelled.split_seed} gives another {name} split than the model of "
      f"{directory} was trained with (seed {recorded['split_seed']}); evaluate with "
      f"--config.data.split_seed={recorded['split_seed']}"
    )
  raise errors.DataError(
    f"{labelled.path}: data.split_seed={labelled.split_seed} gives another {name} split under NumPy "
    f"{current['numpy']} than the model of {directory} was trained with under NumPy {recorded['numpy']} "
    "(numpy.random.Generator changed its stream?); evaluate under NumPy "
    f"{recorded['numpy']}, whose split it was"
  )


def _training_log(directory: str) -> str | None:
  jsonl = paths.join(directory, "metrics.jsonl")
  return jsonl if paths.exists(jsonl) else None


def evaluate_checkpoint(name: str, directory: str, config, out_dir: str, mesh) -> tuple[dict, dict]:
  labelled = _labelled_file(config)
  predictions = predict_checkpoint(
    directory, labelled, evaluated_indices(config, labelled), batch_size=config.eval_batch_size, mesh=mesh
  )
  index = predictions["index"]
  label, mass_true = labelled.labels["label"][index], labelled.labels["mass"][index]
  jsonl = _training_log(directory)
  metrics = {}
  if jax.process_index() == 0:
    metrics = report.write_model_outputs(
      out_dir,
      name,
      index=index,
      labels=label,
      probs=predictions["prob"],
      mass_true=mass_true,
      mass_pred=predictions["mass_pred"],
      metrics_jsonl=jsonl,
      bootstrap_samples=config.bootstrap_samples,
    )
    logging.info(
      "%s (%s): accuracy %.4f, ROC-AUC %.4f, mass MAE %.2f GeV",
      name,
      directory,
      metrics["accuracy"],
      metrics["roc_auc"],
      metrics["mass_mae"],
    )
  return metrics, {"labels": label, "probs": predictions["prob"], "jsonl": jsonl}


def _fitting_splits(config) -> tuple[sources.LabelledFile, dict[str, np.ndarray]]:
  """The labelled file, and its 'train'/'val' splits with 'test' = ``config.split``.

  For the models fitted here (probes, the physics baseline) rather than restored from a checkpoint.
  """
  labelled = _labelled_file(config)
  return labelled, dict(labelled.parts, test=evaluated_indices(config, labelled))


def evaluate_probes(name: str, directory: str, config, out_dir: str, mesh) -> tuple[dict, dict]:
  """Rows ``<name>_linear_probe`` and ``<name>_knn``: probes on the frozen backbone (``evaluation.probes``).

  Both are fitted on the train split (the linear probe's ridge strength chosen on the validation split)
  and scored on ``config.split``; the kNN row's mass is the neighbours' weighted mean mass.
  """
  labelled, splits = _fitting_splits(config)
  outputs = probes.probe_checkpoint(
    directory, labelled, splits, batch_size=config.eval_batch_size, mesh=mesh, k=config.get("probe_k", 20)
  )
  index = outputs["index"]
  label, mass_true = labelled.labels["label"][index], labelled.labels["mass"][index]
  jsonl = _training_log(directory)
  rows = {
    f"{name}_linear_probe": (outputs["prob"], outputs["mass_pred"], jsonl),
    f"{name}_knn": (outputs["knn_prob"], outputs["knn_mass_pred"], None),
  }
  results = {}
  for row, (prob, mass_pred, row_log) in rows.items():
    if jax.process_index() == 0:
      results[row] = report.write_model_outputs(
        out_dir,
        row,
        index=index,
        labels=label,
        probs=prob,
        mass_true=mass_true,
        mass_pred=mass_pred,
        metrics_jsonl=row_log,
        bootstrap_samples=config.bootstrap_samples,
      )
  return results, {"curves": {row: (label, prob) for row, (prob, _, _) in rows.items()}, "jsonl": jsonl}


def evaluate_physics_baseline(config, out_dir: str) -> tuple[dict, tuple]:
  """Row ``physics_bdt``: boosted trees on jet observables (``baselines/bdt.py``).

  Fitted on the train split (iterations chosen on the validation split), scored on ``config.split``;
  numpy and scikit-learn only, so process 0 alone runs it. The observables are cached in
  ``out_dir/physics_bdt/``, so evaluating again does not re-read the images.
  """
  labelled, splits = _fitting_splits(config)
  labels = labelled.labels
  predictions = bdt.physics_baseline_predictions(
    labelled.path, splits, seed=config.seed, cache_dir=paths.join(out_dir, bdt.BASELINE_NAME)
  )
  index = predictions["index"]
  label = labels["label"][index]
  metrics = report.write_model_outputs(
    out_dir,
    bdt.BASELINE_NAME,
    index=index,
    labels=label,
    probs=predictions["prob"],
    mass_true=labels["mass"][index],
    mass_pred=predictions["mass_pred"],
    bootstrap_samples=config.bootstrap_samples,
  )
  logging.info(
    "%s: accuracy %.4f, ROC-AUC %.4f, mass MAE %.2f GeV",
    bdt.BASELINE_NAME,
    metrics["accuracy"],
    metrics["roc_auc"],
    metrics["mass_mae"],
  )
  return metrics, (label, predictions["prob"])


def class_mean_images(
  labelled: sources.LabelledFile, indices: np.ndarray, *, progress: bool = True
) -> metrics_lib.ClassMeanImages:
  """Per-class sums of the raw images of the jets ``indices``, read in one streamed pass.

  One record at a time, in index order, into two float64 sums: memory stays two images whatever the
  split's size, and the same file gives bit-identical means (the report is compared byte for byte after
  an interrupted run). Raw pixel values: no pixel scale, which is a training choice, not the data's.
  """
  source = labelled.source(np.sort(np.asarray(indices)))
  accumulator = metrics_lib.ClassMeanImages()
  with console.ProgressBar(len(source), "mean images", "jet", enabled=progress) as bar:
    for position in range(len(source)):
      record = source[position]
      accumulator.add(record["image"], record["label"])
      bar.update(1)
  logging.info(
    "Mean images of %d evaluated jets (%d top, %d QCD)",
    len(source),
    accumulator.counts[1],
    accumulator.counts[0],
  )
  return accumulator


def _is_pretraining_checkpoint(meta: dict) -> bool:
  """No mass standardisation in its meta: a SimCLR/MAE backbone, which only probes can evaluate."""
  return meta.get("mass_mean") is None


def evaluate_checkpoints(config, workdir: str) -> dict:
  """Evaluates every checkpoint of ``config.checkpoints`` and writes ``workdir/report.md``.

  Every row (checkpoints, probe rows, ``physics_bdt``) gets the same metrics and plots
  (``report.write_model_outputs``, physics checks included); the mean image per class and channel of
  the evaluated split is a property of the data, computed once on process 0 for the report.
  """
  mesh = sharding.make_mesh()
  results, curves, logs = {}, {}, {}
  probe = config.get("probe", False)
  baseline = config.get("physics_baseline", False)
  checkpoints = parse_checkpoints(config.checkpoints)
  if baseline and bdt.BASELINE_NAME in checkpoints:
    raise ValueError(
      f"config.checkpoints: {bdt.BASELINE_NAME!r} is the physics baseline's row; name the "
      "checkpoint differently or set --config.physics_baseline=False"
    )
  metas = {name: model_io.read_model_meta(directory) for name, directory in checkpoints.items()}
  pretraining = {name: _is_pretraining_checkpoint(meta) for name, meta in metas.items()}
  labelled = _labelled_file(config)
  for name, directory in checkpoints.items():  # refused before any evaluation runs or file is written
    if pretraining[name] and not probe:
      raise errors.CheckpointMismatchError(
        f"{directory}: a pretraining (SimCLR/MAE) checkpoint has no class or mass head; probe its "
        "frozen features with --config.probe=True, or evaluate a finetuned workdir"
      )
    check_model_split(directory, metas[name], labelled, config)
  paths.makedirs(workdir)
  for name, directory in checkpoints.items():
    if not pretraining[name]:
      results[name], extra = evaluate_checkpoint(name, directory, config, workdir, mesh)
      curves[name] = (extra["labels"], extra["probs"])
      if extra["jsonl"]:
        logs[name] = extra["jsonl"]
    if probe:
      probe_results, extra = evaluate_probes(name, directory, config, workdir, mesh)
      results.update(probe_results)
      curves.update(extra["curves"])
      if extra["jsonl"]:
        logs[name] = extra["jsonl"]
  notes = config.report_notes
  if baseline and jax.process_index() == 0:
    results[bdt.BASELINE_NAME], curves[bdt.BASELINE_NAME] = evaluate_physics_baseline(config, workdir)
    notes = f"{notes}\n\n## Physics baseline\n\n{bdt.REPORT_DESCRIPTION}"
  if jax.process_index() == 0:
    mean_images = class_mean_images(labelled, evaluated_indices(config, labelled))
    path = report.write_report(
      workdir,
      results,
      predictions=curves,
      training_logs=logs or None,
      mean_images=mean_images,
      title=config.report_title,
      notes=notes,
    )
    logging.info("Report written to %s", path)
  return results
