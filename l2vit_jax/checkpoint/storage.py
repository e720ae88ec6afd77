"""Orbax checkpoint managers, and storage faults: failed writes (a full disk) reported in one line,
failed reads (a GCS outage) told apart from damaged checkpoints and retried.

Writing errors become one ``CheckpointSaveError`` naming the directory and the cause; Orbax's own
tracebacks and log chatter about the failed write are kept below that line, so the error stays last.
A read that fails in the storage itself (``read_failure``) says nothing about the checkpoint: it is
retried (``read_retrying``) and then reported as ``StorageError`` with every file left where it is;
only errors of the bytes read (undecodable, missing, digests that differ) count as damage.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import re
import sys
import time
from typing import Callable

import orbax.checkpoint as ocp
from absl import logging

from l2vit_jax import errors
from l2vit_jax.errors import CheckpointSaveError, StorageError
from l2vit_jax.runtime import paths

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports a failed OS call
# tensorstore reports a failed read with the absl status code first ("UNAVAILABLE: Error reading ...",
# also after a "while ...: " prefix); a status of the storage, not of the bytes. (Undecodable data is
# FAILED_PRECONDITION, INVALID_ARGUMENT or DATA_LOSS; a missing file NOT_FOUND: damage.)
_STORAGE_STATUS = re.compile(
  r"(?:^|: )(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED|"
  r"PERMISSION_DENIED|UNAUTHENTICATED): "
)
# Exception classes (or their bases) of the clients under gcsfs and google-cloud: gcsfs's HttpError and
# ChecksumError, requests' and aiohttp's client errors, google-auth's TransportError, api_core's.
_STORAGE_ERROR_TYPES = {
  "HttpError",
  "ChecksumError",
  "RequestException",
  "ClientError",
  "TransportError",
  "RefreshError",
  "ServerError",
  "TooManyRequests",
  "Forbidden",
  "Unauthorized",
  "DeadlineExceeded",
  "RetryError",
}
# Errors of the file system or the network, not of the file's bytes. EIO (a bad block) is among them:
# a flaky disk is reported and retried, never costs a checkpoint.
_STORAGE_ERRNOS = {
  errnos.EIO,
  errnos.EAGAIN,
  errnos.EINTR,
  errnos.ETIMEDOUT,
  errnos.ECONNRESET,
  errnos.ECONNREFUSED,
  errnos.ECONNABORTED,
  errnos.EHOSTUNREACH,
  errnos.ENETUNREACH,
  errnos.ENETDOWN,
  errnos.ESTALE,
  errnos.EACCES,
  errnos.EPERM,
  errnos.EMFILE,
  errnos.ENFILE,
}
# A read failing in the storage is tried this often, waiting RETRY_SECONDS * 2**attempt in between
# (GCS asks clients to back off exponentially; gcsfs has already retried each request by then).
READ_ATTEMPTS = 3
RETRY_SECONDS = 2.0


def _chain(error: BaseException):
  """``error`` and its causes and contexts, each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _os_errno(error: BaseException) -> int | None:
  """The OS error number of ``error``: an OSError's, or tensorstore's ``os_error_code``."""
  if isinstance(error, OSError) and error.errno:
    return error.errno
  match = _OS_ERROR_CODE.search(str(error))
  return int(match.group(1)) if match else None


def storage_cause(error: BaseException) -> str | None:
  """``[Errno 28] No space left on device`` for an error caused by the file system, else None."""
  for link in _chain(error):
    number = _os_errno(link)
    if number:
      return f"[Errno {number}] {os.strerror(number)}"
  return None


def _http_status(error: BaseException) -> int | None:
  for attribute in ("code", "status", "status_code"):  # gcsfs, aiohttp, requests / api_core
    value = getattr(error, attribute, None)
    if isinstance(value, int) and 100 <= value < 600:
      return value
  return None


def read_failure(error: BaseException) -> BaseException | None:
  """The error in ``error``'s chain that comes from the storage (network, service, permissions, I/O),
  not from the bytes it returned; None when the chain holds none."""
  for link in _chain(error):
    if isinstance(link, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
      continue  # a file of the checkpoint is missing: damage, unless a cause says otherwise
    status = _http_status(link)
    if status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429):
      continue  # the service answered about the object (404 is a missing file): not an outage
    if isinstance(link, (ConnectionError, TimeoutError, PermissionError)):
      return link
    if type(link) is OSError and link.errno is None:  # gcsfs's HTTP errors (403 "Forbidden", ...)
      return link
    if _os_errno(link) in _STORAGE_ERRNOS:
      return link
    if any(cls.__name__ in _STORAGE_ERROR_TYPES for cls in type(link).__mro__):
      return link
    if _STORAGE_STATUS.search(str(link)):
      return link
  return None


# What a read raises for bytes that are there but wrong, or missing: the evidence that sets a step
# aside. tensorstore's status codes for undecodable or missing data; the JSON and msgpack decoders'.
_DAMAGE_STATUS = re.compile(
  r"(?:^|: )(DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|NOT_FOUND|OUT_OF_RANGE): "
)
_DAMAGE_ERROR_TYPES = {
  "JSONDecodeError",
  "UnicodeDecodeError",
  "EOFError",
  "FileNotFoundError",
  "NotADirectoryError",
  "IsADirectoryError",
  "ExtraData",
  "FormatError",
  "OutOfData",
  "StackError",
  "UnpackValueError",
  "BadZipFile",
  "error",
}  # zlib.error is "error"


def damage_evidence(error: BaseException) -> BaseException | None:
  """The error in ``error``'s chain that shows the checkpoint's bytes are wrong or missing (undecodable
  JSON, msgpack or array chunks; a missing file); None when there is none: a read that failed for
  another reason (memory, a bug, a library version) says nothing about the checkpoint, which is then
  refused but kept."""
  for link in _chain(error):
    if any(cls.__name__ in _DAMAGE_ERROR_TYPES for cls in type(link).__mro__[:1]) or _DAMAGE_STATUS.search(
      str(link)
    ):
      return link
  return None


def one_line(error: BaseException, limit: int = 300) -> str:
  """``Type: message`` of ``error`` on one line, cut to ``limit`` characters."""
  return errors.one_line(f"{type(error).__name__}: {error}", limit)


def read_retrying(where: str, read):
  """``read()``, tried up to READ_ATTEMPTS times while it fails in the storage (``read_failure``).

  Raises:
    StorageError: the storage failed every attempt, naming ``where`` and the last cause.
    Anything else ``read`` raises, at once.
  """
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except Exception as error:  # pylint: disable=broad-except
      cause = read_failure(error)
      if cause is None:
        raise
      if attempt + 1 == READ_ATTEMPTS:
        raise StorageError(
          f"{where}: the storage failed {READ_ATTEMPTS} reads of this checkpoint "
          f"({one_line(cause)}); nothing was changed or set aside: rerun the same "
          "command once the storage answers"
        ) from error
      logging.warning("%s: reading failed in the storage (%s); retrying", where, one_line(cause, 200))
      time.sleep(RETRY_SECONDS * 2**attempt)
  raise AssertionError("unreachable")


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
      "of this one is taken for a checkpoint; free space and rerun the same command to resume"
    )
    if on_error is not None:
      on_error(failure)
    _QuietOrbaxTracebacks.failure_reported = True
    raise failure from error


def open_manager(
  directory: str, *, max_to_keep: int | None, asynchronous: bool = False, read_only: bool = False
) -> ocp.CheckpointManager:
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
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=asynchronous,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix),
    ),
  )
