"""What a process shows on its console: progress bars of long passes, lines printed around them, and
library logs kept quiet.

Every long pass (download, generation, conversion, observables, inference, mean images) reports
through ``ProgressBar``, so all of them behave alike: a bar on a terminal of process 0, one log line
with the rate at the end, nothing when the caller reports progress itself.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable


def quiet_library_logs() -> None:
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    # The standard library's level: absl's own constants (WARNING = -1) are verbosities, not levelnos.
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


class ProgressBar:
  """A tqdm bar (count, rate, ETA) on stderr for a long pass, and one log line with its rate at the end.

  Shown only on process 0 and only when stderr is a terminal: in a log file or a pipe a bar is noise
  (carriage returns), so there the final line alone reports the pass. The bar is drawn from the first
  ``update`` on, so a pass that fails before any work leaves stderr clean, and it is not left behind
  (``leave=False``): a pass that fails clears it, and no bar appears after an ``error:`` line, which
  ``main`` prints after the exception has left this context; the final line is logged only for a pass
  that completed. Use as ``with ProgressBar(total, "observables", "jet") as bar: ... bar.update(n)``.

  ``enabled=False`` shows and logs nothing (a caller asked for quiet). ``report``: a caller that shows
  progress itself; it is called with the count done after every update, and no bar or line is shown.
  ``binary_units``: counts are bytes, shown as KiB, MiB, ... (downloads).
  """

  def __init__(
    self,
    total: int | None,
    description: str,
    unit: str,
    *,
    enabled: bool = True,
    report: Callable[[int], None] | None = None,
    binary_units: bool = False,
  ):
    self.total, self.description, self.unit = total, description, unit
    self.done = 0
    self._report = report
    self._logged = enabled and report is None and _process_index() == 0
    self._drawn = self._logged and _is_terminal(sys.stderr)
    self._units = dict(unit_scale=True, unit_divisor=1024) if binary_units else {}
    self._bar = None
    self._start = time.perf_counter()

  def update(self, count: int) -> None:
    self.done += count
    if self._report is not None:
      self._report(self.done)
    if self._drawn and self._bar is None:
      import tqdm  # pylint: disable=import-outside-toplevel

      self._bar = tqdm.tqdm(
        total=self.total,
        initial=self.done - count,
        desc=self.description,
        unit=self.unit,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
        **self._units,
      )
    if self._bar is not None:
      self._bar.update(count)

  def restart(self, total: int | None, done: int = 0) -> None:
    """Counts again from ``done`` of ``total``: a pass that had to start over or learnt its size (a
    download resumed at byte ``done``, or restarted from 0 when the server ignored the resume)."""
    self.total, self.done = total, done
    if self._bar is not None:  # the next update draws a new bar from ``done``, its rate counted from there
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if self._bar is not None:
      self._bar.close()
    if exc_type is None and self._logged:
      from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

      seconds = time.perf_counter() - self._start
      absl_logging.info(
        "%s: %d %s(s) in %.1f s (%.1f %s/s)",
        self.description,
        self.done,
        self.unit,
        seconds,
        self.done / max(seconds, 1e-9),
        self.unit,
      )


def write(message: str, file=None) -> None:
  """Prints ``message`` as a line of its own above any bar being drawn (tqdm's ``write``), so the
  bar neither draws over it nor is broken by it; ``file`` defaults to stdout."""
  import tqdm  # pylint: disable=import-outside-toplevel

  tqdm.tqdm.write(message, file=sys.stdout if file is None else file)


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


def _process_index() -> int:
  """This process's JAX index where JAX is in use, else 0 (numpy-only callers never start a backend)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None and hasattr(jax, "process_index") else 0
