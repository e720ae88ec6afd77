"""Compiles the training loop's own steps for a TPU topology on a machine without one, and reads off
what XLA planned: per-chip memory, FLOPs, bytes, collectives (``scripts/compile_tpu.py``). H100 GPUs
work the same way through the CUDA plugin (``jax[cuda12]``), also without a GPU.

libtpu (``pip install "jax[tpu]"``) serves as a compile-only backend: ``jax.experimental.topologies``
describes a slice's devices, ``sharding.make_mesh`` lays the usual (data, model) mesh over them, and
``steps.build_steps`` builds the same jitted steps the loop runs. They are lowered on abstract
arguments (``ShapeDtypeStruct`` with the loop's shardings) and compiled; nothing is allocated or run.
Memory and cost figures are per chip (docs/design.md, Checked API facts: ``temp_size_in_bytes`` reads 0 and
``optimal_seconds`` is unreliable there, so neither is used).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Callable

import jax
import numpy as np

from l2vit_jax.runtime import process_setup, sharding
from l2vit_jax.tpu import accounting, chips
from l2vit_jax.training import recipes, steps
from l2vit_jax.data import pipeline

# libtpu looks for a TPU VM's metadata and warns without these; the values only silence it.
# ALLOW_MULTIPLE_LIBTPU_LOAD: every JAX process with libtpu installed takes /tmp/libtpu_lockfile when
# its backends start, so without it a compile fails while any other JAX process (a test run) lives.
# JAX_SKIP_CUDA_CONSTRAINTS_CHECK: the CUDA plugin otherwise calls cuInit, fails without a GPU driver
# and never registers its compile-only topologies.
COMPILE_ONLY_ENVIRONMENT = {
  "TPU_ACCELERATOR_TYPE": "v5litepod-4",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
}
# An H100 SXM as XLA's GPU compiler sees it (device description as dumped on one, jax-ml/jax#28376).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGET_CONFIGS = {"h100": H100_TARGET_CONFIG}
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
)
# Compile-only steps are given this many steps per epoch: schedules are traced, never evaluated.
NOMINAL_STEPS_PER_EPOCH = 1000


def set_compile_only_environment() -> None:
  """Call before JAX starts its backends; values already set win. The TPU steps get the libtpu flags
  real runs get (``runtime.process_setup.LIBTPU_FLAGS``)."""
  for name, value in COMPILE_ONLY_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  process_setup.configure_libtpu_flags()


def compile_only_mesh(topology: str):
  """The training mesh over the devices of a compile-only TPU slice (Cloud names are mapped) or,
  for ``h100:N``, of N H100s on one host (needs ``jax[cuda12]``, no GPU)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  topology = chips.topology_for_accelerator_type(topology)
  generation, shape = topology.split(":", 1)
  if generation in GPU_TARGET_CONFIGS:
    description = topologies.get_topology_desc(
      platform="cuda", topology=f"1x1x{int(shape)}", target_config=GPU_TARGET_CONFIGS[generation]
    )
  else:
    spec = chips.chip_spec(topology)
    extra = {"chip_config_name": spec.chip_config_name} if spec.chip_config_name else {}
    description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **extra)
  return sharding.make_mesh(description.devices)


def abstract_batch(config, keys: tuple[str, ...], global_batch: int, mesh) -> dict:
  """Shapes and dtypes of a global batch as the loop feeds it, sharded along ``data``.

  One all-zero record goes through the real input pipeline (the task's augmentation, pixel scaling,
  batching), so the keys, shapes and dtypes are those of training, with the batch dimension set.
  """
  size, channels = config.model.img_size, config.model.in_channels
  record = {
    "image": np.zeros((size, size, channels), np.float32),
    "index": np.int64(0),
    "label": np.int32(0),
    "mass": np.float32(0.0),
    "pt": np.float32(0.0),
  }
  augmentation = recipes.AUGMENTATIONS[config.task]
  if "mask" in keys:  # evaluation batches: padded and flagged
    dataset = pipeline.make_eval_dataset([record], batch_size=1, pixel_scale=config.data.pixel_scale)
  else:
    dataset = pipeline.make_train_dataset(
      [record], batch_size=1, seed=0, augmentation=augmentation, pixel_scale=config.data.pixel_scale
    )
  example = next(iter(dataset))
  batch_sharding = sharding.batch_sharding(mesh)
  return {
    k: jax.ShapeDtypeStruct(
      (global_batch, *np.shape(example[k])[1:]), np.asarray(example[k]).dtype, sharding=batch_sharding
    )
    for k in keys
  }


def abstract_replicated(tree, mesh):
  """``ShapeDtypeStruct`` leaves replicated over ``mesh`` (what ``sharding.replicate`` places)."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)


def _nbytes(struct) -> int:
  """Bytes of an array's values; PRNG keys (a few words each) count as none."""
  if jax.dtypes.issubdtype(struct.dtype, jax.dtypes.prng_key):
    return 0
  return math.prod(struct.shape) * np.dtype(struct.dtype).itemsize


