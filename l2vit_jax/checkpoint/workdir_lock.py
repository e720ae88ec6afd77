"""One run per workdir: ``WORKDIR/lock``, a lease taken by process 0 before anything is written.

Two runs on one workdir would interleave checkpoints and metrics, so a second run is refused with the
holder named. A run that dies without releasing the lock (SIGKILL, OOM, a preempted Spot VM recreated
on a new host) must not keep the workdir locked, yet a run on another host cannot be asked whether it
is alive. So the lock is a lease: the holder rewrites it every ``lease / 4`` seconds, and a lock not
refreshed for ``lease`` seconds is stale and is taken over with one warning naming the old holder.

* The lease: ``L2VIT_LOCK_LEASE_SECONDS`` (default ``DEFAULT_LEASE_SECONDS`` = 120 s). The holder
  writes its own lease into the file, and a taker judges by that one.
* Staleness compares the holder's wall clock (``refreshed``) with the taker's: hosts are assumed to
  agree to well within the lease (NTP, as on every cloud VM). A clock running ahead on the holder only
  delays a takeover; a taker's clock 120 s ahead would take over early.
* A lock of this very machine and PID namespace whose process is gone is stale at once (no need to
  wait for the lease). "This machine" is the host name *and* the kernel's boot id *and* the PID
  namespace: two containers with one host name (or one host before and after a reboot) cannot see
  each other's processes, so there a holder is only judged by its lease. Lock files without a
  ``refreshed`` field (older versions) or that cannot be parsed never expire: they are refused with a
  hint to delete the file.

Race-freedom, i.e. of any number of runs that find the same stale lock, exactly one wins, and the holder
never writes over a lock it has lost:

* locally, the holder keeps its lock file open (so its inode number cannot be reused) and refreshes it
  in place, only while ``WORKDIR/lock`` is still that inode. Takers serialise on ``flock`` of the
  workdir directory itself (nothing is left behind in it; held only during a takeover, released by the
  kernel if a taker dies), re-read the lock, rename the stale file to a unique name, check that they moved the
  very file they judged (else put it back), and then create the lock with ``O_EXCL`` like a fresh run;
* on ``gs://`` every write is conditional on the object's generation (``runtime.paths``): a fresh run
  creates with ``ifGenerationMatch=0``, the holder refreshes with ``ifGenerationMatch=<its generation>``
  (a 412 means it lost the lock), and a taker replaces the stale generation it read with
  ``ifGenerationMatch=<that generation>``, one request that only one taker can win.

A holder that finds its lock taken over (it was frozen, or cut off from the storage, for longer than
the lease) records who has it in ``lost``. The refresher survives any error; a holder whose last
successful refresh is older than the lease, or whose refresher died, counts as having lost the lock
too (another run may take it over at any moment). The training loop asks ``check`` (in memory) before
every metrics row and ``confirm_held`` (asking the storage too) before every checkpoint, and stops
without writing anything once either fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from l2vit_jax.errors import ConfigError, WorkdirLockedError
from l2vit_jax.runtime import paths

LOCK_FILE = "lock"
LEASE_VARIABLE = "L2VIT_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0
LOCK_BYTES = 512  # the local lock is rewritten in place with this many bytes: never a shorter tail
GUARD_WAIT_SECONDS = 10.0
# A holder stops writing once its last successful refresh is this fraction of the lease old: a taker
# may take over at a whole lease, and a write that starts just before must not end after it.
HELD_FRACTION = 0.75


def _clock() -> float:
  """Seconds on a clock that keeps counting while the machine is suspended (CLOCK_BOOTTIME, where
  there is one): a takeover during a laptop's or VM's suspend must age the holder's lease too."""
  return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def lease_seconds() -> float:
  """The lease from ``L2VIT_LOCK_LEASE_SECONDS`` (default 120 s); ConfigError for a bad value."""
  text = os.environ.get(LEASE_VARIABLE, "").strip()
  if not text:
    return DEFAULT_LEASE_SECONDS
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not value > 0 or value == float("inf"):
    raise ConfigError(f"{LEASE_VARIABLE}={text!r}: expected a positive number of seconds")
  return value


machine_identity = paths.machine_identity  # the lock judges a holder's PID by it


def _token(data: bytes) -> str | None:
  """The ``token`` of a lock file's bytes; None when they do not parse."""
  try:
    holder = json.loads(data)
  except ValueError:
    return None
  return holder.get("token") if isinstance(holder, dict) else None


def describe(holder: dict) -> str:
  return (
    f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('since')})"
    if holder
    else "an unknown run (unreadable lock file)"
  )


