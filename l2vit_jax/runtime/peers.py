"""Multi-process runs: notice a lost peer process and end this one with one line naming it.

When a process of a multi-process run dies (SIGKILL, OOM, a host gone), the others cannot finish a
step without it. JAX's coordination service notices a process whose heartbeats stop, but only after
its heartbeat timeout, and then aborts the others with a C++ fatal error (SIGABRT and a stack trace);
meanwhile a survivor may sit in a collective (a TPU all-reduce with a dead host never returns) or in
the service's shutdown barrier. The watchdog here makes that end explicit and bounded:

* every process bumps a counter under ``l2vit/peers/<process>`` in the coordination service's
  key-value store a few times per timeout, and reads the others';
* a peer whose counter has not moved for ``L2VIT_PEER_TIMEOUT_SECONDS`` (default 100) is declared
  lost: one line ``error: process 0 of 2 lost process 1 (host, pid 1234): ...`` on stderr, and exit
  status ``EXIT_STATUS`` at once (``os._exit``: the main thread may be stuck in a collective);
* JAX's own heartbeat timeout is set ``JAX_MARGIN_SECONDS`` above ours, as a backstop.

A process that is finishing (normally, preempted or with an error) marks itself ``exiting`` first, so
peers still at work, or waiting for it at the final barrier, do not mistake it for a lost one. The
coordinator (process 0) holds the key-value store: when it dies, JAX itself aborts the others at once
("the leader task was preempted/died"), before this watchdog would notice.

At interpreter exit (``atexit``, ahead of JAX's own handler that shuts the distributed client down) the
watchdog keeps watching until every peer is finishing too, at most ``L2VIT_PEER_TIMEOUT_SECONDS``, and
then its thread is stopped and joined. Invariant: once JAX shuts its client down and the interpreter
finalizes, no thread of ours is inside a client call. A daemon thread whose call (the GIL released in
C++) returns while Python finalizes is ended by ``pthread_exit`` from inside the call; the unwind meets
nanobind's noexcept frame and the process aborts with ``terminate called after throwing an instance of
''`` / ``FATAL: exception not rethrown`` (SIGABRT, status -6): a run that had done all its work
failed, rarely, and more often on busy cores (issue 31, point 10).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time

import jax

TIMEOUT_VARIABLE = "L2VIT_PEER_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 100.0
JAX_MARGIN_SECONDS = 30
EXIT_STATUS = 1
EXIT_POLL_SECONDS = 0.2  # how often a finishing process looks whether its peers are finishing too
LAST_CALL_SECONDS = 10.0  # a stopped watchdog's call in flight normally returns within milliseconds
_PREFIX = "l2vit/peers/"

_watchdog: PeerWatchdog | None = None


def timeout_seconds() -> float:
  return float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_SECONDS))


def jax_heartbeat_timeout_seconds() -> int:
  """JAX's heartbeat timeout: later than the watchdog's, so the watchdog's clear message comes first."""
  return int(timeout_seconds()) + JAX_MARGIN_SECONDS


