"""Task ``predict``: tags every jet of a file with a finetuned checkpoint, P(top) and mass in GeV.

  python -m l2vit_jax.main --config=configs/predict.py --workdir=runs/predict \
      --config.checkpoint=runs/finetune --config.data.input_path=data/Dataset_Specific_Unlabelled.h5

The input is any jet file (HDF5 with ``jet``, labelled or not: labels are ignored; or ``.sparse``); the
output, ``WORKDIR/predictions.h5``, holds one row per jet in file order (``PREDICTIONS_FILE``, schema
in ``write_predictions``) and names the checkpoint it came from.

Invariants, and why:

* Equal to the evaluation. Every chunk is scored by ``evaluate.predictor`` (the checkpoint's pixel scale,
  its mass standardisation undone) over ``inference.map_source`` (sharded over every device of every
  process, padded to whole global batches, gathered on every process), with chunk boundaries at whole
  global batches: each jet meets the same forward pass in the same batch position as in one pass.
* Bounded memory. Images are read lazily, one global batch at a time (``hdf5.HDF5Source`` /
  ``sparse.SparseSource``); only the predictions, 16 bytes a jet, are kept, so memory does not grow
  with the file (docs/predict.md: measured).
* Resumable. The file is scored in chunks of ``config.chunk_size`` jets; each finished chunk is saved
  (whole, atomically) in the hidden ``WORKDIR/.predictions.h5.chunks/`` beside a manifest of what it
  was computed from (``fingerprint``: the input's path, size and modification time, the checkpoint's
  identity, chunk and batch sizes). A rerun after a kill scores only the missing chunks; one whose
  manifest differs starts over. ``predictions.h5`` appears only once complete (``runtime.paths``
  replaces it in one rename) and the chunks are then removed; a rerun on a complete, matching output
  does nothing.
* One writer. Every process scores its share of each chunk; process 0 alone writes (the chunks, the
  output) and tells the others whether it succeeded, so all stop together with the same error. It
  holds the workdir lock (``checkpoint.workdir_lock``) and checks it before every write, so two runs on
  one workdir never interleave.
* Bad input writes nothing. Config, checkpoint (missing, or a pretraining one without heads) and input
  file (schema, image size against the checkpoint's, a pixel sample: ``sources.validate_file``) are
  checked before the workdir is touched. Pixels outside the sample are checked through the
  predictions: a NaN/Inf pixel makes its jet's prediction non-finite, and the first such jet is read
  again to name the bad pixel; that error removes the chunks (and a workdir this run created).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
from typing import Callable, Sequence

import h5py
import jax
import numpy as np
from absl import logging

from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io, workdir_lock
from l2vit_jax.data import hdf5, sources
from l2vit_jax.evaluation import evaluate
from l2vit_jax.runtime import console, paths, sharding

PREDICTIONS_FILE = "predictions.h5"
CHUNKS_DIR = ".predictions.h5.chunks"  # hidden: nothing but a rerun of this task reads it
MANIFEST_FILE = "manifest.json"
# Bumped when the chunks or the output change meaning: a rerun then starts over instead of mixing.
FORMAT_VERSION = 1


# --- what the predictions are computed from --------------------------------------------------------------


def checkpoint_identity(directory: str, meta: dict) -> dict:
  """The checkpoint as ``directory`` names it, the Orbax directory and step restored, and
  ``checkpoint_digest``: SHA-256 of its meta (the array digests, pixel scale and mass statistics
  included), which names the weights and the numbers the predictions were computed with."""
  path, step = model_io.find_model_checkpoint(directory)
  canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str)
  return {
    "checkpoint": str(directory),
    "checkpoint_path": str(path),
    "checkpoint_step": int(step),
    "checkpoint_digest": "sha256:" + hashlib.sha256(canonical.encode()).hexdigest(),
  }


def input_identity(path: str, num_jets: int) -> dict:
  """The input file by absolute path, size, inode, modification and change time: a rewritten or
  replaced file is another input (tools that copy a file's modification time, ``cp -p`` or ``rsync
  -t``, cannot set its change time or keep its inode)."""
  stat = os.stat(path)
  return {
    "input_path": os.path.abspath(path),
    "input_bytes": int(stat.st_size),
    "input_inode": int(stat.st_ino),
    "input_mtime_ns": int(stat.st_mtime_ns),
    "input_ctime_ns": int(stat.st_ctime_ns),
    "num_jets": int(num_jets),
  }


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one predict run computes: the rows of the input in chunks of whole global batches."""

  input_path: str
  num_jets: int
  batch_size: int
  chunk_size: int  # a multiple of batch_size
  identity: dict  # checkpoint_identity | input_identity

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.num_jets / self.chunk_size)

  def rows(self, chunk: int) -> tuple[int, int]:
    return chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_jets)

  def fingerprint(self) -> dict:
    """Everything the chunks and the output depend on; a rerun resumes only under the same one."""
    return {
      "format_version": FORMAT_VERSION,
      **self.identity,
      "batch_size": self.batch_size,
      "chunk_size": self.chunk_size,
    }


