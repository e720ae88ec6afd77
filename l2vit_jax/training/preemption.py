"""Preemption: SIGTERM/SIGINT (or a multi-host preemption notice) become a flag the loop checks at step
boundaries, so it saves a checkpoint and stops with ``errors.Preempted``."""

from __future__ import annotations

import signal
import threading

import jax


class StopRequests:
  """Turns SIGTERM and SIGINT into a flag the loop checks at step boundaries (a preemption notice).

  Single-process runs install Python handlers (main thread only). Multi-process runs use JAX's
  preemption sync point instead: its SIGTERM notifier tells every process, and they agree on the step
  at which to save together (a local flag could make one process save while the others train on).
  A second SIGINT falls back to the default (KeyboardInterrupt), for an impatient Ctrl-C.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self.signum = signal.SIGTERM
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.received, self.signum = signal.Signals(signum).name, signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "preemption notice"
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        pass
    return self.received is not None

  def restore(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
