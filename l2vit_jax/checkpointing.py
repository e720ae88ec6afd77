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
"""

from __future__ import annotations

import json
import os
import socket
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
  problems = []
  for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if names:
      shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
      problems.append(f"{label}: {shown}")
  return f"{context}: " + "; ".join(problems) if problems else None


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


# --- model-only checkpoints (best model, imported PyTorch weights) ----------------------------------

def _manager(directory: str, *, max_to_keep: int | None, asynchronous: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
  # A save killed midway (SIGKILL, OOM, preemption without notice) leaves an
  # ``<step>.orbax-checkpoint-tmp-*`` directory; writers delete those on start so they never pile up
  # or collide with the step being saved again. Readers leave them alone: a writer may own them.
  return ocp.CheckpointManager(
      paths.as_path(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only, cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=asynchronous))


def save_model_checkpoint(directory: str, model: nnx.Module, meta: dict, *, step: int = 0) -> None:
  """Saves ``model`` (params and BatchNorm stats) with its ``meta`` under ``directory/best/<step>``.

  ``meta`` must hold ``model_config`` (the L2ViT constructor arguments); evaluation also reads
  ``pixel_scale``, ``mass_mean`` and ``mass_std`` from it.
  """
  if "model_config" not in meta:
    raise ValueError("meta must contain 'model_config' (the model's constructor arguments)")
  with _manager(paths.join(directory, BEST_DIR), max_to_keep=1) as manager:
    manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model_arrays(model)),
                                               meta=ocp.args.JsonSave(meta)), force=True)
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
  """Named arrays and meta of the checkpoint ``find_model_checkpoint`` picks, as host numpy arrays."""
  path, step = find_model_checkpoint(directory, prefer)
  with _manager(path, max_to_keep=None, read_only=True) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
  arrays = jax.tree.map(np.asarray, dict(restored["model"]))
  return arrays, dict(restored["meta"])


def read_model_meta(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR)) -> dict:
  """Only the meta of the checkpoint ``find_model_checkpoint`` picks (no arrays are read)."""
  path, step = find_model_checkpoint(directory, prefer)
  with _manager(path, max_to_keep=None, read_only=True) as manager:
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


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
  (optax state and step), ``meta`` (JSON: model config, data normalisation, early-stopping state) and
  ``data`` (the Grain iterator state of every process). A save that dies midway leaves only an Orbax
  temporary directory, so the last complete step is what ``restore`` finds.
  """

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
    self.latest = _manager(paths.join(workdir, LATEST_DIR), max_to_keep=keep,
                           asynchronous=asynchronous)
    self.best = _manager(paths.join(workdir, BEST_DIR), max_to_keep=1, asynchronous=asynchronous)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, *, model: dict, optimizer: dict, meta: dict, data_iterator) -> None:
    import grain  # pylint: disable=import-outside-toplevel
    self.latest.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), optimizer=ocp.args.StandardSave(optimizer),
        meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def save_best(self, step: int, *, model: dict, meta: dict) -> None:
    # A run killed after saving ``best/<step>`` but before the latest checkpoint of that step resumes
    # earlier and reaches ``step`` again with the same state: replace what it left rather than fail
    # (Orbax refuses an existing step) or keep it (with max_to_keep=1 Orbax would then delete the new,
    # lower step instead).
    for stale in [s for s in self.best.all_steps() if s >= step]:
      self.best.delete(stale)
    self.best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                 meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, *, model: dict, optimizer: dict, data_iterator) -> tuple[dict, dict, dict]:
    """Restores into the structures (and shardings) of ``model`` and ``optimizer``; returns them + meta."""
    import grain  # pylint: disable=import-outside-toplevel
    restored = self.latest.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(model)),
        optimizer=ocp.args.StandardRestore(_abstract(optimizer)),
        meta=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return dict(restored["model"]), restored["optimizer"], dict(restored["meta"])

  def read_meta(self, step: int) -> dict:
    return dict(self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


# --- one run per workdir ----------------------------------------------------------------------------

class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


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
      if same_host and isinstance(pid, int) and pid != self.owner["pid"] and not _process_alive(pid):
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
