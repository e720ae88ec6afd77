"""The machine's load around one measurement: load averages, and the CPU other processes used.

Load is not neutral: it slowed PyTorch's thread pool far more than XLA's (docs/performance_log.md:
at a load of ~4 on 2 cores an ours/PyTorch ratio read 1.7×, quiet 0.6–1.0×), so a section measured on
a loaded machine is marked and its ratios are not figures to quote.
"""

from __future__ import annotations

import os
import resource
import time

# A section is 'loaded' when other processes used more than this fraction of the cores while it ran.
# Ours and PyTorch each spread a step over every core; a quarter of them taken by others is where the
# ratio stopped meaning anything in practice, while a quiet desktop stays well below it.
LOADED_FRACTION = 0.25


class LoadMonitor:
  """Started before a measurement; ``finish()`` after it returns the load record of the section."""

  def __init__(self):
    self.load_before = os.getloadavg()
    self.busy_before, self.own_before = machine_busy_seconds(), own_cpu_seconds()
    self.start = time.perf_counter()

  def finish(self) -> dict:
    wall = time.perf_counter() - self.start
    cores = os.cpu_count() or 1
    result = {
      "loadavg_1min_before": self.load_before[0],
      "loadavg_1min_after": os.getloadavg()[0],
      "cpu_count": cores,
      "loaded_fraction_threshold": LOADED_FRACTION,
    }
    busy_after = machine_busy_seconds()
    if self.busy_before is not None and busy_after is not None and wall > 0:
      other = (busy_after - self.busy_before) - (own_cpu_seconds() - self.own_before)
      result["other_processes_cpu_fraction"] = max(0.0, other) / (wall * cores)
      result["loaded"] = result["other_processes_cpu_fraction"] > LOADED_FRACTION
    else:  # no /proc/stat: the load average taken before we added our own load
      result["loaded"] = self.load_before[0] > LOADED_FRACTION * cores
    return result


def machine_busy_seconds(stat_path: str = "/proc/stat") -> float | None:
  """CPU-seconds every process on the machine has spent busy since boot (Linux /proc/stat); None
  where the file is missing or unreadable."""
  try:
    with open(stat_path) as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  guest = sum(fields[8:10])  # already counted in user/nice
  return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
  """CPU-seconds of this process (every thread) and of its waited-for children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
