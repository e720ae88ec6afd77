"""Evaluation of restored checkpoints on the test split, and the side-by-side report.

  python -m l2vit_jax.main --config=configs/evaluate.py --workdir=runs/report \
      --config.checkpoints=pretrained=runs/finetune,scratch=runs/scratch
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from l2vit_jax import checkpointing, sharding
from l2vit_jax.data import pipeline, sources, split
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


def predict(model: nnx.Module, source, *, pixel_scale: float, batch_size: int, mesh) -> dict:
  """Class-1 probabilities and standardised mass predictions for every record of ``source``."""
  model.eval()
  graphdef, state = nnx.split(model)
  state = sharding.replicate(state, mesh)

  @jax.jit
  def forward(state, images):
    logits, mass_z = nnx.merge(graphdef, state)(images)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1], mass_z[:, 0].astype(jnp.float32)

  outputs = {"index": [], "prob": [], "mass_z": [], "mask": []}
  per_process = batch_size // jax.process_count()
  dataset = pipeline.make_eval_dataset(source, batch_size=per_process, pixel_scale=pixel_scale,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  for batch in dataset:
    device = sharding.global_batch({k: batch[k] for k in ("image", "index", "mask")}, mesh)
    prob, mass_z = forward(state, device["image"])
    for key, value in (("index", device["index"]), ("prob", prob), ("mass_z", mass_z),
                       ("mask", device["mask"])):
      outputs[key].append(sharding.to_host(value))
  out = {k: np.concatenate(v) for k, v in outputs.items()}
  keep = out.pop("mask") == 1
  order = np.argsort(out["index"][keep], kind="stable")
  return {k: v[keep][order] for k, v in out.items()}


def evaluate_checkpoint(name: str, directory: str, config, out_dir: str, mesh) -> tuple[dict, dict]:
  model, meta = checkpointing.restore_model_checkpoint(directory)
  path = config.data.labelled_path
  sources.validate_file(path, labelled=True, image_size=meta["model_config"]["img_size"])
  labels = sources.read_labels(path)
  indices = split.stratified_split(labels["label"], seed=config.data.split_seed)[config.split] \
      if config.split != "all" else np.arange(len(labels["label"]))
  if meta.get("mass_mean") is None:
    raise checkpointing.CheckpointMismatchError(
        f"{directory}: checkpoint has no mass standardisation (a SimCLR backbone?); evaluate a "
        "finetuned checkpoint")
  source = sources.open_source(path, labelled=True, indices=indices, labels=labels)
  predictions = predict(model, source, pixel_scale=meta.get("pixel_scale", 1.0),
                        batch_size=config.eval_batch_size, mesh=mesh)
  mass_pred = predictions["mass_z"] * meta["mass_std"] + meta["mass_mean"]
  index = predictions["index"]
  label, mass_true = labels["label"][index], labels["mass"][index]
  jsonl = os.path.join(directory, "metrics.jsonl")
  metrics = {}
  if jax.process_index() == 0:
    metrics = report.write_model_outputs(
        out_dir, name, index=index, labels=label, probs=predictions["prob"], mass_true=mass_true,
        mass_pred=mass_pred, metrics_jsonl=jsonl if os.path.exists(jsonl) else None,
        bootstrap_samples=config.bootstrap_samples)
    logging.info("%s (%s): accuracy %.4f, ROC-AUC %.4f, mass MAE %.2f GeV", name, directory,
                 metrics["accuracy"], metrics["roc_auc"], metrics["mass_mae"])
  return metrics, {"labels": label, "probs": predictions["prob"], "jsonl": jsonl}


def evaluate_checkpoints(config, workdir: str) -> dict:
  """Evaluates every checkpoint of ``config.checkpoints`` and writes ``workdir/report.md``."""
  mesh = sharding.make_mesh()
  os.makedirs(workdir, exist_ok=True)
  results, curves, logs = {}, {}, {}
  for name, directory in parse_checkpoints(config.checkpoints).items():
    results[name], extra = evaluate_checkpoint(name, directory, config, workdir, mesh)
    curves[name] = (extra["labels"], extra["probs"])
    if os.path.exists(extra["jsonl"]):
      logs[name] = extra["jsonl"]
  if jax.process_index() == 0:
    path = report.write_report(workdir, results, predictions=curves, training_logs=logs or None,
                               title=config.report_title, notes=config.report_notes)
    logging.info("Report written to %s", path)
  return results
