"""Multi-stage runs (the quickstart, the study): their data files, each stage's config derived from its
recipe, and running a training stage in its own resumable sub-directory.

A stage's config is the run's config with the stage's task, the data files and the stage's recipe
(``config_lib.recipe``) applied; everything else (model, data options, logging) is shared. Every
stage trains through ``training.loop.train_and_evaluate`` in its own directory, so rerunning the same
command resumes the stage that was cut short and skips the finished ones.
"""

from __future__ import annotations

import jax
from absl import logging

from l2vit_jax import config_lib, errors
from l2vit_jax.data import synthetic
from l2vit_jax.runtime import paths
from l2vit_jax.training import loop

DATA_DIR = "data"


def data_files(config, workdir: str) -> dict[str, str]:
  """The labelled and unlabelled files of a run: ``config.data``'s, or when those are empty, files
  generated once (by process 0) under ``WORKDIR/data`` as ``config.generate`` says."""
  given = {"labelled": config.data.labelled_path, "unlabelled": config.data.unlabelled_path}
  if all(given.values()):
    return given
  if any(given.values()):
    empty = next(kind for kind, path in given.items() if not path)
    raise errors.ConfigError(f"config.data.{empty}_path is empty while the other data path is set; give "
                             "both files, or neither to generate them under WORKDIR/data")
  if paths.is_remote(workdir):
    raise errors.ConfigError(f"{workdir}: this run generates its jet files into the workdir, and jet "
                             "files must be on local disk; use a local --workdir or give "
                             "--config.data.labelled_path and --config.data.unlabelled_path")
  spec = config.generate
  if spec.generator not in config_lib.GENERATORS:
    raise errors.ConfigError(f"config.generate.generator={spec.generator!r}: expected one of "
                             f"{list(config_lib.GENERATORS)}")
  files = {kind: paths.join(workdir, DATA_DIR, f"{spec.generator}_{kind}.h5") for kind in given}
  if jax.process_index() == 0:
    paths.makedirs(paths.join(workdir, DATA_DIR))
    for kind, num, seed in (("labelled", spec.num_labelled, spec.data_seed),
                            ("unlabelled", spec.num_unlabelled, spec.data_seed + 1)):
      if not paths.exists(files[kind]):
        logging.info("Generating %d %s %s jets → %s", num, spec.generator, kind, files[kind])
        _generate(spec, files[kind], num, labelled=kind == "labelled", seed=seed,
                  image_size=config.model.img_size)
  return files


def _generate(spec, path: str, num: int, *, labelled: bool, seed: int, image_size: int) -> None:
  if spec.generator == "synthetic":
    synthetic.write_synthetic_hdf5(path, num, labelled=labelled, seed=seed, image_size=image_size)
    return
  from l2vit_jax.data import jet_files  # pylint: disable=import-outside-toplevel  (Pythia, FastJet)
  # A labelled file has balanced classes; the unlabelled one is the stated mixture.
  jet_files.write_pythia_hdf5(path, num, labelled=labelled, seed=seed, image_size=image_size,
                              workers=int(spec.workers) or None,
                              pt_range=(float(spec.pt_min), float(spec.pt_max)),
                              signal_fraction=0.5 if labelled else float(spec.signal_fraction))


def stage_config(config, task: str, files: dict[str, str], recipe=None, **fields):
  """The config of one stage: ``config`` with ``task``, the data ``files``, then ``recipe`` (if any)
  and ``fields`` (top-level or dotted field names) applied."""
  stage = config.copy_and_resolve_references()
  with stage.unlocked():
    stage.task = task
    stage.data.labelled_path = files["labelled"]
    stage.data.unlabelled_path = files["unlabelled"]
    config_lib.apply_recipe(stage, {**(recipe.to_dict() if recipe else {}), **fields})
  return stage


def finished(summary: dict) -> bool:
  """Whether a training stage ran to its last step or stopped early, rather than pausing
  (``stop_after_steps``, preemption): later stages must not start from a half-trained model."""
  return summary["step"] >= summary["total_steps"] or summary["stopped_early"]


def train_stage(stage, directory: str) -> dict:
  """Trains (or resumes) one stage in ``directory``; returns the loop's summary."""
  return loop.train_and_evaluate(stage, directory)
