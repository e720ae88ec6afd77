"""The label-efficiency study: does self-supervised pretraining beat training from scratch, and where?

  python -m l2vit_jax.main --config=configs/study.py[:quick] --workdir=runs/study

For every seed, SimCLR and MAE pretraining run once (``WORKDIR/seed{s}/pretrain_{simclr,mae}``) and are
shared by every label count. Then, for each label count n (a nested stratified subset of the train
split, ``data.split.nested_subsets``; validation and test stay fixed) and each arm, one cell trains or
fits in ``WORKDIR/seed{s}/n{n}/{arm}/`` and writes ``result.json`` (test metrics) last, atomically. A
rerun skips cells with a ``result.json``; a cell cut short resumes through the normal workdir resume.
At the end: ``study.json`` (every cell, and mean/std over seeds per arm and count), ``study.png`` and
``report.md``.

Only a finished cell is recorded: a training that pauses (``stop_after_steps``; a preemption raises
instead) writes no ``result.json`` and pauses the whole study there, since later cells may start from
it (``stages.finished``, as in the quickstart); the rerun resumes that cell. A ``result.json`` of a
half-trained cell, as older versions wrote, is not taken for done either.

The labelled subset depends on the study seed, so the spread over seeds includes which jets happen to
be labelled, as it would for a user who labels n jets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time

import jax
import numpy as np
from absl import logging

from l2vit_jax import errors
from l2vit_jax.data import sources, split
from l2vit_jax.evaluation import evaluate, metrics
from l2vit_jax.experiments import stages, study_report
from l2vit_jax.runtime import compilation, paths, sharding

ARMS = ("scratch", "finetune_simclr", "finetune_mae", "probe_simclr", "probe_mae", "physics_bdt")
# The pretraining each arm needs (None: none).
PRETRAINING = {
  "scratch": None,
  "finetune_simclr": "simclr",
  "finetune_mae": "mae",
  "probe_simclr": "simclr",
  "probe_mae": "mae",
  "physics_bdt": None,
}
# Arms built on modules with their own dependencies (scikit-learn for the trees).
OPTIONAL_ARMS = ("probe_simclr", "probe_mae", "physics_bdt")
RESULT_FILE = "result.json"
COMMAND = "python -m l2vit_jax.main --config=configs/study.py{variant} --workdir={workdir}"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One unit of work: a pretraining run (count None) or one arm at one label count, for one seed."""

  arm: str  # an entry of ARMS, or 'pretrain_simclr' / 'pretrain_mae'
  seed: int
  count: int | None
  directory: str

  def describe(self) -> str:
    return f"{self.arm}, seed {self.seed}" + ("" if self.count is None else f", n={self.count}")


# --- configuration ----------------------------------------------------------------------------------


def selected_arms(config) -> tuple[str, ...]:
  """``config.study.arms`` ('scratch,physics_bdt') as a tuple, every name checked against ARMS."""
  arms = tuple(a.strip() for a in str(config.study.arms).split(",") if a.strip())
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise errors.ConfigError(
      f"config.study.arms={config.study.arms!r}: expected a comma-separated subset of {', '.join(ARMS)}"
    )
  return arms