# --- checks before anything is written -------------------------------------------------------------------


def _check_config(config, mesh) -> None:
  problems = []
  if not config.get("checkpoint"):
    problems.append("config.checkpoint is empty; expected a finetuning workdir (or an imported checkpoint)")
  if not config.data.get("input_path"):
    problems.append("config.data.input_path is empty; expected an HDF5 file with 'jet' or a .sparse file")
  if not (isinstance(config.chunk_size, int) and config.chunk_size > 0):
    problems.append(f"config.chunk_size={config.chunk_size!r}: expected a positive number of jets")
  devices = mesh.devices.size
  if not (
    isinstance(config.eval_batch_size, int)
    and config.eval_batch_size > 0
    and config.eval_batch_size % devices == 0
  ):
    problems.append(
      f"config.eval_batch_size={config.eval_batch_size!r}: expected a positive multiple of "
      f"the {devices} device(s)"
    )
  if problems:
    raise errors.ConfigError("; ".join(problems))


def restore_finetuned(directory: str):
  """(model, meta) of a finetuned checkpoint; a pretraining (SimCLR/MAE) one is refused before its
  arrays are read, since it has no class or mass head.

  Raises:
    errors.MissingCheckpointError: ``directory`` holds no checkpoint.
    errors.CheckpointMismatchError: a pretraining checkpoint.
    errors.CheckpointDamagedError: a checkpoint whose arrays or meta are damaged.
  """
  meta = model_io.read_model_meta(directory)
  if evaluate._is_pretraining_checkpoint(meta):  # pylint: disable=protected-access  # one rule for both tasks
    raise errors.CheckpointMismatchError(
      f"{directory}: a pretraining (SimCLR/MAE) checkpoint has no class or mass head; expected a "
      "finetuned workdir (configs/finetune.py) or an imported finetuned checkpoint"
    )
  return model_io.restore_model_checkpoint(directory)


def _image_size(meta: dict) -> int | None:
  size = meta.get("model_config", {}).get("img_size")
  return size if isinstance(size, int) and not isinstance(size, bool) else None


# --- process 0 writes, every process learns the outcome --------------------------------------------------


