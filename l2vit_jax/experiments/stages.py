"""Multi-stage runs (the quickstart, the study): their data files, each stage's config derived from its
recipe, and running a training stage in its own resumable sub-directory.

A stage's config is the run's config with the stage's task, the data files and the stage's recipe
(``config_lib.recipe``) applied; everything else (model, data options, logging) is shared. Every
stage trains through ``training.loop.train_and_evaluate`` in its own directory, so rerunning the same
command resumes the stage that was cut short and skips the finished ones.

Generated data (``data_files``) with several processes. Every process makes sure that the jet files
exist on its own disk, and then all of them agree on the outcome before any trains:

* Each host generates. On a multi-host TPU VM slice (or multi-node GPU) every host has its own local
  disk, and each host's processes read the training files from it: files that process 0 wrote on
  host 0 are not on host 1, and shipping gigabytes of jets through the coordination service is not
  an option. Generation is deterministic (synthetic: a function of seed, count and size; Pythia: of
  its settings, whatever the number of workers), so every host writes the same bytes, in the same
  wall time as one host would.
* Processes that share a disk (several processes on one machine, hosts on a shared file system, or
  two runs started on one workdir) take turns under ``WORKDIR/data/lock``, a
  ``checkpoint.workdir_lock.WorkdirLock``: the first generates, the others wait for it and then find
  the files in place. The lock is a lease, so a generator killed on this host is taken over at once
  and one on a dead host after the lease; it is released (removed) as soon as the files are there.
* A file already there is used only if it was made with this run's settings (``generate.*`` and
  ``model.img_size``, read back from the file itself); otherwise the run stops with one line naming
  the file and the first differing field, rather than training on other data than it was asked to.
* Then every process learns whether any process failed (``agree_on_outcome``), and all stop with the
  same line, the first failure's, instead of the others going on to train without it.
"""

from __future__ import annotations

import contextlib
import json
import time

import h5py
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from l2vit_jax import config_lib, errors
from l2vit_jax.checkpoint import storage, workdir_lock
from l2vit_jax.data import hdf5, synthetic
from l2vit_jax.runtime import paths
from l2vit_jax.training import loop

DATA_DIR = "data"
# How often a process waiting for another's generation looks at the lock again.
LOCK_POLL_SECONDS = 0.5
# The longest failure line processes exchange (``agree_on_outcome``); a longer one is cut.
OUTCOME_BYTES = 2048
# The ``generator`` attribute each generator writes into its files.
GENERATOR_ATTRIBUTES = {"l2vit_jax.data.synthetic": "synthetic", "l2vit_jax.data.pythia": "pythia"}


def data_files(config, workdir: str) -> dict[str, str]:
  """The labelled and unlabelled files of a run: ``config.data``'s, or when those are empty, files
  generated under ``WORKDIR/data`` as ``config.generate`` says, on every process's disk (see the
  module docstring).

  Raises:
    errors.ConfigError: bad ``config.data`` paths or ``config.generate`` fields (on every process
      alike, before anything is written); in a single process also a file already there that was
      generated with other settings.
    errors.DataError: a file that could not be generated or read; with several processes, any
      failure of any process, on every process with the same line (``agree_on_outcome``).
  """
  given = {"labelled": config.data.labelled_path, "unlabelled": config.data.unlabelled_path}
  if all(given.values()):
    return given
  if any(given.values()):
    empty = next(kind for kind, path in given.items() if not path)
    raise errors.ConfigError(
      f"config.data.{empty}_path is empty while the other data path is set; give "
      "both files, or neither to generate them under WORKDIR/data"
    )
  if paths.is_remote(workdir):
    raise errors.ConfigError(
      f"{workdir}: this run generates its jet files into the workdir, and jet "
      "files must be on local disk; use a local --workdir or give "
      "--config.data.labelled_path and --config.data.unlabelled_path"
    )
  spec = config.generate
  if spec.generator not in config_lib.GENERATORS:
    raise errors.ConfigError(
      f"config.generate.generator={spec.generator!r}: expected one of {list(config_lib.GENERATORS)}"
    )
  if spec.generator == "synthetic":
    synthetic.refuse_unused_settings(spec, config_lib.generated_data_config(num_labelled=0, num_unlabelled=0))
  files = {kind: paths.join(workdir, DATA_DIR, f"{spec.generator}_{kind}.h5") for kind in given}
  failure = None
  try:
    _make_files(config, paths.join(workdir, DATA_DIR), files)
  except Exception as error:  # pylint: disable=broad-except  # every process must learn of it
    failure = error
  agree_on_outcome(failure)
  return files


def _make_files(config, directory: str, files: dict[str, str]) -> None:
  """Generates the missing files of ``files`` and checks the others, under the data directory's lock.
  A failing disk (full, read-only) is a ``DataError`` naming the directory, not a traceback."""
  spec = config.generate
  try:
    paths.makedirs(directory)
    with _generation_lock(directory):
      for kind, num, seed in (
        ("labelled", spec.num_labelled, spec.data_seed),
        ("unlabelled", spec.num_unlabelled, spec.data_seed + 1),
      ):
        if paths.exists(files[kind]):
          _check_settings(
            files[kind], _recorded_settings(files[kind], kind), _expected_settings(config, kind)
          )
          continue
        logging.info("Generating %d %s %s jets → %s", num, spec.generator, kind, files[kind])
        _generate(
          spec, files[kind], num, labelled=kind == "labelled", seed=seed, image_size=config.model.img_size
        )
  except OSError as error:
    raise errors.DataError(f"{directory}: could not write the generated jet files: {error}") from error


