"""The accelerator's ``--batch=fill``, the device's memory and the chip's published peak.

``--batch=fill`` takes the largest power-of-two batch whose train step XLA plans to fit a share of the
device's memory, from one compile at a small batch. Powers of two: every common GPU and TPU tile
divides them, so the figures are not a ragged batch's. (``tpu.compile_only.largest_fitting_batch``
instead compiles at each guess to pin down a slice's exact largest batch; a benchmark wants a round
one from a single compile.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2vit_jax.bench import ours
from l2vit_jax.tpu import chips


def device_memory() -> dict | None:
  """Peak bytes in use and the limit of the first device; None where it reports none (a CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def device_bytes_limit() -> int | None:
  return (device_memory() or {}).get("bytes_limit")


def chip() -> chips.ChipSpec | None:
  """The published figures of the chip we run on (``tpu.chips``); None on a CPU."""
  return chips.spec_for_device_kind(jax.devices()[0].device_kind)


def choose_fill_batch(fixed_bytes: float, bytes_per_image: float, budget_bytes: float, max_batch: int) -> int:
  """The largest power of two b ≤ ``max_batch`` with fixed + b · per-image bytes ≤ budget (at
  least 1)."""
  batch = 1
  while batch * 2 <= max_batch and fixed_bytes + batch * 2 * bytes_per_image <= budget_bytes:
    batch *= 2
  return batch


def fill_batch(args, default_batch: int, probe_batch: int = 8) -> dict:
  """``--batch=fill``: the batch whose train step fits ``args.fill_fraction`` of the device's memory.

  One compile at ``probe_batch``: XLA's memory plan splits into arguments and outputs (parameters,
  optimizer state, the batch: nearly all fixed) and temporaries (activations and their gradients,
  per image). Scaling the temporaries from the probe slightly overstates what a larger batch needs,
  which errs on the side of fitting. A device that reports no memory limit (a CPU) gets
  ``default_batch``.
  """
  limit = device_bytes_limit()
  if not limit:
    return {"batch": default_batch, "reason": "the device reports no memory limit"}
  built = ours.build(args, args.dtype, ours.fake_batch(args, probe_batch))
  memory = built.train.lower(*built.state, jnp.int32(0), built.batch).compile().memory_analysis()
  fixed = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
  per_image = memory.temp_size_in_bytes / probe_batch
  budget = args.fill_fraction * limit
  return {
    "batch": choose_fill_batch(fixed, per_image, budget, args.max_batch),
    "device_bytes_limit": limit,
    "fill_fraction": args.fill_fraction,
    "probe_batch": probe_batch,
    "fixed_bytes": fixed,
    "temp_bytes_per_image": per_image,
    "max_batch": args.max_batch,
  }
