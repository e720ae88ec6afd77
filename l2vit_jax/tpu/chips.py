"""Published per-chip TPU figures and Cloud accelerator-type names → libtpu topology names.

The figures are Google Cloud's own (the "key specifications" table of each generation's page, cited in
``ChipSpec.source``); ``scripts/compile_tpu.py`` uses them for its HBM fit check and roofline bound.
Capacities are taken as printed: "16 GB" as 16·10⁹ bytes (conservative), "32 GiB" as 32·2³⁰.

Cloud names count chips (``v5litepod-8``, ``v6e-16``) or, for v4 and v5p, TensorCores (two per chip:
``v4-8`` and ``v5p-8`` are 4 chips); libtpu's compile-only topologies want ``generation:shape`` names
(``v5e:2x4``, ``v4:2x2x1``), which :func:`topology_for_accelerator_type` gives.
"""

from __future__ import annotations

import dataclasses
import math

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU chip: HBM bytes, peak dense bf16 FLOP/s and HBM bytes/s, from ``source``."""
  generation: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_second: float
  source: str
  cloud_prefix: str = ""  # accelerator types are f"{cloud_prefix}-{count}"
  cores_per_chip: int = 1  # what the count in a Cloud name counts per chip
  grid_rank: int = 2  # 2-D (v5e, v6e) or 3-D (v4, v5p) slice shapes
  chip_config_name: str | None = None  # what libtpu's get_topology_desc needs besides the name


CHIPS = {
    "v4": ChipSpec("v4", 32 * GIB, 275e12, 1200 * GB, "https://cloud.google.com/tpu/docs/v4",
                   cloud_prefix="v4", cores_per_chip=2, grid_rank=3, chip_config_name="megacore"),
    "v5e": ChipSpec("v5e", 16 * GB, 197e12, 819 * GB, "https://cloud.google.com/tpu/docs/v5e",
                    cloud_prefix="v5litepod", cores_per_chip=1, grid_rank=2),
    "v5p": ChipSpec("v5p", 95 * GB, 459e12, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p",
                    cloud_prefix="v5p", cores_per_chip=2, grid_rank=3),
    "v6e": ChipSpec("v6e", 32 * GB, 918e12, 1638 * GB, "https://cloud.google.com/tpu/docs/v6e",
                    cloud_prefix="v6e", cores_per_chip=1, grid_rank=2),
}


# GPUs the CUDA plugin can compile for without one (``h100:8`` = 8 GPUs on one host); dense bf16 peak.
GPUS = {
    "h100": ChipSpec("h100", 80 * GB, 989e12, 3350 * GB,
                     "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet)"),
}


def chip_spec(topology: str) -> ChipSpec:
  """The chip of a ``generation:shape`` topology name such as ``v5e:2x2`` (or ``h100:8``)."""
  generation = topology.split(":", 1)[0]
  if generation not in CHIPS and generation not in GPUS:
    raise ValueError(f"unknown TPU generation in {topology!r}; use one of {sorted(CHIPS)} "
                     "(e.g. v5e:2x2, v5p:2x2x1, v4:2x2x1, v6e:2x2), or h100:N for N GPUs")
  return CHIPS.get(generation) or GPUS[generation]


def _default_shape(chips: int, rank: int) -> tuple[int, ...]:
  """Cloud's default slice shape for a power-of-two chip count: start from 1x1 (2-D) or 2x2x1 (3-D)
  and double the last of the smallest dimensions (v5e: 2x2, 2x4, 4x4, 4x8...; v4/v5p: 2x2x1, 2x2x2,
  2x2x4, 2x4x4, 4x4x4...)."""
  shape = [2, 2, 1] if rank == 3 else [1] * rank
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, n in enumerate(shape) if n == smallest)
    shape[last] *= 2
  return tuple(shape)


def topology_for_accelerator_type(name: str) -> str:
  """``v5litepod-8`` → ``v5e:2x4``, ``v5p-8`` → ``v5p:2x2x1``, ``v4-16`` → ``v4:2x2x2``, ``v6e-4`` →
  ``v6e:2x2``; a ``generation:shape`` name is returned unchanged.

  Only power-of-two slices, whose default shapes Cloud documents; pass other shapes explicitly.
  """
  if ":" in name:
    chip_spec(name)
    return name
  for spec in CHIPS.values():
    prefix = spec.cloud_prefix + "-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      chips = int(name[len(prefix):]) // spec.cores_per_chip
      if chips < 1 or chips & (chips - 1):
        break
      if spec.grid_rank == 3 and chips < 4:
        break  # v4 and v5p slices start at 4 chips (2x2x1)
      return f"{spec.generation}:{'x'.join(map(str, _default_shape(chips, spec.grid_rank)))}"
  raise ValueError(f"cannot map accelerator type {name!r} to a topology; use a Cloud name with a "
                   "power-of-two size (v5litepod-8, v6e-16, v5p-8, v4-32) or a topology such as v5e:2x4")