def per_chip_bytes(structs, shardings) -> int:
  """Bytes one chip holds of ``structs`` (one argument) under the executable's input ``shardings``.

  Leaves the step does not read (SimCLR's unused classification heads) have no sharding in the
  executable; they count as placed by the loop (``struct.sharding``).
  """

  def on_one_chip(struct, chosen):
    shard_shape = (chosen or struct.sharding).shard_shape(struct.shape)
    return _nbytes(struct) * math.prod(shard_shape) // max(math.prod(struct.shape), 1)

  return sum(jax.tree.leaves(jax.tree.map(on_one_chip, structs, shardings)))


def collectives(hlo_text: str) -> dict[str, dict]:
  """Collective ops in optimized HLO: kind → {count, bytes} (result bytes per chip), each counted as
  often as it runs (a collective in the scanned blocks' loop once per block).

  Asynchronous pairs are counted once, at their ``-start``; for all-gather and collective-permute
  starts, whose results hold the operands as well, only the outputs (the second half) count.
  """
  computations, entry = accounting.parse_module(hlo_text)
  found: dict[str, dict] = {}
  for _, instruction, trips in accounting.executed_instructions(computations, entry):
    kind = instruction.opcode.removesuffix("-start")
    if kind not in COLLECTIVES:
      continue
    shapes = accounting.array_sizes(instruction.result)
    if instruction.opcode.endswith("-start") and kind != "all-reduce":
      shapes = [b for b in shapes if b > 4] or shapes  # drop u32[] sync contexts
      shapes = shapes[len(shapes) // 2 :]
    counted = found.setdefault(kind, {"count": 0, "bytes": 0})
    counted["count"] += trips
    counted["bytes"] += sum(shapes) * trips
  return found


def _unoptimized_cost_per_device(lowered, num_devices: int) -> dict:
  """XLA's cost analysis of the whole unpartitioned step, run by the CPU client, split evenly.

  For the CUDA plugin, whose compile-only executables report no costs. Private jaxlib API; FLOPs
  are exact for a data-parallel step, bytes are overestimated (nothing is fused yet).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

  module = lowered.compiler_ir("hlo").as_hlo_module()
  cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
  return {key: cost.get(key, 0.0) / num_devices for key in ("flops", "bytes accessed")}


def _compiled_summary(
  lowered, compiled, entries: list[accounting.Entry], args, batch, num_devices: int
) -> dict:
  """The report's figures for one compiled step; ``entries`` is ``accounting.account`` of its HLO."""
  memory = compiled.memory_analysis()
  cost, cost_source = compiled.cost_analysis(), "optimized HLO, per device"
  if not cost:
    cost = _unoptimized_cost_per_device(lowered, num_devices)
    cost_source = "unoptimized HLO / devices (CPU client; bytes overestimated, nothing fused)"
  hlo = compiled.as_text()
  input_shardings = compiled.input_shardings[0]
  xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  # XLA counts a loop body once: the scanned blocks' would count for one block, not six.
  executed = accounting.executed_cost(entries, xla_flops=xla_flops, xla_bytes=xla_bytes)
  return {
    "peak_memory_bytes": int(memory.peak_memory_in_bytes),
    "argument_bytes": int(memory.argument_size_in_bytes),
    "flops": executed["flops"],
    "bytes_accessed": executed["bytes_accessed"],
    "xla_flops": xla_flops,  # as XLA's cost analysis reports them, loop bodies once
    "xla_bytes_accessed": xla_bytes,
    # Of the bytes, those in HBM (the rest is in on-chip memory where XLA placed it; tpu/accounting.py).
    "hbm_bytes": float(executed["hbm_bytes"]),
    "cost_analysis_of": cost_source + "; loop bodies counted once per trip (tpu/accounting.py)",
    "per_chip_parameter_bytes": per_chip_bytes(args[0], input_shardings[0]),
    "per_chip_batch_bytes": per_chip_bytes(batch, input_shardings[-1]),
    "grouped_convolutions": len(re.findall(r"feature_group_count=(?!1\b)\d+", hlo)),
    "collectives": collectives(hlo),
  }


class CompiledSteps:
  """The train and eval steps of ``config``'s task compiled for ``mesh`` at one global batch.

  With ``profile_dir``, the train step's compile runs inside a ``jax.profiler`` trace written there
  (``compile_profile``: where the compiler spent it; the compile is slower for it)."""

  def __init__(self, config, mesh, global_batch: int, *, profile_dir: str | None = None):
    sharding.check_batch_size(global_batch, mesh)
    model, loss = recipes.build_model_and_loss(config)
    total_steps = int(config.num_epochs * NOMINAL_STEPS_PER_EPOCH)
    self.steps, (params, batch_stats, other) = steps.build_steps(
      config, model, loss, mesh, steps_per_epoch=NOMINAL_STEPS_PER_EPOCH, total_steps=total_steps
    )
    state = abstract_replicated((params, batch_stats, other), mesh)
    opt_state = abstract_replicated(jax.eval_shape(self.steps.tx.init, params), mesh)
    step = jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(mesh))
    batch_keys = recipes.BATCH_KEYS[config.task]
    train_batch = abstract_batch(config, batch_keys, global_batch, mesh)
    eval_keys = steps.eval_batch_keys(recipes.AUGMENTATIONS[config.task], batch_keys)
    eval_batch = abstract_batch(config, eval_keys, config.eval_batch_size, mesh)
    self.global_batch = global_batch
    self.parameter_bytes = sum(_nbytes(x) for x in jax.tree.leaves(params))
    self.global_batch_bytes = sum(_nbytes(x) for x in train_batch.values())
    with jax.set_mesh(mesh):
      start, start_cpu = time.perf_counter(), time.process_time()
      train_args = (*state, opt_state, step, train_batch)
      lowered = self.steps.train.lower(*train_args)
      with jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext():
        compiled = lowered.compile()
      self.train_compile_seconds = time.perf_counter() - start
      # CPU seconds (all threads): comparable across runs on a loaded machine, unlike wall time.
      self.train_compile_cpu_seconds = time.process_time() - start_cpu
      self.train_hlo = compiled.as_text()
      self.train_entries = accounting.account(self.train_hlo)  # per instruction (hlo_accounting.py)
      self.train = _compiled_summary(
        lowered, compiled, self.train_entries, train_args, train_batch, mesh.size
      )
      start = time.perf_counter()
      eval_args = (*state, eval_batch)
      lowered = self.steps.eval.lower(*eval_args)
      compiled = lowered.compile()
      self.eval_compile_seconds = time.perf_counter() - start
      self.eval = _compiled_summary(
        lowered, compiled, accounting.account(compiled.as_text()), eval_args, eval_batch, mesh.size
      )


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def largest_fitting_batch(
  peak_memory_at: Callable[[int], int | None],
  *,
  known: tuple[int, int],
  hbm_bytes: int,
  multiple: int,
  max_compiles: int,
) -> dict:
  """Largest global batch (a multiple of ``multiple``) whose train step fits ``hbm_bytes`` per chip.

  ``peak_memory_at(batch)`` compiles and returns the per-chip peak, or None when the compiler runs out
  of memory. Starting from ``known`` = (batch, peak), it doubles once, then places each further
  compile where the line through the last two fitting peaks meets ``hbm_bytes`` (peak memory grows
  linearly with the batch), kept strictly between the largest fit and the smallest failure; at most
  ``max_compiles`` compiles. ``exact`` says whether the answer was pinned down to ``multiple``.
  """
  fits = {known[0]: known[1]} if known[1] <= hbm_bytes else {}
  fails = set() if fits else {known[0]}
  probes = [{"global_batch": known[0], "peak_memory_bytes": known[1]}]
  for _ in range(max_compiles):
    low = max(fits, default=0)
    high = min(fails, default=None)
    if high is not None and high - low <= multiple:
      break
    if len(fits) >= 2:
      (b1, p1), (b2, p2) = sorted(fits.items())[-2:]
      slope = (p2 - p1) / (b2 - b1)
      guess = b2 + (hbm_bytes - p2) / slope if slope > 0 else 2 * b2
    elif fits:
      guess = 2 * low
    else:
      guess = high / 2
    batch = max(int(guess // multiple) * multiple, low + multiple)
    if high is not None:
      batch = min(batch, high - multiple)
    if batch <= 0:
      break
    peak = peak_memory_at(batch)
    probes.append({"global_batch": batch, "peak_memory_bytes": peak})
    if peak is not None and peak <= hbm_bytes:
      fits[batch] = peak
    else:
      fails.add(batch)
  low, high = max(fits, default=None), min(fails, default=None)
  return {
    "largest_fitting": low,
    "smallest_failing": high,
    "exact": low is not None and high is not None and high - low <= multiple,
    "probes": probes,
  }


def roofline(flops_per_chip: float, bytes_per_chip: float, global_batch: int, spec: chips.ChipSpec) -> dict:
  """Lower bound on step time: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth)."""
  compute_seconds = flops_per_chip / spec.peak_bf16_flops
  memory_seconds = bytes_per_chip / spec.hbm_bytes_per_second
  seconds = max(compute_seconds, memory_seconds)
  return {
    "step_seconds_lower_bound": seconds,
    "bound_by": "compute" if compute_seconds >= memory_seconds else "memory",
    "compute_seconds": compute_seconds,
    "memory_seconds": memory_seconds,
    "images_per_second_upper_bound": global_batch / seconds if seconds else None,
    "mfu_at_bound": compute_seconds / seconds if seconds else None,
  }