def cell_schedule(recipe, count: int, devices: int, min_steps: int) -> dict:
  """Batch size and passes per epoch of a finetuning cell on ``count`` labelled jets.

  The batch is min(recipe batch, count), rounded down to a multiple of the device count. Small subsets
  make short epochs; rather than more epochs (each validates and checkpoints), an epoch repeats the
  subset so that the run takes at least ``min_steps`` optimiser steps over the recipe's epochs, with
  its warmup and early-stopping patience unchanged.
  """
  batch = max(min(recipe.batch_size, count) // devices * devices, devices)
  steps_per_pass = max(count // batch, 1)
  repeats = max(1, int(math.ceil(min_steps / (recipe.num_epochs * steps_per_pass))))
  return {"batch_size": batch, "data.train_repeats": repeats}


# --- data -------------------------------------------------------------------------------------------


def _classes_drawn(labels: np.ndarray, train: np.ndarray, count: int, seed: int) -> int:
  """How many classes the first ``count`` jets of seed ``seed``'s labelled subset contain."""
  if count < 1:
    return 0
  return len(np.unique(labels[split.nested_subsets(labels, train, [count], seed=seed)[count]]))


def check_inputs(config, files: dict[str, str], arms: tuple[str, ...]) -> dict:
  """Validates the files and the label counts before anything trains.

  Returns:
    ``labelled`` (the labelled file with its labels and fixed split) and the resolved label ``counts``.

  Raises:
    errors.DataError: one line naming the file and the label count it cannot serve.
  """
  path = files["labelled"]
  labelled = sources.open_labelled(path, split_seed=config.data.split_seed, image_size=config.model.img_size)
  if any(PRETRAINING[arm] for arm in arms):
    sources.validate_file(
      files["unlabelled"],
      labelled=False,
      image_size=config.model.img_size,
      min_examples=max(config.pretrain_simclr.batch_size, config.pretrain_mae.batch_size),
    )
  labels, parts = labelled.labels, labelled.parts
  try:
    counts = split.resolve_label_counts(config.study.label_counts, len(parts["train"]))
  except ValueError as error:
    raise errors.ConfigError(
      f"config.study.label_counts={tuple(config.study.label_counts)}: {error}"
    ) from None
  devices, num_classes = jax.device_count(), len(np.unique(labels["label"]))
  smallest, largest = counts[0], counts[-1]
  if largest > len(parts["train"]):
    raise errors.DataError(
      f"{path}: label count {largest} is larger than the train split of this file "
      f"({len(parts['train'])} jets); use a larger file or smaller label counts"
    )
  for seed in _seeds(config):
    present = _classes_drawn(labels["label"], parts["train"], smallest, seed)
    if present < num_classes or smallest < devices:
      raise errors.DataError(
        f"{path}: label count {smallest} (of a {len(parts['train'])}-jet train split) is too small: it "
        f"needs at least one jet of each of the {num_classes} classes and one batch of {devices} "
        f"(seed {seed} draws {present} class(es)); use a larger file or larger label counts"
      )
  return {"labelled": labelled, "counts": counts}


def _seeds(config) -> list[int]:
  return [int(config.study.first_seed) + i for i in range(int(config.study.num_seeds))]


# --- cells ------------------------------------------------------------------------------------------


def pretrain_dir(workdir: str, seed: int, method: str) -> str:
  return paths.join(workdir, f"seed{seed}", f"pretrain_{method}")


def plan_cells(config, workdir: str, arms: tuple[str, ...], counts: list[int]) -> list[Cell]:
  """Every cell in running order: per seed, its pretraining first, then each count and arm."""
  cells = []
  for seed in _seeds(config):
    for method in ("simclr", "mae"):
      if any(PRETRAINING[arm] == method for arm in arms):
        cells.append(Cell(f"pretrain_{method}", seed, None, pretrain_dir(workdir, seed, method)))
    for count in counts:
      cells.extend(
        Cell(arm, seed, count, paths.join(workdir, f"seed{seed}", f"n{count}", arm)) for arm in arms
      )
  return cells


class _Paused(Exception):
  """A cell's training stopped before its end (``stop_after_steps``): it is not done, and cells after
  it may start from it, so the study stops there until it is rerun."""

  def __init__(self, cell: Cell, summary: dict):
    super().__init__(f"{cell.describe()}: paused at step {summary['step']} of {summary['total_steps']}")
    self.cell, self.summary = cell, summary


def read_result(cell: Cell) -> dict | None:
  """The cell's recorded result, or None while it is not done: none is recorded, or the one recorded
  is of a training that had not finished (older versions recorded paused cells)."""
  path = paths.join(cell.directory, RESULT_FILE)
  if not paths.exists(path):
    return None
  result = json.loads(paths.read_text(path))
  summary = result.get("train_summary")
  if summary is not None and not stages.finished(summary):
    logging.warning(
      "%s: records a training stopped at step %s of %s; not taken for done, the cell resumes",
      path,
      summary["step"],
      summary["total_steps"],
    )
    return None
  return result


class _Runner:
  """Runs cells: the training configs, the fixed split and the arms' implementations."""

  def __init__(self, config, workdir: str, files: dict[str, str], labelled: sources.LabelledFile, mesh):
    self.config, self.workdir, self.files, self.mesh = config, workdir, files, mesh
    self.labelled = labelled
    self.labels, self.parts = labelled.labels, labelled.parts
    self.bootstrap = int(config.study.bootstrap_samples)

  def pretrain_config(self, method: str, seed: int):
    recipe = self.config.pretrain_simclr if method == "simclr" else self.config.pretrain_mae
    return stages.stage_config(self.config, method, self.files, recipe, seed=seed, init_from="")

  def finetune_config(self, cell: Cell):
    pretraining = PRETRAINING[cell.arm]
    recipe = self.config.finetune if pretraining else self.config.scratch
    schedule = cell_schedule(recipe, cell.count, jax.device_count(), self.config.study.min_steps)
    init_from = pretrain_dir(self.workdir, cell.seed, pretraining) if pretraining else ""
    return stages.stage_config(
      self.config,
      "finetune",
      self.files,
      recipe,
      seed=cell.seed,
      init_from=init_from,
      **schedule,
      **{"data.train_subset": cell.count, "data.train_subset_seed": cell.seed},
    )

  def splits(self, cell: Cell) -> dict[str, np.ndarray]:
    subset = split.nested_subsets(self.labels["label"], self.parts["train"], [cell.count], seed=cell.seed)[
      cell.count
    ]
    return {"train": subset, "val": self.parts["val"], "test": self.parts["test"]}

  def train(self, stage, cell: Cell) -> dict:
    """Trains (or resumes) ``cell``'s stage; its summary once finished, else raises ``_Paused``."""
    summary = stages.train_stage(stage, cell.directory)
    if not stages.finished(summary):
      raise _Paused(cell, summary)
    return summary

  def run(self, cell: Cell) -> dict:
    if cell.arm.startswith("pretrain_"):
      method = cell.arm.removeprefix("pretrain_")
      return {"train_summary": self.train(self.pretrain_config(method, cell.seed), cell)}
    if cell.arm in ("scratch", "finetune_simclr", "finetune_mae"):
      summary = self.train(self.finetune_config(cell), cell)
      return {
        "train_summary": summary,
        **self.score(
          evaluate.predict_checkpoint(
            cell.directory,
            self.labelled,
            self.parts["test"],
            batch_size=self.config.eval_batch_size,
            mesh=self.mesh,
          )
        ),
      }
    if cell.arm.startswith("probe_"):
      from l2vit_jax.evaluation import probes  # pylint: disable=import-outside-toplevel

      pretrained = pretrain_dir(self.workdir, cell.seed, PRETRAINING[cell.arm])
      return self.score(
        probes.probe_checkpoint(
          pretrained, self.labelled, self.splits(cell), batch_size=self.config.eval_batch_size, mesh=self.mesh
        )
      )
    from l2vit_jax.baselines import bdt  # pylint: disable=import-outside-toplevel

    return self.score(
      bdt.physics_baseline_predictions(
        self.files["labelled"], self.splits(cell), seed=cell.seed, cache_dir=paths.join(self.workdir, "cache")
      )
    )

  def score(self, predictions: dict) -> dict:
    """Test-split metrics of ``{"index", "prob", "mass_pred"}`` (every arm reports the same ones)."""
    index = np.asarray(predictions["index"])
    if not np.array_equal(np.sort(index), self.parts["test"]):
      raise ValueError("predictions do not cover exactly the fixed test split")
    return {
      "metrics": metrics.classification_and_mass_metrics(
        self.labels["label"][index],
        predictions["prob"],
        self.labels["mass"][index],
        predictions["mass_pred"],
        bootstrap_samples=self.bootstrap,
      )
    }


class _Progress:
  """'cell k/N … ETA' from the measured times of the cells run so far, per arm."""

  def __init__(self):
    self.seconds: dict[str, list[float]] = {}

  def estimate(self, arm: str) -> float | None:
    times = self.seconds.get(arm) or [t for ts in self.seconds.values() for t in ts]
    return float(np.mean(times)) if times else None

  def eta(self, remaining: list[Cell]) -> str:
    if not remaining:
      return "0 s"
    if not self.seconds:
      return "unknown"
    return _duration(sum(self.estimate(cell.arm) for cell in remaining))

  def record(self, arm: str, seconds: float) -> None:
    self.seconds.setdefault(arm, []).append(seconds)


def _duration(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_cells(cells: list[Cell], runner: _Runner) -> dict[Cell, dict]:
  """Runs every cell without a result (in order), logging progress; returns every available result.

  Raises:
    _Paused: a cell's training paused (``stop_after_steps``); no result is recorded for it.
  """
  progress, results = _Progress(), {}
  pending = [cell for cell in cells if read_result(cell) is None]
  for k, cell in enumerate(cells, 1):
    existing = read_result(cell)
    if existing is not None:
      logging.info("study cell %d/%d (%s): done already, skipped", k, len(cells), cell.describe())
      results[cell] = existing
      continue
    logging.info("study cell %d/%d (%s) … ETA %s", k, len(cells), cell.describe(), progress.eta(pending))
    start = time.time()
    try:
      result = runner.run(cell)
    except ImportError as error:
      if cell.arm not in OPTIONAL_ARMS:
        raise
      # A probe or baseline whose dependencies are not installed: report it, run the other arms.
      logging.warning("study cell %s skipped: %s", cell.describe(), error)
      pending.remove(cell)
      continue
    seconds = time.time() - start
    result = {"arm": cell.arm, "seed": cell.seed, "count": cell.count, "seconds": seconds, **result}
    if jax.process_index() == 0:
      paths.write_json(paths.join(cell.directory, RESULT_FILE), result)
    progress.record(cell.arm, seconds)
    pending.remove(cell)
    results[cell] = result
    logging.info(
      "study cell %d/%d (%s) done in %s%s",
      k,
      len(cells),
      cell.describe(),
      _duration(seconds),
      _metrics_line(result),
    )
  return results


def _metrics_line(result: dict) -> str:
  m = result.get("metrics")
  return (
    ""
    if not m
    else (f": accuracy {m['accuracy']:.3f}, ROC-AUC {m['roc_auc']:.3f}, mass MAE {m['mass_mae']:.1f} GeV")
  )


# --- entry point ------------------------------------------------------------------------------------


def study_command(config, workdir: str) -> str:
  """The command line that ran the study (with its overrides), or its plain form when called from code."""
  if sys.argv and sys.argv[0].endswith(os.path.join("l2vit_jax", "main.py")):
    return " ".join(["python -m l2vit_jax.main", *map(shlex.quote, sys.argv[1:])])
  variant = config.study.variant
  return COMMAND.format(workdir=workdir, variant="" if variant == "full" else f":{variant}")


def _enable_compilation_cache(directory: str) -> None:
  """Cells of one shape compile the same steps: XLA's persistent cache makes all but the first cheap.

  ``compilation.enable_compilation_cache`` decides once per process: from the command line ``main`` already
  chose (``config.compilation_cache``) and this keeps that choice; called from code, ``directory`` is
  the default of ``'auto'``.
  """
  compilation.enable_compilation_cache("auto", default=directory)


def run_study(config, workdir: str) -> dict:
  """Runs (or resumes) the whole study in ``workdir`` and writes study.json, study.png and report.md;
  returns the study, or {} (writing none of them) when a cell paused."""
  _enable_compilation_cache(os.path.join(workdir, "cache", "xla"))
  arms = selected_arms(config)
  files = stages.data_files(config, workdir)
  inputs = check_inputs(config, files, arms)
  cells = plan_cells(config, workdir, arms, inputs["counts"])
  logging.info(
    "Label-efficiency study: %d cells (%d seeds × counts %s × arms %s, plus pretraining) in %s",
    len(cells),
    len(_seeds(config)),
    inputs["counts"],
    ", ".join(arms),
    workdir,
  )
  try:
    results = run_cells(cells, _Runner(config, workdir, files, inputs["labelled"], sharding.make_mesh()))
  except _Paused as paused:  # no summary of a study with cells missing: the rerun writes it
    logging.info(
      "Study paused in cell %s at step %d of %d (stop_after_steps); rerun the same command to continue.",
      paused.cell.describe(),
      paused.summary["step"],
      paused.summary["total_steps"],
    )
    return {}
  scored = [r for cell, r in results.items() if cell.count is not None]
  study = study_report.summarise(scored, arms=arms, counts=inputs["counts"])
  study.update(command=study_command(config, workdir), data=_data_description(config, files, inputs))
  if jax.process_index() == 0:
    study_report.write_outputs(workdir, study)
    print(f"\nStudy done: {os.path.join(workdir, 'report.md')}")
  return study


def _data_description(config, files: dict[str, str], inputs: dict) -> dict:
  parts = inputs["labelled"].parts
  generated = not (config.data.labelled_path and config.data.unlabelled_path)
  return {
    "labelled": files["labelled"],
    "unlabelled": files["unlabelled"],
    "generator": str(config.generate.generator) if generated else None,
    "synthetic": generated and config.generate.generator == "synthetic",
    "image_size": int(config.model.img_size),
    "train": len(parts["train"]),
    "val": len(parts["val"]),
    "test": len(parts["test"]),
    "seeds": _seeds(config),
    "counts": inputs["counts"],
  }
