"""Where the TPU compiler spends a compile: seconds of code generation per HLO instruction.

libtpu marks its work with profiler events; generating the code of one fusion (its tiling, LLO
scheduling and register allocation) is an event named ``XLA::TPU emitting for <instruction>``, and
those events hold nearly all of a large train step's compile. ``jax.profiler`` collects them on the
host when the compile runs inside a trace (``CompiledSteps(..., profile_dir=...)``). A few fusions can
dominate: in the default finetune step one fusion's code generation took a third of the compile and
three took over half (docs/performance.md, "Compile time"). Profiling itself slows the compile (about
1.7× on a 2-core host), so read the shares, not the seconds.
"""

from __future__ import annotations

import collections

import jax
from etils import epath

from l2vit_jax.tpu import accounting

EMITTING = "XLA::TPU emitting for "


def emission_seconds(profile_dir: str) -> dict[str, float]:
  """Seconds of code generation per instruction name, from the newest profile under ``profile_dir``
  (``jax.profiler`` writes ``plugins/profile/<run>/<host>.xplane.pb``)."""
  profiles = sorted(epath.Path(profile_dir).glob("plugins/profile/*/*.xplane.pb"))
  if not profiles:
    raise FileNotFoundError(f"{profile_dir}: no profile (plugins/profile/*/*.xplane.pb)")
  data = jax.profiler.ProfileData.from_file(str(profiles[-1]))
  seconds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name.startswith(EMITTING):
          seconds[event.name[len(EMITTING) :]] += event.duration_ns / 1e9
  return dict(seconds)


def slowest(seconds: dict[str, float], entries: list[accounting.Entry], top: int = 10) -> dict:
  """The ``top`` instructions by code-generation time, each with its share of the total, its model
  part and pass from the step's accounting (``accounting.account``: ``entries``), and whether it
  belongs to a block's forward pass recomputed in the backward pass (``jax.checkpoint``:
  'rematted_computation')."""
  by_name = {entry.name: entry for entry in entries}
  total = sum(seconds.values())
  rows = []
  for name, spent in sorted(seconds.items(), key=lambda item: -item[1])[:top]:
    entry = by_name.get(name)
    op_name = entry.op_name if entry else ""
    rows.append(
      {
        "instruction": name,
        "seconds": round(spent, 2),
        "share": round(spent / total, 4),
        "scope": entry.scope if entry else "other",
        "direction": entry.direction if entry else "forward",
        "rematerialised": "rematted_computation" in op_name,
        "op_name": op_name,
      }
    )
  return {"emission_seconds": round(total, 2), "instructions": len(seconds), "slowest": rows}