@contextlib.contextmanager
def _generation_lock(directory: str):
  """Holds ``directory/lock`` (a ``WorkdirLock``), waiting for as long as another process holds it:
  that one is generating the same files, or a live run's files that this run then checks."""
  lock = workdir_lock.WorkdirLock(directory)
  waiting = False
  while True:
    try:
      lock.acquire()
      break
    except errors.WorkdirLockedError as busy:
      if not busy.expires:  # waiting would wait for ever, every other process with it
        raise errors.DataError(
          f"{lock.path}: a lock that never expires (unreadable, or written by an older version) holds "
          "the generated jet files; if no run is generating them, delete it and rerun"
        ) from busy
      if not waiting:
        logging.info(
          "Waiting for the jet files in %s: another process is generating them (%s)", directory, busy
        )
        waiting = True
      time.sleep(LOCK_POLL_SECONDS)
  try:
    yield
  finally:
    lock.release()


def _expected_settings(config, kind: str) -> dict:
  """What a ``kind`` file generated for ``config`` records, by the config field that sets it."""
  spec = config.generate
  expected = {
    "generate.generator": spec.generator,
    f"generate.num_{kind}": int(spec[f"num_{kind}"]),
    "generate.data_seed": int(spec.data_seed),
    "model.img_size": int(config.model.img_size),
  }
  if spec.generator == "pythia":  # workers: the content does not depend on them
    expected.update({"generate.pt_min": float(spec.pt_min), "generate.pt_max": float(spec.pt_max)})
    if kind == "unlabelled":  # a labelled file is always balanced
      expected["generate.signal_fraction"] = float(spec.signal_fraction)
  return expected


def _recorded_settings(path: str, kind: str) -> dict:
  """The settings an existing generated file was made with, read from the file itself (its generator's
  attributes and its image array's shape), by the config field that sets each."""
  try:
    with h5py.File(path, "r") as f:
      attributes = dict(f.attrs)
      shape = f[hdf5.IMAGE_KEY].shape
    settings = json.loads(attributes.get("settings", "{}"))  # the Pythia generator's
    if not isinstance(settings, dict):
      raise ValueError(f"its 'settings' attribute is a JSON {type(settings).__name__}, not an object")
  except (OSError, KeyError, ValueError) as error:
    if storage.read_failure(error) is not None:  # the disk or the file system, not the file
      raise errors.DataError(
        f"{path}: cannot be read now ({errors.one_line(error)}); the file is kept: "
        "rerun once the storage answers"
      ) from error
    raise errors.DataError(
      f"{path}: cannot read it as a generated jet file ({error}); delete it to generate it again"
    ) from error
  generator = GENERATOR_ATTRIBUTES.get(str(attributes.get("generator")), attributes.get("generator"))
  seed = attributes.get("seed")
  recorded = {
    "generate.generator": generator,
    f"generate.num_{kind}": int(shape[0]),
    # The unlabelled file is drawn from data_seed + 1.
    "generate.data_seed": None if seed is None else int(seed) - (kind == "unlabelled"),
    "model.img_size": int(shape[1]) if len(shape) > 1 else None,
  }
  if generator == "pythia":
    pt_range = settings.get("pt_range", [None, None])
    recorded.update({"generate.pt_min": pt_range[0], "generate.pt_max": pt_range[1]})
    if kind == "unlabelled":
      recorded["generate.signal_fraction"] = settings.get("signal_fraction")
  return recorded


def _check_settings(path: str, recorded: dict, expected: dict) -> None:
  """Refuses a file made with other settings: the stages already trained on it would resume on other
  data if it were regenerated, and the run would not be the one asked for if it were reused."""
  for field, value in expected.items():
    if recorded.get(field) != value:
      raise errors.ConfigError(
        f"{path}: generated with {field}={recorded.get(field)!r}, but this run has {field}={value!r}; "
        "set it back, or use another --workdir"
      )


def encode_outcome(error: BaseException | None) -> np.ndarray:
  """One process's outcome as a fixed-size row of bytes: a failed flag, then the failure's line."""
  row = np.zeros(1 + OUTCOME_BYTES, np.uint8)
  if error is not None:
    text = str(error) if isinstance(error, errors.UserError) else f"{type(error).__name__}: {error}"
    line = errors.one_line(text).encode()[:OUTCOME_BYTES]
    row[0] = 1
    row[1 : 1 + len(line)] = np.frombuffer(line, np.uint8)
  return row


def agree_on_outcome(error: BaseException | None) -> None:
  """Every process learns whether any process failed (``error``: this one's failure, or None), and
  then all raise the same ``DataError``: the line of the first failed process, naming it. A single
  process raises its own error as it is.

  A collective: every process of the run must call it.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  if error is not None and not isinstance(error, errors.UserError):  # a bug: keep its traceback
    logging.error("Generating the jet files failed", exc_info=error)
  rows = np.asarray(multihost_utils.process_allgather(encode_outcome(error)))
  for index, row in enumerate(rows):
    if row[0]:
      line = bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
      raise errors.DataError(f"{line} (process {index} of {len(rows)})") from error


def _generate(spec, path: str, num: int, *, labelled: bool, seed: int, image_size: int) -> None:
  if spec.generator == "synthetic":
    synthetic.write_synthetic_hdf5(path, num, labelled=labelled, seed=seed, image_size=image_size)
    return
  from l2vit_jax.data import jet_files  # pylint: disable=import-outside-toplevel  (Pythia, FastJet)

  # A labelled file has balanced classes; the unlabelled one is the stated mixture.
  jet_files.write_pythia_hdf5(
    path,
    num,
    labelled=labelled,
    seed=seed,
    image_size=image_size,
    workers=int(spec.workers) or None,
    pt_range=(float(spec.pt_min), float(spec.pt_max)),
    signal_fraction=0.5 if labelled else float(spec.signal_fraction),
  )


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
