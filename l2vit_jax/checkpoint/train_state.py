"""Resumable training checkpoints: latest states (asynchronous, the last ``keep``) and the best model."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from l2vit_jax.checkpoint import integrity, storage
from l2vit_jax.checkpoint.naming import BEST_DIR, LATEST_DIR, shown_names
from l2vit_jax.errors import (
  CheckpointDamagedError,
  CheckpointMismatchError,
  CheckpointSaveError,
  StorageError,
)
from l2vit_jax.runtime import paths

DATA_ITEM = "data"  # Grain's iterator state, one JSON file per process


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
    self.latest = storage.open_manager(self.latest_dir, max_to_keep=keep, asynchronous=asynchronous)
    self.best = storage.open_manager(paths.join(workdir, BEST_DIR), max_to_keep=1, asynchronous=asynchronous)
    self.save_error: CheckpointSaveError | None = None

  def _guard(self, manager: ocp.CheckpointManager):
    return storage.reporting_storage_faults(os.fspath(manager.directory), on_error=self._failed)

  def _failed(self, error: CheckpointSaveError) -> None:
    self.save_error = self.save_error or error

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, *, model: dict, optimizer: dict, meta: dict, data_iterator) -> None:
    import grain  # pylint: disable=import-outside-toplevel

    meta = integrity.with_digests(meta, {"model": model, "optimizer": optimizer})
    with self._guard(self.latest):
      self.latest.save(
        step,
        args=ocp.args.Composite(
          model=ocp.args.StandardSave(model),
          optimizer=ocp.args.StandardSave(optimizer),
          meta=ocp.args.JsonSave(meta),
          data=grain.checkpoint.CheckpointSave(data_iterator),
        ),
        force=True,
      )

  def save_best(self, step: int, *, model: dict, meta: dict) -> None:
    # A run killed after saving ``best/<step>`` but before the latest checkpoint of that step resumes
    # earlier and reaches ``step`` again with the same state: replace what it left rather than fail
    # (Orbax refuses an existing step) or keep it (with max_to_keep=1 Orbax would then delete the new,
    # lower step instead).
    with self._guard(self.best):
      for stale in [s for s in self.best.all_steps() if s >= step]:
        self.best.delete(stale)
      self.best.save(
        step,
        args=ocp.args.Composite(
          model=ocp.args.StandardSave(model),
          meta=ocp.args.JsonSave(integrity.with_digests(meta, {"model": model})),
        ),
        force=True,
      )

  def _restore_arrays(self, step: int, meta: dict, *, model: dict, optimizer: dict) -> tuple[dict, dict]:
    """``model`` and ``optimizer`` of ``step``, verified. A step whose digests name other arrays than
    the targets hold was written by a version that built another structure (an optimizer state of
    another optax): a mismatch, refused before reading, not damage."""
    # Only the optimizer's structure can differ legitimately: the model's follows the architecture,
    # which check_meta compared, so digests naming other model arrays are damage (found below).
    differing = integrity.structure_differences({"optimizer": optimizer}, meta)
    if (
      differing
      and integrity.structure_differences({"model": model}, meta) == []
      and any(name.startswith("optimizer/") for name in meta.get(integrity.DIGESTS, {}))
    ):
      raise CheckpointMismatchError(
        f"{self.latest_dir}/{step}: holds other arrays than this version of the code restores into "
        f"({len(differing)} differ: {shown_names(differing)}); it was written by another version of "
        "l2vit_jax or its libraries: resume with that version, or use a new --workdir"
      )
    restored = integrity.restore_verified(
      self.latest,
      step,
      model=ocp.args.StandardRestore(_abstract(model)),
      optimizer=ocp.args.StandardRestore(_abstract(optimizer)),
    )
    return dict(restored["model"]), restored["optimizer"]

  def _restore_data(self, step: int, meta: dict, data_iterator) -> None:
    """Sets ``data_iterator`` to the saved input position (Grain's state, JSON with no digest).

    A state that decodes as JSON yet does not fit the iterator comes from another pipeline layout
    (Grain raises KeyError for another worker count; the loop's ``check_meta`` names the setting for
    checkpoints that record their layout) or another Grain version: refused as a mismatch, and kept.
    Only a state that cannot be read or decoded is damage.
    """
    import grain  # pylint: disable=import-outside-toplevel

    where = paths.join(self.latest_dir, str(step), DATA_ITEM)
    try:
      storage.read_retrying(
        where,
        lambda: self.latest.restore(
          step, args=ocp.args.Composite(**{DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator)})
        ),
      )
    except StorageError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      if not storage.read_retrying(where, lambda: _json_files_decode(where)):
        raise CheckpointDamagedError(
          f"{where}: damaged checkpoint: the input position cannot be read ({storage.one_line(error)})"
        ) from error
      raise CheckpointMismatchError(
        f"{where}: the saved input position does not fit this run's input pipeline "
        f"({storage.one_line(error, 120)}); resume with the settings and Grain version the run was "
        "started with (config.data.worker_count, config.batch_size, the number of processes) or use a "
        "new --workdir"
      ) from error

  def restore_latest(
    self, *, model: dict, optimizer: dict, data_iterator, check_meta: Callable[[dict], None]
  ) -> tuple[dict, dict, dict] | None:
    """Restores the newest checkpoint that verifies, or returns None when there is none at all.

    ``check_meta(meta)`` runs before any array is read and may refuse the checkpoint (another
    architecture); that is not damage. A damaged step is reported in one warning line naming its
    arrays, set aside as ``<step>.damaged`` (renamed, not deleted) and the next newest tried.

    Only damage sets a step aside. A step refused for another reason on any process (``check_meta``,
    another structure, an input position of another layout, a storage that keeps failing) stops every
    process with that error and leaves every checkpoint as it is. Several processes agree on the
    outcome after each read (the meta, the arrays, the input position): Orbax's restores end in a
    collective barrier, which a process must not enter while another has given up on the step.

    Raises:
      CheckpointDamagedError: checkpoints existed but none verifies (all of them set aside).
      CheckpointMismatchError, StorageError: as above.
    """
    set_aside_steps = []
    while (step := self.latest.latest_step()) is not None:
      found = {}
      phases = (
        ("meta", lambda step, found: self.read_meta(step)),
        ("checked", lambda step, found: check_meta(found["meta"])),
        (
          "arrays",
          lambda step, found: self._restore_arrays(step, found["meta"], model=model, optimizer=optimizer),
        ),
        ("data", lambda step, found: self._restore_data(step, found["meta"], data_iterator)),
      )
      for name, phase in phases:
        damage = refusal = None
        try:
          found[name] = phase(step, found)
        except CheckpointDamagedError as error:
          if error.proven:
            damage = error
          else:
            refusal = error
        except Exception as error:  # pylint: disable=broad-except  # a mismatch, the storage: not damage
          refusal = error
        outcome = _worst_outcome(_DAMAGED if damage else _REFUSED if refusal else _RESTORED)
        if outcome not in (_RESTORED, _DAMAGED):  # every process stops, the checkpoints left as they are
          if refusal is not None:
            raise refusal
          raise StorageError(
            f"{self.latest_dir}/{step}: another process could not restore this "
            "checkpoint (its error is in that process's log); nothing was changed"
          )
        if outcome == _DAMAGED:
          break
      else:
        return (*found["arrays"], found["meta"])
      target = self._set_aside(step)
      logging.warning(
        "%s; set aside as %s, resuming from an older checkpoint if one verifies",
        damage or f"{self.latest_dir}/{step}: damaged as read by another process",
        target,
      )
      set_aside_steps.append(step)
    if set_aside_steps:
      raise CheckpointDamagedError(
        f"{self.latest_dir}: no checkpoint verifies: step(s) {', '.join(map(str, set_aside_steps))} "
        f"are damaged and were set aside as <step>{integrity.DAMAGED_SUFFIX}; rerunning starts from step 0 "
        "(or put back a good copy)"
      )
    return None

  def _set_aside(self, step: int) -> str:
    """Process 0 renames the step; every process then sees it gone (the managers cache step lists)."""
    target = paths.join(self.latest_dir, f"{step}{integrity.DAMAGED_SUFFIX}")
    if jax.process_index() == 0:
      target = integrity.set_aside(self.latest_dir, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.latest.reload()
    return target

  def read_meta(self, step: int) -> dict:
    return dict(integrity.restore_verified(self.latest, step)["meta"])

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


_RESTORED, _DAMAGED, _REFUSED = 0, 1, 2  # outcomes of one restore, in order of precedence


def _worst_outcome(outcome: int) -> int:
  """Single process: ``outcome``. Several: the worst of every process's, so all act together: all set
  a damaged step aside and fall back (a process that found it intact still must), and all stop when
  any refused it (a mismatch, the storage) rather than one process falling back alone."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _json_files_decode(directory: str) -> bool:
  """Whether ``directory`` holds JSON files and every one of them decodes. A read failing in the
  storage raises (``storage.read_retrying`` retries it): it decides nothing about the files."""
  try:
    files = [f for f in paths.as_path(directory).iterdir() if f.name.endswith(".json")]
    for file in files:
      json.loads(file.read_text())
  except (OSError, ValueError) as error:
    if storage.read_failure(error) is not None:
      raise
    return False
  return bool(files)
