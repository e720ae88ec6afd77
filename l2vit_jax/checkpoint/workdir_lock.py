"""One run per workdir: ``WORKDIR/lock``, taken by process 0 before anything is written."""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging

from l2vit_jax.errors import WorkdirLockedError
from l2vit_jax.runtime import paths

LOCK_FILE = "lock"


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


def lock_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 takes ``WORKDIR/lock``; every process learns whether it did, so all stop together."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = WorkdirLockedError(
          f"{workdir}: process 0 could not lock this workdir (another run is using it)")
  if error is not None:
    raise error
  return lock