class _LocalLockFile:
  """``WORKDIR/lock`` on a local (or network) file system; see the module docstring."""

  def __init__(self, path: str):
    self.path = path
    self._fd = None  # our lock file, open for as long as we hold it

  def read(self):
    """(bytes, version) or None; the version is (device, inode)."""
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return None
    try:
      status = os.fstat(fd)
      chunks = []
      while chunk := os.read(fd, 65536):
        chunks.append(chunk)
      return b"".join(chunks), (status.st_dev, status.st_ino)
    finally:
      os.close(fd)

  def create(self, data: bytes) -> bool:
    """Creates the lock holding ``data`` if there is none: written under a unique name first, then
    hard-linked to ``lock`` (``link`` fails if the name exists, like ``O_EXCL``), so the lock never
    exists empty or half-written, not even when this process dies in between."""
    draft = f"{self.path}.new-{uuid.uuid4().hex}"
    fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
      os.pwrite(fd, data, 0)
      os.link(draft, self.path)
    except FileExistsError:
      os.close(fd)
      return False
    except BaseException:
      os.close(fd)
      raise
    finally:
      os.remove(draft)
    self._fd = fd
    return True

  def _ours_at_path(self) -> bool:
    """Whether ``lock`` names the file we hold open (whose inode number cannot be reused meanwhile)."""
    try:
      status = os.stat(self.path)
    except FileNotFoundError:
      return False
    mine = os.fstat(self._fd)
    return (status.st_dev, status.st_ino) == (mine.st_dev, mine.st_ino)

  def refresh(self, data: bytes) -> bool:
    """Rewrites our file in place if the path still names it. A takeover between the check and the
    write only lets us write into our own, renamed file."""
    if self._fd is None or not self._ours_at_path():
      return False
    os.pwrite(self._fd, data, 0)
    return True

  def still_ours(self) -> bool:
    return self._fd is not None and self._ours_at_path()

  def _move_aside_if(self, version) -> bool:
    """Renames the lock away if it is the file ``version``; puts anything else back. True if moved."""
    aside = f"{self.path}.stale-{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    status = os.stat(aside)
    if (status.st_dev, status.st_ino) == version:
      os.remove(aside)
      return True
    try:  # someone else's lock, created since we looked: back under its name unless one is there
      os.link(aside, self.path)
    except FileExistsError:
      pass
    os.remove(aside)
    return False

  def take_over(self, stale: tuple[bytes, tuple], data: bytes) -> bool:
    """Replaces the stale lock ``stale`` = (bytes, version) by ours; False if it changed meanwhile."""
    # flock(2) of the workdir directory: a guard file would stay behind in the workdir.
    guard = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
    try:
      deadline = time.monotonic() + GUARD_WAIT_SECONDS
      while True:
        try:
          fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if time.monotonic() > deadline:  # a taker frozen inside: refuse rather than wait forever
            return False
          time.sleep(0.01)
      if self.read() != stale or not self._move_aside_if(stale[1]):
        return False
      return self.create(data)
    finally:
      os.close(guard)  # releases the flock

  def release(self) -> None:
    if self._fd is None:
      return
    mine = os.fstat(self._fd)
    try:
      if self._ours_at_path():
        self._move_aside_if((mine.st_dev, mine.st_ino))
    finally:
      os.close(self._fd)
      self._fd = None


class _RemoteLockFile:
  """``gs://.../lock``: every write conditional on the object's generation (``runtime.paths``)."""

  def __init__(self, path: str):
    self.path = path
    self._generation = None  # of our lock object, while we hold it

  def read(self):
    return paths.read_generation(self.path)

  def _write(self, data: bytes, generation: int) -> bool:
    """Writes ``data`` if the object is at ``generation``. A precondition failure can also mean that
    our own write went through and the client retried it (gcsfs retries a request whose answer was
    lost), or that an earlier write of ours went through although it raised: if the object carries our
    token, it is ours, at whatever generation it now has."""
    written = paths.write_if_generation(self.path, data, generation)
    if written is None:
      current = self.read()
      if current is not None and _token(current[0]) == _token(data):
        written = current[1]
    self._generation = written
    return written is not None

  def create(self, data: bytes) -> bool:
    return self._write(data, 0)

  def refresh(self, data: bytes) -> bool:
    return self._generation is not None and self._write(data, self._generation)

  def still_ours(self) -> bool:
    current = self.read()
    return self._generation is not None and current is not None and current[1] == self._generation

  def take_over(self, stale: tuple[bytes, int], data: bytes) -> bool:
    return self._write(data, stale[1])

  def release(self) -> None:
    """Deletes our generation only (the precondition decides; the read first spares a request that
    would fail, and keeps emulators that ignore preconditions on deletes from removing a taker's lock)."""
    if self._generation is not None and self.still_ours():
      paths.remove_if_generation(self.path, self._generation)
    self._generation = None