class PeerWatchdog:
  """A daemon thread that publishes this process's liveness and watches its peers'."""

  def __init__(self, client, process_id: int, num_processes: int, timeout: float):
    self._client, self.process_id, self.num_processes = client, process_id, num_processes
    self.timeout = timeout
    self._interval = min(5.0, timeout / 4)
    self._identity = {"host": socket.gethostname(), "pid": os.getpid()}
    self._beats = 0
    self._exiting = threading.Event()
    self._stop = threading.Event()
    self._wake = threading.Event()  # cuts a wait short: this process finishes, or the thread must stop
    self._seen: dict[int, tuple[str | None, float]] = {}  # peer -> (its last value, when it changed)
    self._thread = threading.Thread(target=self._run, name="peer_watchdog", daemon=True)

  def start(self) -> None:
    self._publish()
    started = time.monotonic()
    self._seen = {peer: (None, started) for peer in range(self.num_processes) if peer != self.process_id}
    self._thread.start()

  def mark_exiting(self) -> None:
    """From now on this process may stop beating (it is finishing); the thread still watches peers."""
    self._exiting.set()
    self._wake.set()
    try:
      self._publish()
    except Exception:  # pylint: disable=broad-except  # the service may already be gone
      pass

  def finish(self, wait_seconds: float) -> None:
    """Marks this process exiting, watches until every peer is finishing too (at most ``wait_seconds``;
    a peer lost meanwhile still ends the process), then stops the thread and waits for its call in
    flight to return. Call before JAX shuts its distributed client down (see the module docstring)."""
    self.mark_exiting()
    self._thread.join(wait_seconds)  # the thread ends by itself once no peer is at work
    self._stop.set()
    self._wake.set()
    self._thread.join(LAST_CALL_SECONDS)
    if self._thread.is_alive():
      print(
        f"warning: process {self.process_id}: the peer watchdog's call to JAX's coordination "
        f"service has not returned after {LAST_CALL_SECONDS:g} s; exiting anyway",
        file=sys.stderr,
        flush=True,
      )

  def _publish(self) -> None:
    self._beats += 1
    value = json.dumps(dict(self._identity, beat=self._beats, exiting=self._exiting.is_set()))
    self._client.key_value_set(f"{_PREFIX}{self.process_id}", value, allow_overwrite=True)

  def _run(self) -> None:
    failing_since = None  # a hiccup of the coordination service is not yet a lost coordinator
    while True:
      self._wake.wait(EXIT_POLL_SECONDS if self._exiting.is_set() else self._interval)
      self._wake.clear()
      if self._stop.is_set():
        return
      try:
        self._publish()
        values = {key.rsplit("/", 1)[-1]: value for key, value in self._client.key_value_dir_get(_PREFIX)}
      except Exception as error:  # pylint: disable=broad-except
        if self._exiting.is_set():
          return  # the service closes at the end of the run
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > self.timeout:
          first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
          self._lost(
            "the coordinator (process 0)",
            f"its coordination service has not answered for "
            f"{self.timeout:g} s ({TIMEOUT_VARIABLE}): {first_line}",
          )
        continue
      failing_since = None
      lost, busy = self._check(values)
      if lost:
        self._lost(", ".join(lost), f"no sign of life for {self.timeout:g} s ({TIMEOUT_VARIABLE})")
      if self._exiting.is_set() and not busy:
        return  # every peer is finishing too

  def _check(self, values: dict[str, str]) -> tuple[list[str], int]:
    """Names of the peers silent for longer than the timeout, and how many are still at work."""
    now, lost, busy = time.monotonic(), [], 0
    for peer, (last, since) in self._seen.items():
      value = values.get(str(peer))
      info = json.loads(value) if value else {}
      if info.get("exiting"):
        continue
      busy += 1
      if value != last:
        self._seen[peer] = (value, now)
      elif now - since > self.timeout:
        where = f" ({info['host']}, pid {info['pid']})" if info else " (never reported)"
        lost.append(f"process {peer}{where}")
    return lost, busy

  def _lost(self, who: str, why: str) -> None:
    print(
      f"error: process {self.process_id} of {self.num_processes} lost {who}: {why}. Exiting; "
      "restart every process to resume from the last complete checkpoint.",
      file=sys.stderr,
      flush=True,
    )
    os._exit(EXIT_STATUS)  # pylint: disable=protected-access


def start_watchdog() -> None:
  """Starts watching the peers of a multi-process run (after ``jax.distributed.initialize``)."""
  global _watchdog  # pylint: disable=global-statement
  if jax.process_count() < 2 or _watchdog is not None:
    return
  from jax._src import distributed  # pylint: disable=import-outside-toplevel  # the client, as Orbax uses it

  _watchdog = PeerWatchdog(
    distributed.global_state.client, jax.process_index(), jax.process_count(), timeout_seconds()
  )
  _watchdog.start()
  # atexit runs its handlers last-registered first: this one before JAX's (registered by `import jax`),
  # which shuts the client down; both after the main thread is done and before Python finalizes.
  atexit.register(_watchdog.finish, _watchdog.timeout)


def mark_exiting() -> None:
  """Tells the peers this process is finishing (call before the final barrier; harmless if single)."""
  if _watchdog is not None:
    _watchdog.mark_exiting()
