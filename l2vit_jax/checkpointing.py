"""Orbax checkpoints: resumable training state, model-only "best" checkpoints, and the restore paths.

Layout of a workdir (big_vision style: resuming is pointing at the same directory):

  WORKDIR/checkpoints/<step>/  latest training states (params, BatchNorm stats, optimizer state, step,
                               early-stopping state, Grain iterator), the last ``keep`` of them
  WORKDIR/best/<step>/         the model with the best validation loss so far, model only
  WORKDIR/lock                 held by the process-0 run using this workdir (see ``WorkdirLock``)

Model parameters are stored as flat ``{"blocks/0/attn/qkv/kernel": array}`` dicts so checkpoints are
readable and mismatches can be reported by name. Every checkpoint carries a JSON ``meta`` item with the
model's constructor arguments, the pixel scale and the mass standardisation, so it can be restored and
evaluated without the config that produced it.

Integrity: the meta of every checkpoint also holds ``digests``, the SHA-256 of each array's bytes as
saved (``{"model/params/blocks/0/attn/qkv/kernel": "sha256:..."}``), and every restore recomputes them.
A damaged checkpoint (a bad disk block, a torn copy) is refused with ``CheckpointDamagedError`` naming
the arrays; a resuming run sets the step aside as ``<step>.damaged`` and falls back to an older one.
Writing errors (a full disk) become one ``CheckpointSaveError`` naming the directory and the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from l2vit_jax import paths

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
LOCK_FILE = "lock"


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tensors do not fit the model being restored into."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint whose arrays differ from the digests saved with them, or that cannot be read."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, write error); nothing of it is taken for a checkpoint."""


# --- flat named model state -------------------------------------------------------------------------