class WorkdirLock:
  """``WORKDIR/lock`` held by one process, refreshed from a daemon thread while held.

  The file holds ``{"host", "pid", "since", "refreshed", "lease_seconds", "refreshes", "token"}``;
  ``token`` is unique to this lock object, so "ours" never rests on a host name and pid alone.
  ``acquire`` raises WorkdirLockedError naming a live holder; ``release`` removes the file only if it
  is still ours. ``lost``: None while held, else why this run must not write any more (who took the
  lock over, or why another run may).
  """

  def __init__(self, workdir: str, *, lease: float | None = None):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self.lease = lease_seconds() if lease is None else float(lease)
    self.owner = dict(machine_identity(), pid=os.getpid())
    self.held = False
    self.lost: str | None = None
    self._file = _RemoteLockFile(self.path) if paths.is_remote(self.path) else _LocalLockFile(self.path)
    self._token = uuid.uuid4().hex
    self._since = time.strftime("%Y-%m-%d %H:%M:%S")
    self._refreshes = 0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._file_lock = threading.Lock()  # the refresher against release
    self._last_refresh = 0.0  # _clock() when the last write that proved the lock ours began
    self._last_refresh_wall = 0.0  # and time.time() then: what a taker compares with (its "refreshed")

  def _content(self) -> bytes:
    holder = dict(
      self.owner,
      since=self._since,
      refreshed=round(time.time(), 3),
      lease_seconds=self.lease,
      refreshes=self._refreshes,
      token=self._token,
    )
    text = json.dumps(holder)
    return (text + " " * max(LOCK_BYTES - 1 - len(text), 0) + "\n").encode()

  def _read_holder(self):
    """(holder dict, raw state) of the current lock, or None if there is none. ``{}``: unparsable.
    A parse failure is retried briefly: a reader may catch a local refresh mid-write."""
    for attempt in range(3):
      state = self._file.read()
      if state is None:
        return None
      try:
        holder = json.loads(state[0])
        return (holder if isinstance(holder, dict) else {}), state
      except ValueError:
        if attempt < 2:
          time.sleep(0.02)
    return {}, state

  def _same_machine(self, holder: dict) -> bool:
    """Whether ``holder`` ran on this kernel, this boot, in this PID namespace, so that its PID means
    here what it meant there (a lock of an older version, without those fields, never does)."""
    return all(
      self.owner[key] is not None and holder.get(key) == self.owner[key]
      for key in ("host", "boot_id", "pid_namespace")
    )

  def _stale_reason(self, holder: dict) -> str | None:
    """Why ``holder``'s lock may be taken over, or None while it may be alive."""
    pid = holder.get("pid")
    if (
      self._same_machine(holder)
      and isinstance(pid, int)
      and pid != self.owner["pid"]
      and not paths.process_alive(pid)
    ):
      return "which is no longer running (killed?)"
    refreshed, lease = holder.get("refreshed"), holder.get("lease_seconds", self.lease)
    if isinstance(refreshed, (int, float)) and isinstance(lease, (int, float)):
      age = time.time() - refreshed
      if age > lease:
        return f"not refreshed for {age:.0f} s (lease {lease:g} s)"
    return None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLockedError naming the holder; then starts refreshing it."""
    for _ in range(5):  # a takeover can race with other starting runs; the storage decides who wins
      self._mark_refresh_start()
      if self._file.create(self._content()):
        return self._start()
      found = self._read_holder()
      if found is None:
        continue  # released between our attempt and the read
      holder, state = found
      reason = self._stale_reason(holder) if holder else None
      if reason is None:
        self._refuse(holder)
      self._mark_refresh_start()
      if self._file.take_over(state, self._content()):
        logging.warning("%s: taking over a stale lock of %s, %s", self.path, describe(holder), reason)
        return self._start()
    raise WorkdirLockedError(f"{self.path}: could not take the workdir lock (contended); try again")

  def _refuse(self, holder: dict) -> None:
    expires = bool(holder) and isinstance(holder.get("refreshed"), (int, float))
    if expires:
      lease = holder.get("lease_seconds", self.lease)
      hint = (
        f"; it was refreshed {max(time.time() - holder['refreshed'], 0):.0f} s ago and is taken over "
        f"once not refreshed for {lease:g} s"
      )
    else:  # an older version's lock, or garbage: it never expires
      hint = "" if self._same_machine(holder) else "; if that run is dead, delete the lock file"
    raise WorkdirLockedError(
      f"{self.workdir}: workdir is in use by {describe(holder)}; use another "
      f"--workdir or wait for it to finish (lock: {self.path}{hint})",
      expires=expires,
    )

  def _mark_refresh_start(self) -> None:
    self._last_refresh, self._last_refresh_wall = _clock(), time.time()

  def _start(self) -> None:
    self.held, self.lost = True, None
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name="workdir-lock-refresh", daemon=True)
    self._thread.start()

  def _refresh_loop(self) -> None:
    """Every lease/4 s until released or lost. Any error (an OSError, gcsfs's HttpError once its own
    retries are spent, anything) is logged and retried: the thread must outlive the storage's bad
    minutes. A refresh that fails for a whole lease lets another run take over; ``check`` then fails
    already (the last refresh is too old), and the next refresh that gets through names the taker."""
    failing = False
    while not self._stop.wait(self.lease / 4):
      with self._file_lock:
        if self._stop.is_set():
          return
        self._refreshes += 1
        started = (_clock(), time.time())  # before the write: the lock's "refreshed" is no older
        try:
          refreshed = self._file.refresh(self._content())
          if not refreshed:
            self._mark_lost()
            return
        except Exception as error:  # pylint: disable=broad-except
          if not failing:
            logging.warning(
              "%s: could not refresh the workdir lock (%s: %s); retrying",
              self.path,
              type(error).__name__,
              error,
            )
          failing = True
          continue
        failing = False
        self._last_refresh, self._last_refresh_wall = started

  def _mark_lost(self) -> None:
    try:
      found = self._read_holder()
      holder = describe(found[0]) if found else "nobody (the lock file is gone)"
    except Exception as error:  # pylint: disable=broad-except  # lost all the same; only the name is missing
      holder = f"another run (the lock cannot be read: {type(error).__name__})"
    self.lost = self.lost or f"{holder} took over this workdir's lock"
    logging.error(
      "%s: %s (this run had not refreshed it for longer than its %g s lease); it stops before "
      "it writes anything more",
      self.path,
      self.lost,
      self.lease,
    )

  def check(self) -> str | None:
    """None while this run may go on writing, judged in memory (cheap enough for every metrics row):
    held, not found lost, the refresher alive and its last successful refresh younger than the lease.
    Else who may have the lock now; ``lost`` keeps it, so the answer never turns back to None."""
    if not self.held:
      return "this run does not hold the workdir lock"
    if self.lost is None:
      # The older of two views: the boot clock counts through a suspend, the wall clock is what a
      # taker compares with (and may run on while a paused VM's boot clock stands still).
      age = max(_clock() - self._last_refresh, time.time() - self._last_refresh_wall)
      reason = None
      if self._thread is None or not self._thread.is_alive():
        reason = "this run's lock refresher stopped"
      elif age > HELD_FRACTION * self.lease:
        reason = f"this run last refreshed its lock {age:.0f} s ago, near or past its {self.lease:g} s lease"
      if reason is not None:
        self.lost = self.lost or f"another run may take this workdir's lock over at any moment ({reason})"
        logging.error("%s: %s; this run stops before it writes anything more", self.path, self.lost)
    return self.lost

  def confirm_held(self) -> str | None:
    """``check``, then with the storage now that the lock is still ours; None if it is, else why not.
    A storage that cannot answer now decides nothing: the lease (``check``) still holds."""
    if self.check() is None:
      try:
        ours = self._file.still_ours()
      except Exception as error:  # pylint: disable=broad-except
        logging.warning(
          "%s: could not read the workdir lock (%s: %s); relying on its last refresh",
          self.path,
          type(error).__name__,
          error,
        )
        ours = True
      if not ours:
        self._mark_lost()
    return self.lost

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    self._stop.set()
    with self._file_lock:  # not while a refresh is being written
      self._file.release()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def lock_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 takes ``WORKDIR/lock``; every process learns whether it did, so all stop together."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir)
      lock.acquire()
    except Exception as e:  # pylint: disable=broad-except  # any error: every process must learn of it
      lock, error = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = WorkdirLockedError(
        f"{workdir}: process 0 could not lock this workdir (its error is in its log: another run "
        "using it, or the storage)"
      )
  if error is not None:
    raise error
  return lock