def _on_process_0(action, what: str):
  """Runs ``action()`` on process 0 and returns its result there (None elsewhere); every process raises
  if it failed (process 0 its own error), so none waits in a later collective for a process that
  stopped."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = action()
    except Exception as e:  # pylint: disable=broad-except  # any error: every process must learn of it
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = errors.StorageError(f"{what}: process 0 failed (its error is in its log)")
  if error is not None:
    raise error
  return result


def _broadcast(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (same shape and dtype everywhere)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _check_lock_held(lock: workdir_lock.WorkdirLock | None, workdir: str) -> None:
  """Before every write: a run that lost its lock (taken over, or not refreshed within its lease) stops
  without writing anything more (``training.loop`` does the same before checkpoints)."""
  from l2vit_jax.training import loop  # pylint: disable=import-outside-toplevel

  loop._check_lock_held(lock, workdir)  # pylint: disable=protected-access


# --- the chunks of an unfinished run ---------------------------------------------------------------------


class ChunkStore:
  """``WORKDIR/.predictions.h5.chunks/``: ``manifest.json`` (the plan's fingerprint) and one
  ``chunk-NNNNNN.npz`` per finished chunk (``index``, ``prob_top``, ``mass``), each written whole.

  Read and written by process 0 only (``_on_process_0``): the workdir need not be shared.
  """

  def __init__(self, workdir: str, plan: Plan):
    self.directory = paths.join(workdir, CHUNKS_DIR)
    self.plan = plan

  def _chunk_path(self, chunk: int) -> str:
    return paths.join(self.directory, f"chunk-{chunk:06d}.npz")

  def remove(self) -> None:
    """Removes the chunks, then the manifest, then the folder: a kill midway leaves a manifest with
    chunks of its own fingerprint, or a folder without one, which ``open`` clears."""
    if not paths.is_dir(self.directory):
      return
    folder = paths.as_path(self.directory)
    for entry in folder.iterdir():
      if entry.name != MANIFEST_FILE:
        entry.unlink()
    manifest = folder / MANIFEST_FILE
    if manifest.exists():
      manifest.unlink()
    folder.rmtree()

  def open(self) -> np.ndarray:
    """Which chunks are finished, as a bool array; chunks of another fingerprint are removed first."""
    manifest = paths.join(self.directory, MANIFEST_FILE)
    wanted = self.plan.fingerprint()
    if paths.exists(manifest):
      try:
        found = json.loads(paths.read_text(manifest))
      except ValueError:
        found = None
      if found != wanted:
        changed = sorted(k for k in wanted if not isinstance(found, dict) or found.get(k) != wanted[k])
        logging.warning(
          "%s: chunks of an earlier run with another %s; starting over",
          self.directory,
          ", ".join(changed) or "manifest",
        )
        self.remove()
    if not paths.exists(manifest):
      self.remove()  # chunks without a manifest cannot be told apart from another run's
      paths.makedirs(self.directory)
      paths.write_json(manifest, wanted)
    return np.array([self.read(chunk) is not None for chunk in range(self.plan.num_chunks)])

  def read(self, chunk: int) -> dict[str, np.ndarray] | None:
    """The chunk's predictions, or None if it is missing or not the rows it should hold."""
    path = self._chunk_path(chunk)
    if not paths.exists(path):
      return None
    start, stop = self.plan.rows(chunk)
    try:
      with np.load(io.BytesIO(paths.as_path(path).read_bytes())) as data:
        arrays = {key: data[key] for key in ("index", "prob_top", "mass")}
    except (OSError, ValueError, KeyError) as error:
      logging.warning("%s: unreadable (%s); scoring its jets again", path, errors.one_line(error, 200))
      return None
    if not np.array_equal(arrays["index"], np.arange(start, stop)):
      logging.warning("%s: not rows %d-%d; scoring them again", path, start, stop - 1)
      return None
    return arrays

  def write(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    paths.write_with(self._chunk_path(chunk), np.savez, **arrays)


# --- scoring ---------------------------------------------------------------------------------------------


def _check_finite(path: str, source, out: dict[str, np.ndarray]) -> None:
  """Refuses the first jet whose prediction is not finite, naming its bad pixel (NaN/Inf: the file's
  values outside the sample ``validate_file`` read) or, with finite pixels, their range.

  Every process holds the same gathered predictions, so all raise the same error together.
  """
  bad = ~(np.isfinite(out["prob"]) & np.isfinite(out["mass_pred"]))
  if not bad.any():
    return
  position = int(np.flatnonzero(bad)[0])
  row = int(out["index"][position])
  key = "values" if sources.is_sparse(path) else hdf5.IMAGE_KEY
  image = source[position]["image"]  # the source's rows are the chunk's, in the predictions' order
  hdf5.check_pixel_values(path, key, image, row)
  raise errors.DataError(
    f"{path}: key '{key}': image {row} (pixels {float(image.min()):g} to "
    f"{float(image.max()):g}) gives a non-finite prediction; expected pixel values "
    "the checkpoint's model can take (the CMS files' are at most ~255)"
  )


def scorer(model, meta: dict, plan: Plan, mesh) -> Callable[[Sequence[dict]], dict[str, np.ndarray]]:
  """The evaluation's predictions (``evaluate.predictor``) of a source, in the plan's batches; the
  forward pass is compiled once for all chunks."""
  run = evaluate.predictor(model, meta, mesh=mesh)
  return lambda source: run(source, batch_size=plan.batch_size)


def score_chunk(score, plan: Plan, chunk: int) -> dict[str, np.ndarray]:
  """``score`` on the chunk's rows: ``index`` int64, ``prob_top`` and ``mass`` float32; a non-finite
  prediction is refused (``_check_finite``)."""
  start, stop = plan.rows(chunk)
  source = sources.open_source(plan.input_path, labelled=False, indices=np.arange(start, stop))
  out = score(source)
  _check_finite(plan.input_path, source, out)
  return {
    "index": out["index"].astype(np.int64),
    "prob_top": out["prob"].astype(np.float32),
    "mass": np.asarray(out["mass_pred"], np.float32),
  }


# --- the output ------------------------------------------------------------------------------------------


def write_predictions(path: str, arrays: dict[str, np.ndarray], plan: Plan) -> None:
  """Replaces ``path`` (whole, in one rename) with the HDF5 file of ``arrays``:

  * ``index`` (N,) int64: the jet's row in the input file (0 … N-1, in order);
  * ``prob_top`` (N,) float32: P(top), the softmax's class-1 probability;
  * ``mass`` (N,) float32: the regressed jet mass in GeV;
  * root attributes: the plan's fingerprint (input path, bytes, mtime, ``num_jets``; ``checkpoint``,
    ``checkpoint_path``, ``checkpoint_step``, ``checkpoint_digest``; batch and chunk sizes) and, as one
    JSON string, ``fingerprint`` (what a rerun compares).
  """

  def write(file_object) -> None:
    with h5py.File(file_object, "w") as f:
      f.create_dataset("index", data=arrays["index"])
      f.create_dataset("prob_top", data=arrays["prob_top"]).attrs["description"] = "P(top)"
      f.create_dataset("mass", data=arrays["mass"]).attrs["unit"] = "GeV"
      for key, value in plan.fingerprint().items():
        f.attrs[key] = value
      f.attrs["fingerprint"] = json.dumps(plan.fingerprint(), sort_keys=True)

  paths.write_with(path, write)


def _complete_output(path: str, plan: Plan) -> bool:
  """Whether ``path`` is already this plan's output (a rerun after success does nothing)."""
  if not paths.exists(path):
    return False
  try:
    with h5py.File(io.BytesIO(paths.as_path(path).read_bytes()), "r") as f:
      return f.attrs.get("fingerprint") == json.dumps(plan.fingerprint(), sort_keys=True)
  except (OSError, ValueError):
    return False


def _assemble(store: ChunkStore, output: str) -> None:
  parts = [store.read(chunk) for chunk in range(store.plan.num_chunks)]
  missing = [chunk for chunk, part in enumerate(parts) if part is None]
  if missing:
    raise errors.StorageError(
      f"{store.directory}: chunk(s) {missing[:5]} vanished before the output "
      "was assembled; run the same command again"
    )
  write_predictions(
    output,
    {key: np.concatenate([part[key] for part in parts]) for key in ("index", "prob_top", "mass")},
    store.plan,
  )
  store.remove()


# --- the task --------------------------------------------------------------------------------------------


def predict_file(config, workdir: str) -> dict:
  """Tags every jet of ``config.data.input_path`` with ``config.checkpoint`` into
  ``workdir/predictions.h5`` (module docstring); returns ``{"path", "num_jets", "resumed_jets"}``."""
  mesh = sharding.make_mesh()
  _check_config(config, mesh)
  model, meta = restore_finetuned(config.checkpoint)
  path = config.data.input_path
  info = sources.validate_file(path, labelled=False, image_size=_image_size(meta))
  batch_size = config.eval_batch_size
  plan = Plan(
    input_path=path,
    num_jets=info.num_examples,
    batch_size=batch_size,
    chunk_size=math.ceil(config.chunk_size / batch_size) * batch_size,
    identity={**input_identity(path, info.num_examples), **checkpoint_identity(config.checkpoint, meta)},
  )
  output = paths.join(workdir, PREDICTIONS_FILE)
  created = not paths.exists(workdir)
  paths.makedirs(workdir)
  lock = workdir_lock.lock_workdir(workdir)
  store = ChunkStore(workdir, plan)
  try:
    resumed = _run(plan, store, output, model, meta, mesh, lock, workdir)
  except errors.DataError:  # the input is bad: its chunks are worth nothing, and nothing is left
    _on_process_0(store.remove, store.directory)
    _release(lock)
    # Every process enters the collective; process 0's own view decides (another process may have
    # found the folder process 0 had just made).
    _on_process_0(lambda: created and _remove_if_empty(workdir), workdir)
    raise
  finally:
    _release(lock)
  return {"path": output, "num_jets": plan.num_jets, "resumed_jets": resumed}


def _release(lock: workdir_lock.WorkdirLock | None) -> None:
  if lock is not None:
    lock.release()  # a second call does nothing


def _remove_if_empty(directory: str) -> None:
  if not paths.is_remote(directory) and os.path.isdir(directory) and not os.listdir(directory):
    os.rmdir(directory)


def _run(plan: Plan, store: ChunkStore, output: str, model, meta: dict, mesh, lock, workdir: str) -> int:
  """Scores the chunks not yet done and assembles the output; returns how many jets were resumed."""
  complete = _broadcast(np.int32(bool(_on_process_0(lambda: _complete_output(output, plan), output))))
  if complete:
    logging.info("%s: already holds the %d predictions of this input and checkpoint", output, plan.num_jets)
    return plan.num_jets
  done = _on_process_0(store.open, store.directory)
  done = _broadcast(np.zeros(plan.num_chunks, np.int32) if done is None else done.astype(np.int32))
  resumed = sum(stop - start for start, stop in map(plan.rows, np.flatnonzero(done)))
  if resumed:
    logging.info(
      "%s: %d of %d chunks (%d of %d jets) were tagged by an earlier run; resuming",
      store.directory,
      int(done.sum()),
      plan.num_chunks,
      resumed,
      plan.num_jets,
    )
  score = scorer(model, meta, plan, mesh)
  with console.ProgressBar(plan.num_jets - resumed, "predict", "jet") as bar:
    bar.update(0)  # the bar (and its ETA) from the start, not after the first chunk
    for chunk in np.flatnonzero(done == 0):
      arrays = score_chunk(score, plan, int(chunk))
      _check_lock_held(lock, workdir)
      _on_process_0(functools.partial(store.write, int(chunk), arrays), store.directory)
      bar.update(len(arrays["index"]))
  _check_lock_held(lock, workdir)
  _on_process_0(lambda: _assemble(store, output), output)
  logging.info("Predictions of %d jets written to %s", plan.num_jets, output)
  return resumed