def flatten_names(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts → ``{"a/b/c": leaf}``, the naming used in every checkpoint."""
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(flatten_names(value, f"{prefix}{key}/"))
    return flat
  return {prefix[:-1]: tree}


def flat_state(model: nnx.Module, variable_type: type = nnx.Param) -> dict[str, jax.Array]:
  """Named arrays of one variable type, e.g. ``{"blocks/0/attn/temperature": (4, 1, 1)}``."""
  return flatten_names(nnx.to_pure_dict(nnx.state(model, variable_type)))


def named_arrays(params: nnx.State, batch_stats: nnx.State) -> dict[str, dict[str, jax.Array]]:
  """The checkpoint layout of a model's state: ``{"params": {name: array}, "batch_stats": {...}}``."""
  return {"params": flatten_names(nnx.to_pure_dict(params)),
          "batch_stats": flatten_names(nnx.to_pure_dict(batch_stats))}


def model_arrays(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
  return named_arrays(nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))


def describe_mismatch(expected: dict[str, Any], found: dict[str, Any], *, context: str) -> str | None:
  """One line listing missing, unexpected and mis-shaped names, or None when everything fits."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = [f"{k} {tuple(np.shape(found[k]))} vs model {tuple(np.shape(expected[k]))}"
               for k in sorted(set(expected) & set(found))
               if tuple(np.shape(expected[k])) != tuple(np.shape(found[k]))]
  problems = [f"{label}: {_shown(names)}" for label, names in
              (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
  return f"{context}: " + "; ".join(problems) if problems else None


def _shown(names: list[str], limit: int = 8) -> str:
  """The first ``limit`` names, and how many there are when that is not all of them."""
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_model_arrays(model: nnx.Module, arrays: dict[str, dict[str, Any]], *, context: str,
                      select: Callable[[str], bool] = lambda name: True) -> None:
  """Writes named arrays into ``model`` in place; names outside ``select`` are left untouched.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected or mis-shaped selected tensor.
  """
  for group, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    state = nnx.state(model, variable_type)
    pure = nnx.to_pure_dict(state)
    current = {k: v for k, v in flatten_names(pure).items() if select(k)}
    found = {k: v for k, v in arrays.get(group, {}).items() if select(k)}
    problem = describe_mismatch(current, found, context=f"{context} ({group})")
    if problem:
      raise CheckpointMismatchError(problem)
    for name, value in found.items():
      node = pure
      *parents, leaf = name.split("/")
      for key in parents:
        node = node[int(key) if key not in node and key.isdigit() else key]
      leaf_key = int(leaf) if leaf not in node and leaf.isdigit() else leaf
      node[leaf_key] = jax.numpy.asarray(value, dtype=np.asarray(node[leaf_key]).dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


# --- integrity: digests of the saved bytes ------------------------------------------------------------

DIGESTS = "digests"  # the meta key holding {"item/path/of/array": "sha256:<hex>"}
DAMAGED_SUFFIX = ".damaged"  # a damaged step set aside: not an integer, so Orbax ignores it


def _key_name(entry) -> str:
  for attribute in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _host_copy(value) -> np.ndarray | None:
  """The bytes Orbax writes for ``value`` as one host array; None for Python scalars and for arrays
  split across processes (no process holds them whole; ours are replicated, so none are today)."""
  if not hasattr(value, "dtype"):
    return None
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    if not value.is_fully_replicated:
      return None
    value = value.addressable_data(0)
  return np.ascontiguousarray(np.asarray(value))


def array_digests(items: dict[str, Any]) -> dict[str, str]:
  """SHA-256 of every array of ``{item: pytree}``, named ``item/key/key/...``.

  The names follow the pytree paths, which a restore into the same structure, or without a target
  (nested dicts keyed by the same names), reproduces.
  """
  digests = {}
  for item, tree in items.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      host = _host_copy(leaf)
      if host is not None:
        name = "/".join([item] + [_key_name(entry) for entry in path])
        digests[name] = "sha256:" + hashlib.sha256(host.view(np.uint8).data).hexdigest()  # no copy
  return digests


def with_digests(meta: dict, items: dict[str, Any]) -> dict:
  return dict(meta, **{DIGESTS: array_digests(items)})


def damaged_arrays(items: dict[str, Any], meta: dict) -> list[str] | None:
  """Names of the restored ``items``' arrays that differ from (or lack) their saved digests; None when
  the checkpoint predates digests."""
  saved = meta.get(DIGESTS)
  if saved is None:
    return None
  actual = array_digests(items)
  return sorted(name for name, digest in saved.items()
                if name.split("/")[0] in items and actual.get(name) != digest)


def check_restored(where: str, items: dict[str, Any], meta: dict) -> None:
  """Raises CheckpointDamagedError naming the damaged arrays; warns once for a checkpoint without
  digests (written before they existed), which loads unverified."""
  damaged = damaged_arrays(items, meta)
  if damaged is None:
    logging.warning("%s: checkpoint has no array digests (written before integrity checks); "
                    "loading it unverified", where)
  elif damaged:
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: {len(damaged)} array(s) differ from "
                                 f"the digests saved with them: {_shown(damaged)}")


def restore_verified(manager: ocp.CheckpointManager, step: int, **items) -> dict:
  """``manager.restore`` of ``items`` (``meta`` is added), each array checked against its digest.

  An item may be a function of the step directory returning its restore args (read there first).

  Raises:
    CheckpointDamagedError: naming the step directory and the damaged arrays, or the read error of a
      checkpoint that cannot be read at all (a corrupted index, unparsable JSON).
  """
  where = paths.join(os.fspath(manager.directory), str(step))
  try:
    items = {name: item(where) if callable(item) else item for name, item in items.items()}
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
  except Exception as error:  # pylint: disable=broad-except  # tensorstore, JSON, msgpack: all unreadable
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: cannot be read "
                                 f"({' '.join(str(error).split())[:300]})") from error
  restored = {name: restored[name] for name in ["meta", *items]}
  verifiable = {name: restored[name] for name in items if name != "data"}  # Grain state: JSON, no digest
  if verifiable:
    check_restored(where, verifiable, dict(restored["meta"]))
  return restored


def set_aside(directory: str, step: int) -> str:
  """Renames ``directory/<step>`` to ``<step>.damaged`` (kept for inspection, ignored by Orbax).

  On ``gs://`` a rename is a copy and a delete of every object (etils.epath), slower but equivalent.
  """
  source = paths.join(directory, str(step))
  target, n = source + DAMAGED_SUFFIX, 1
  while paths.exists(target):  # an earlier run set this step aside too
    target, n = f"{source}{DAMAGED_SUFFIX}-{n}", n + 1
  paths.as_path(source).rename(paths.as_path(target))
  return target


# --- storage faults while saving ------------------------------------------------------------------

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports a failed write


def storage_cause(error: BaseException) -> str | None:
  """``[Errno 28] No space left on device`` for an error caused by the file system, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    match = _OS_ERROR_CODE.search(str(error))
    if match:
      return f"[Errno {match.group(1)}] {os.strerror(int(match.group(1)))}"
    error = error.__cause__ or error.__context__
  return None


class _QuietOrbaxTracebacks(logging.logging.Filter):
  """Orbax logs a failed background write with its traceback from several threads; we report it in
  one line (CheckpointSaveError), so its records keep their message and lose the traceback. Once that
  line is out, the other writes of the failed save, still failing in their threads (and asyncio's
  "exception was never retrieved" for them, at exit), are not logged: the error line stays last."""

  failure_reported = False

  def filter(self, record) -> bool:
    if record.name == "asyncio":
      return not _QuietOrbaxTracebacks.failure_reported
    if "/orbax/" not in record.pathname:
      return True
    if record.exc_info and storage_cause(record.exc_info[1]) is not None:
      record.exc_info, record.exc_text = None, None  # other failures keep their tracebacks
    return not _QuietOrbaxTracebacks.failure_reported


def _ignore_closed_event_loop(previous):
  """After a failed write, tensorstore completes the other writes' futures into Orbax's event loop,
  already closed: Python would print each as an 'unraisable' traceback. Only those are dropped."""
  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)
  hook.quiets_closed_event_loop = True
  return hook


