"""Published per-chip TPU and GPU figures, and Cloud accelerator-type names → libtpu topology names.

The TPU figures are Google Cloud's own (the "key specifications" table of each generation's page), the
GPU figures NVIDIA's datasheets, each cited in ``ChipSpec.source``; ``scripts/compile_tpu.py`` uses them
for its HBM fit check and roofline bound, ``scripts/benchmark.py`` for MFU on the chip it runs on.
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
  "v4": ChipSpec(
    "v4",
    32 * GIB,
    275e12,
    1200 * GB,
    "https://cloud.google.com/tpu/docs/v4",
    cloud_prefix="v4",
    cores_per_chip=2,
    grid_rank=3,
    chip_config_name="megacore",
  ),
  "v5e": ChipSpec(
    "v5e",
    16 * GB,
    197e12,
    819 * GB,
    "https://cloud.google.com/tpu/docs/v5e",
    cloud_prefix="v5litepod",
    cores_per_chip=1,
    grid_rank=2,
  ),
  "v5p": ChipSpec(
    "v5p",
    95 * GB,
    459e12,
    2765 * GB,
    "https://cloud.google.com/tpu/docs/v5p",
    cloud_prefix="v5p",
    cores_per_chip=2,
    grid_rank=3,
  ),
  "v6e": ChipSpec(
    "v6e",
    32 * GB,
    918e12,
    1638 * GB,
    "https://cloud.google.com/tpu/docs/v6e",
    cloud_prefix="v6e",
    cores_per_chip=1,
    grid_rank=2,
  ),
}


# GPUs the CUDA plugin can compile for without one (``h100:8`` = 8 GPUs on one host); dense bf16 peak.
GPUS = {
  "h100": ChipSpec(
    "h100", 80 * GB, 989e12, 3350 * GB, "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet)"
  ),
}


# Chips met only at run time, for a benchmark's MFU (``scripts/benchmark.py``), not compile targets.
# Dense (not 2:4-sparse) bf16 peaks from NVIDIA's datasheets.
OTHER_GPUS = {
  "h100-pcie": ChipSpec(
    "h100-pcie",
    80 * GB,
    756e12,
    2000 * GB,
    "https://www.nvidia.com/en-us/data-center/h100/ (H100 PCIe datasheet)",
  ),
  "h100-nvl": ChipSpec(
    "h100-nvl",
    94 * GB,
    835e12,
    3900 * GB,
    "https://www.nvidia.com/en-us/data-center/h100/ (H100 NVL datasheet)",
  ),
  "h200": ChipSpec(
    "h200", 141 * GB, 989e12, 4800 * GB, "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM datasheet)"
  ),
  "a100": ChipSpec(
    "a100",
    80 * GB,
    312e12,
    2039 * GB,
    "https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM datasheet)",
  ),
}

# What JAX calls each chip at run time (``jax.devices()[0].device_kind``, e.g. "NVIDIA H100 80GB
# HBM3", "TPU v5 lite"), as substrings, most specific first: "TPU v5" alone is the v5p.
_DEVICE_KINDS = (
  ("H100 PCIe", OTHER_GPUS["h100-pcie"]),
  ("H100 NVL", OTHER_GPUS["h100-nvl"]),
  ("H100", GPUS["h100"]),
  ("H200", OTHER_GPUS["h200"]),
  ("A100", OTHER_GPUS["a100"]),
  ("TPU v5 lite", CHIPS["v5e"]),
  ("TPU v5e", CHIPS["v5e"]),
  ("TPU v5", CHIPS["v5p"]),
  ("TPU v6", CHIPS["v6e"]),
  ("TPU v4", CHIPS["v4"]),
)


def spec_for_device_kind(device_kind: str) -> ChipSpec | None:
  """The published figures of the chip JAX names ``device_kind``; None for CPUs and unknown chips."""
  for substring, spec in _DEVICE_KINDS:
    if substring.lower() in device_kind.lower():
      return spec
  return None


def chip_spec(topology: str) -> ChipSpec:
  """The chip of a ``generation:shape`` topology name such as ``v5e:2x2`` (or ``h100:8``)."""
  generation = topology.split(":", 1)[0]
  if generation not in CHIPS and generation not in GPUS:
    raise ValueError(
      f"unknown TPU generation in {topology!r}; use one of {sorted(CHIPS)} "
      "(e.g. v5e:2x2, v5p:2x2x1, v4:2x2x1, v6e:2x2), or h100:N for N GPUs"
    )
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
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
      chips = int(name[len(prefix) :]) // spec.cores_per_chip
      if chips < 1 or chips & (chips - 1):
        break
      if spec.grid_rank == 3 and chips < 4:
        break  # v4 and v5p slices start at 4 chips (2x2x1)
      return f"{spec.generation}:{'x'.join(map(str, _default_shape(chips, spec.grid_rank)))}"
  raise ValueError(
    f"cannot map accelerator type {name!r} to a topology; use a Cloud name with a "
    "power-of-two size (v5litepod-8, v6e-16, v5p-8, v4-32) or a topology such as v5e:2x4"
  )
