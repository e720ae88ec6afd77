"""Orbax checkpoint managers, and write failures (a full disk) reported in one line.

Writing errors become one ``CheckpointSaveError`` naming the directory and the cause; Orbax's own
tracebacks and log chatter about the failed write are kept below that line, so the error stays last.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable

import orbax.checkpoint as ocp
from absl import logging

from l2vit_jax.errors import CheckpointSaveError
from l2vit_jax.runtime import paths

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
def reporting_storage_faults(directory, on_error: Callable[[CheckpointSaveError], None] = None):
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

def open_manager(directory: str, *, max_to_keep: int | None, asynchronous: bool = False,
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
