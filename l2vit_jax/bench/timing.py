"""Timing rounds and their statistics: the minimum over repeats for one implementation, paired rounds
(each runner once per round, the order reversed every other round) for ratios between runners.

Every runner must block until its work is done: the time of a round is the wall time of the call.
"""

from __future__ import annotations

import resource
import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """Minimum wall time of ``fn()`` over ``repeats`` (the least disturbed run of one implementation)."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def paired_rounds(
  runners: dict[str, Callable[[int], None]],
  steps: int,
  pairs: int,
  page_faults: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
  """Seconds per step of every runner in each of ``pairs`` rounds. A round runs each runner once,
  in reverse order every other round, so that a drift in machine speed hits ours and theirs alike.
  ``page_faults``, if given, receives each runner's minor page faults per step, round by round."""
  seconds = {name: [] for name in runners}
  for round_index in range(pairs):
    for name in list(runners) if round_index % 2 == 0 else list(runners)[::-1]:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      runners[name](steps)
      seconds[name].append((time.perf_counter() - start) / steps)
      if page_faults is not None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        page_faults.setdefault(name, []).append(faults / steps)
  return seconds


def summarize(values: list[float]) -> dict:
  """Median and range of per-round figures (the median: one disturbed round cannot move it)."""
  ordered = sorted(values)
  middle = len(ordered) // 2
  median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
  return {"median": median, "min": ordered[0], "max": ordered[-1], "rounds": list(values)}


def ratio_summary(reference_seconds: list[float], our_seconds: list[float]) -> dict:
  """ours/reference speed ratio per round (reference time over ours), summarized."""
  return summarize([theirs / ours for theirs, ours in zip(reference_seconds, our_seconds)])


def rates(batch: int, seconds: list[float]) -> dict:
  """Images per second of each round, summarized."""
  return summarize([batch / s for s in seconds])


def max_rss_mib() -> float:
  """This process's peak resident memory so far (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