def _quiet_failed_writes() -> None:
  for logger in (logging.get_absl_logger(), logging.logging.getLogger("asyncio")):
    if not any(isinstance(f, _QuietOrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_QuietOrbaxTracebacks())
  if not getattr(sys.unraisablehook, "quiets_closed_event_loop", False):
    sys.unraisablehook = _ignore_closed_event_loop(sys.unraisablehook)


@contextlib.contextmanager
def _reporting_storage_faults(directory, on_error: Callable[[CheckpointSaveError], None] = None):
  """Turns a write that failed in the file system (also one of an earlier asynchronous save that
  surfaces now) into CheckpointSaveError naming ``directory`` and the cause; other errors pass."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    cause = storage_cause(error)
    if cause is None:
      raise
    failure = CheckpointSaveError(
        f"{directory}: checkpoint save failed: {cause}. Earlier checkpoints are intact and nothing "
        "of this one is taken for a checkpoint; free space and rerun the same command to resume")
    if on_error is not None:
      on_error(failure)
    _QuietOrbaxTracebacks.failure_reported = True
    raise failure from error


# --- model-only checkpoints (best model, imported PyTorch weights) ----------------------------------

def _manager(directory: str, *, max_to_keep: int | None, asynchronous: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
  # A save killed midway (SIGKILL, OOM, preemption without notice) leaves an
  # ``<step>.orbax-checkpoint-tmp-*`` directory; writers delete those on start so they never pile up
  # or collide with the step being saved again. Readers leave them alone: a writer may own them.
  _quiet_failed_writes()
  # Orbax names its multi-process barriers by step: the latest and best managers saving the same step
  # at once would collide ('Barrier _async_commit_complete.11 is already ongoing') without a prefix.
  prefix = paths.as_path(directory).name
  return ocp.CheckpointManager(
      paths.as_path(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
          cleanup_tmp_directories=not read_only, enable_async_checkpointing=asynchronous,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)))


def save_model_checkpoint(directory: str, model: nnx.Module, meta: dict, *, step: int = 0) -> None:
  """Saves ``model`` (params and BatchNorm stats) with its ``meta`` under ``directory/best/<step>``.

  ``meta`` must hold ``model_config`` (the L2ViT constructor arguments); evaluation also reads
  ``pixel_scale``, ``mass_mean`` and ``mass_std`` from it.
  """
  if "model_config" not in meta:
    raise ValueError("meta must contain 'model_config' (the model's constructor arguments)")
  arrays = model_arrays(model)
  best = paths.join(directory, BEST_DIR)
  with _reporting_storage_faults(best), _manager(best, max_to_keep=1) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(arrays),
        meta=ocp.args.JsonSave(with_digests(meta, {"model": arrays}))), force=True)
    manager.wait_until_finished()


def find_model_checkpoint(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
                          ) -> tuple[str, int]:
  """The (manager directory, step) to restore: by default ``best/`` first, else the latest."""
  for sub in prefer:
    path = paths.join(directory, sub)
    if paths.is_dir(path):
      with _manager(path, max_to_keep=None, read_only=True) as manager:
        step = manager.latest_step()
      if step is not None:
        return path, step
  raise FileNotFoundError(f"{directory}: no Orbax checkpoint found (looked in {BEST_DIR}/ and "
                          f"{LATEST_DIR}/); train with configs/finetune.py or import PyTorch weights "
                          "with scripts/convert_torch_checkpoint.py")


def read_model_checkpoint(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
                          ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """Named arrays and meta of the checkpoint ``find_model_checkpoint`` picks, as host numpy arrays.

  Raises:
    CheckpointDamagedError: the arrays differ from their digests (named), or cannot be read.
  """
  path, step = find_model_checkpoint(directory, prefer)
  with _manager(path, max_to_keep=None, read_only=True) as manager:
    restored = restore_verified(manager, step, model=_restore_as_numpy)
  return dict(restored["model"]), dict(restored["meta"])


def _restore_as_numpy(step_directory: str) -> ocp.args.PyTreeRestore:
  """Restores the ``model`` item's arrays as host numpy, whatever devices and processes saved them.

  Restoring with the saved shardings would name the saving run's devices: a single process reading
  what a multi-host run wrote is refused with 'Topology mismatch'.
  """
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(paths.as_path(paths.join(step_directory, "model"))).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.args.PyTreeRestore(restore_args=as_numpy)


def read_model_meta(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR)) -> dict:
  """Only the meta of the checkpoint ``find_model_checkpoint`` picks (no arrays are read)."""
  path, step = find_model_checkpoint(directory, prefer)
  with _manager(path, max_to_keep=None, read_only=True) as manager:
    return dict(restore_verified(manager, step)["meta"])


def restore_model_checkpoint(directory: str) -> tuple[nnx.Module, dict]:
  """Rebuilds the L2ViT described by the checkpoint's meta and loads its weights, in eval mode."""
  from l2vit_jax import models  # pylint: disable=import-outside-toplevel

  arrays, meta = read_model_checkpoint(directory)
  model = models.L2ViT(**model_kwargs(meta["model_config"]), rngs=nnx.Rngs(0))
  load_model_arrays(model, arrays, context=f"{directory}: checkpoint does not fit the model in its meta")
  model.eval()
  return model, meta


def model_kwargs(model_config: dict) -> dict:
  """Constructor arguments from a JSON model config (dtype travels as a string)."""
  kwargs = dict(model_config)
  if kwargs.get("dtype") in (None, "float32", ""):
    kwargs["dtype"] = None
  else:
    kwargs["dtype"] = jax.numpy.dtype(kwargs["dtype"])
  return kwargs


# --- resumable training checkpoints -----------------------------------------------------------------

def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainingCheckpointer:
  """Latest training states (asynchronous, last ``keep``) and the best model (by validation loss).

  A latest checkpoint holds four items: ``model`` (named params and BatchNorm stats), ``optimizer``
  (optax state and step), ``meta`` (JSON: model config, data normalisation, early-stopping state and
  the arrays' digests) and ``data`` (the Grain iterator state of every process). A save that dies
  midway leaves only an Orbax temporary directory, so the last complete step is what ``restore``
  finds. A save that fails (disk full) raises ``CheckpointSaveError`` once, from whichever call sees
  it first: the asynchronous write's error surfaces at the next save or wait.
  """

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
    self.latest_dir = paths.join(workdir, LATEST_DIR)
    self.latest = _manager(self.latest_dir, max_to_keep=keep, asynchronous=asynchronous)
    self.best = _manager(paths.join(workdir, BEST_DIR), max_to_keep=1, asynchronous=asynchronous)
    self.save_error: CheckpointSaveError | None = None

  def _guard(self, manager: ocp.CheckpointManager):
    return _reporting_storage_faults(os.fspath(manager.directory), on_error=self._failed)

  def _failed(self, error: CheckpointSaveError) -> None:
    self.save_error = self.save_error or error

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, *, model: dict, optimizer: dict, meta: dict, data_iterator) -> None:
    import grain  # pylint: disable=import-outside-toplevel
    meta = with_digests(meta, {"model": model, "optimizer": optimizer})
    with self._guard(self.latest):
      self.latest.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model), optimizer=ocp.args.StandardSave(optimizer),
          meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iterator)),
          force=True)

  def save_best(self, step: int, *, model: dict, meta: dict) -> None:
    # A run killed after saving ``best/<step>`` but before the latest checkpoint of that step resumes
    # earlier and reaches ``step`` again with the same state: replace what it left rather than fail
    # (Orbax refuses an existing step) or keep it (with max_to_keep=1 Orbax would then delete the new,
    # lower step instead).
    with self._guard(self.best):
      for stale in [s for s in self.best.all_steps() if s >= step]:
        self.best.delete(stale)
      self.best.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model),
          meta=ocp.args.JsonSave(with_digests(meta, {"model": model}))), force=True)

  def restore(self, step: int, *, model: dict, optimizer: dict, data_iterator) -> tuple[dict, dict, dict]:
    """Restores into the structures (and shardings) of ``model`` and ``optimizer``; returns them + meta.

    Raises:
      CheckpointDamagedError: an array differs from its digest, or the step cannot be read.
    """
    import grain  # pylint: disable=import-outside-toplevel
    restored = restore_verified(
        self.latest, step, model=ocp.args.StandardRestore(_abstract(model)),
        optimizer=ocp.args.StandardRestore(_abstract(optimizer)),
        data=grain.checkpoint.CheckpointRestore(data_iterator))
    return dict(restored["model"]), restored["optimizer"], dict(restored["meta"])

  def restore_latest(self, *, model: dict, optimizer: dict, data_iterator,
                     check_meta: Callable[[dict], None]) -> tuple[dict, dict, dict] | None:
    """Restores the newest checkpoint that verifies, or returns None when there is none at all.

    ``check_meta(meta)`` runs before any array is read and may refuse the checkpoint (another
    architecture); that is not damage. A damaged step is reported in one warning line naming its
    arrays, set aside as ``<step>.damaged`` (renamed, not deleted) and the next newest tried.

    Raises:
      CheckpointDamagedError: checkpoints existed but none verifies (all of them set aside).
    """
    set_aside_steps = []
    while (step := self.latest.latest_step()) is not None:
      damage = None
      try:
        check_meta(self.read_meta(step))
        restored = self.restore(step, model=model, optimizer=optimizer, data_iterator=data_iterator)
      except CheckpointDamagedError as error:
        damage = error
      if not _any_process(damage is not None):
        return restored
      target = self._set_aside(step)
      logging.warning("%s; set aside as %s, resuming from an older checkpoint if one verifies",
                      damage or f"{self.latest_dir}/{step}: damaged as read by another process", target)
      set_aside_steps.append(step)
    if set_aside_steps:
      raise CheckpointDamagedError(
          f"{self.latest_dir}: no checkpoint verifies: step(s) {', '.join(map(str, set_aside_steps))} "
          f"are damaged and were set aside as <step>{DAMAGED_SUFFIX}; rerunning starts from step 0 "
          "(or put back a good copy)")
    return None

  def _set_aside(self, step: int) -> str:
    """Process 0 renames the step; every process then sees it gone (the managers cache step lists)."""
    target = paths.join(self.latest_dir, f"{step}{DAMAGED_SUFFIX}")
    if jax.process_index() == 0:
      target = set_aside(self.latest_dir, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.latest.reload()
    return target

  def read_meta(self, step: int) -> dict:
    return dict(restore_verified(self.latest, step)["meta"])

  def wait_until_finished(self) -> None:
    """Waits for saves under way; a failed one raises CheckpointSaveError (once: Orbax re-raises a
    failed save's error at every later wait, and the run stops at the first)."""
    for manager in (self.latest, self.best):
      self._once(manager, manager.wait_until_finished)

  def close(self) -> None:
    for manager in (self.latest, self.best):
      self._once(manager, manager.close)

  def _once(self, manager: ocp.CheckpointManager, call: Callable[[], None]) -> None:
    try:
      with self._guard(manager):
        call()
    except CheckpointSaveError as error:
      if error is self.save_error:  # the first report of a failure; later ones repeat it
        raise


def _any_process(damaged: bool) -> bool:
  """Single process: ``damaged``. Several: whether any process found the checkpoint damaged, so all
  set it aside and fall back together (a process that found it intact still must)."""
  if jax.process_count() == 1:
    return damaged
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.int32(damaged))))


