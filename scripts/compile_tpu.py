"""Compiles the real train and eval steps for a TPU slice on a machine without one; prints JSON.

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu, ~700 MB
  python scripts/compile_tpu.py --topology=v5e:2x2 --config=configs/simclr.py
  python scripts/compile_tpu.py --topology=v5litepod-16 --config=configs/finetune.py \
      --config.model.dtype=bfloat16 --max_batch=false

``--topology`` takes libtpu names (``v5e:2x2``, ``v5e:4x4``, ``v5p:2x2x2``, ``v4:2x2x1``, ``v6e:2x2``),
Cloud accelerator types (``v5litepod-8``, ``v5p-16``) or ``h100:N`` (N H100s on one host, through the
CUDA plugin: ``pip install "jax[cuda12]"``, no GPU needed). The steps are ``training.steps.build_steps``'s, with
``runtime.sharding``'s mesh and shardings; the model, dtype and global batch come from the config. The
JSON (docs/compile_only.md) gives, per chip: peak memory, FLOPs and bytes accessed per
step, the batch and parameter bytes each chip holds, the collectives in the optimized HLO; the
depthwise formulation and PRNG used; compile times; the largest global batch whose train step fits the
chip's HBM (a bounded search over compiles; ``--max_batch=false`` skips it); and a roofline lower
bound on step time from the chip's published figures, with the img/s and MFU it implies.
"""

from __future__ import annotations

import json
import time


from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from l2vit_jax.tpu import compile_only

compile_only.set_compile_only_environment()  # before JAX starts any backend

import jax  # pylint: disable=wrong-import-position

from l2vit_jax.tpu import chips

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "libtpu topology or Cloud accelerator type.")
_MAX_BATCH = flags.DEFINE_bool("max_batch", True, "Search for the largest global batch that fits HBM.")
_MAX_BATCH_COMPILES = flags.DEFINE_integer(
  "max_batch_compiles", 4, "At most this many extra train-step compiles for the search."
)
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def report(config, topology: str, *, max_batch: bool, max_batch_compiles: int) -> dict:
  """The compile-only report for ``config`` on ``topology`` (see the module docstring)."""
  topology = chips.topology_for_accelerator_type(topology)
  spec = chips.chip_spec(topology)
  mesh = compile_only.compile_only_mesh(topology)
  devices = list(mesh.devices.flat)
  num_chips = len(devices)
  compiled = compile_only.CompiledSteps(config, mesh, config.batch_size)
  train = compiled.train
  flops_per_step = train["flops"] * num_chips
  result = {
    "topology": topology,
    "chip": devices[0].device_kind,
    "chips": num_chips,
    "hosts": len({d.process_index for d in devices}),
    "task": config.task,
    "dtype": config.model.dtype,
    "global_batch": config.batch_size,
    "eval_global_batch": config.eval_batch_size,
    "platform": compiled.steps.platform,
    "depthwise_implementation": compiled.steps.depthwise_implementation,
    "prng_impl": compiled.steps.prng_impl,
    "scan_blocks": compiled.steps.scan_blocks,
    "remat_policy": compiled.steps.remat_policy,
    "jax": jax.__version__,
    "train_compile_seconds": round(compiled.train_compile_seconds, 1),
    "train_compile_cpu_seconds": round(compiled.train_compile_cpu_seconds, 1),
    "eval_compile_seconds": round(compiled.eval_compile_seconds, 1),
    "parameter_bytes": compiled.parameter_bytes,
    "global_batch_bytes": compiled.global_batch_bytes,
    "train_step": train,
    "eval_step": compiled.eval,
    "flops_per_step_all_chips": flops_per_step,
    "flops_per_image": flops_per_step / config.batch_size,
    "chip_spec": {
      "hbm_bytes": spec.hbm_bytes,
      "peak_bf16_flops": spec.peak_bf16_flops,
      "hbm_bytes_per_second": spec.hbm_bytes_per_second,
      "source": spec.source,
    },
    "fits_hbm": train["peak_memory_bytes"] <= spec.hbm_bytes,
    "roofline": dict(
      compile_only.roofline(train["flops"], train["bytes_accessed"], config.batch_size, spec),
      flops="train_step.flops, per chip (forward, backward, optimizer as XLA "
      "counts them, whatever the precision; see train_step.cost_analysis_of)",
    ),
    # The same bound from the HBM traffic alone: what bounds a TPU step, if XLA's placement holds.
    "roofline_hbm": compile_only.roofline(train["flops"], train["hbm_bytes"], config.batch_size, spec),
  }
  if max_batch:

    def peak_memory_at(batch):
      try:
        return compile_only.CompiledSteps(config, mesh, batch).train["peak_memory_bytes"]
      except Exception as e:  # pylint: disable=broad-except
        if compile_only.is_out_of_memory(e):
          return None
        raise

    start = time.perf_counter()
    result["max_global_batch"] = compile_only.largest_fitting_batch(
      peak_memory_at,
      known=(config.batch_size, train["peak_memory_bytes"]),
      hbm_bytes=spec.hbm_bytes,
      multiple=num_chips,
      max_compiles=max_batch_compiles,
    )
    result["max_global_batch"]["seconds"] = round(time.perf_counter() - start, 1)
  return result


def main(argv):
  del argv
  result = report(
    _CONFIG.value, _TOPOLOGY.value, max_batch=_MAX_BATCH.value, max_batch_compiles=_MAX_BATCH_COMPILES.value
  )
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