# --- one run per workdir ----------------------------------------------------------------------------

class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """``WORKDIR/lock``: created atomically by the one process writing a workdir (``O_CREAT | O_EXCL``
  locally; on ``gs://`` an upload with the precondition ``ifGenerationMatch=0``, see ``paths``).

  It holds ``{"host", "pid", "since"}``. Two runs on one workdir would interleave checkpoints and
  metrics, so a second run is refused with the holder named. A lock left by a killed run (SIGKILL, OOM,
  power loss) is stale when its host is this host and its pid is gone: it is taken over with a warning.
  A lock from another host cannot be checked from here; it is refused, and the message says to delete
  the file if that run is known to be dead. ``release`` removes the file only if it is still ours.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def _read_holder(self) -> dict | None:
    try:
      return json.loads(paths.read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # being written right now, or garbage: treated as held by an unknown run

  def _try_create(self) -> bool:
    holder = dict(self.owner, since=time.strftime("%Y-%m-%d %H:%M:%S"))
    return paths.create_exclusive(self.path, json.dumps(holder).encode())

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLockedError naming the holder."""
    for _ in range(3):  # a takeover can race with another starting run; the exclusive create decides
      if self._try_create():
        self.held = True
        return
      holder = self._read_holder()
      if holder is None:
        continue  # released between our attempt and the read
      same_host = holder.get("host") == self.owner["host"]
      pid = holder.get("pid")
      if same_host and isinstance(pid, int) and pid != self.owner["pid"] and not paths.process_alive(pid):
        logging.warning("%s: taking over a stale lock of process %d on %s (started %s), which is no "
                        "longer running (killed?)", self.path, pid, holder.get("host"), holder.get("since"))
        paths.remove(self.path)
        continue
      who = (f"process {pid} on host {holder.get('host')} (started {holder.get('since')})" if holder
             else "an unknown run (unreadable lock file)")
      hint = "" if same_host and holder else "; if that run is dead, delete the lock file"
      raise WorkdirLockedError(f"{self.workdir}: workdir is in use by {who}; use another "
                               f"--workdir or wait for it to finish (lock: {self.path}{hint})")
    raise WorkdirLockedError(f"{self.path}: could not take the workdir lock (contended); try again")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    holder = self._read_holder()
    if holder and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
      paths.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
