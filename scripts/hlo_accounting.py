"""Where the train step's bytes and FLOPs go, per model part, from its optimized HLO; prints JSON.

  python scripts/hlo_accounting.py --topology=v5e:2x2 --config=configs/finetune.py \
      --config.model.dtype=bfloat16 --config.batch_size=64 --table
  python scripts/hlo_accounting.py --topology=cpu --config=configs/finetune.py --config.batch_size=16

The step is the training loop's own (``tpu.compile_only.CompiledSteps``), compiled for a TPU topology
without a TPU (libtpu as a compile-only backend), or for this machine's CPU with ``--topology=cpu``.
``l2vit_jax.tpu.accounting`` attributes every executed instruction to a model part (named scopes)
and direction; the rows add up to XLA's own ``bytes_accessed``, and each also says how much of it is
HBM traffic (the rest is in on-chip memory, where XLA's memory-space assignment put it). On a TPU
topology the report has the roofline bound from both. ``--table`` also prints the markdown table (per
image) used in docs/performance.md. ``--compile_profile=N`` profiles the train step's compile and
adds the N instructions whose code generation took longest (``l2vit_jax.tpu.compile_profile``; the
compile is slower under the profiler, so its seconds are not the step's compile time).
"""

from __future__ import annotations

import contextlib
import json
import tempfile

from absl import app, flags
from ml_collections import config_flags

from l2vit_jax.tpu import compile_only

compile_only.set_compile_only_environment()  # before JAX starts any backend

from l2vit_jax.runtime import sharding  # pylint: disable=wrong-import-position
from l2vit_jax.tpu import accounting, compile_profile  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "libtpu topology, Cloud accelerator type or 'cpu'.")
_TABLE = flags.DEFINE_bool("table", False, "Also print the per-image markdown table.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")
_COMPILE_PROFILE = flags.DEFINE_integer(
  "compile_profile", 0, "Profile the train step's compile; report this many slowest instructions."
)
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "Also write the optimized HLO text of the train step here.")


def main(argv):
  del argv
  config = _CONFIG.value
  if _TOPOLOGY.value == "cpu":
    mesh = sharding.make_mesh()
  else:
    mesh = compile_only.compile_only_mesh(compile_only.chips.topology_for_accelerator_type(_TOPOLOGY.value))
  with tempfile.TemporaryDirectory() if _COMPILE_PROFILE.value else contextlib.nullcontext() as profile_dir:
    compiled = compile_only.CompiledSteps(config, mesh, config.batch_size, profile_dir=profile_dir)
    profile = (
      compile_profile.slowest(
        compile_profile.emission_seconds(profile_dir), compiled.train_entries, top=_COMPILE_PROFILE.value
      )
      if profile_dir
      else None
    )
  summary = accounting.summarise(
    compiled.train_entries,
    xla_bytes=compiled.train["xla_bytes_accessed"],
    xla_flops=compiled.train["xla_flops"],
  )
  per_chip_batch = config.batch_size // mesh.size
  report = {
    "topology": _TOPOLOGY.value,
    "task": config.task,
    "dtype": config.model.dtype,
    "global_batch": config.batch_size,
    "per_chip_batch": per_chip_batch,
    "bytes_accessed_per_image": compiled.train["bytes_accessed"] / per_chip_batch,
    "hbm_bytes_per_image": summary["hbm_bytes"] / per_chip_batch,
    "train_compile_cpu_seconds": compiled.train_compile_cpu_seconds,
    "scan_blocks": compiled.steps.scan_blocks,
    "remat_policy": compiled.steps.remat_policy,
    **summary,
  }
  if profile:
    report["compile_profile"] = profile
  if _TOPOLOGY.value != "cpu":
    # The roofline bound twice: with XLA's bytes accessed (on-chip traffic included, as
    # compile_tpu.py reports it) and with the HBM traffic alone, which is what bounds a TPU step.
    spec = compile_only.chips.chip_spec(_TOPOLOGY.value)
    report["roofline_xla_bytes"] = compile_only.roofline(
      compiled.train["flops"], compiled.train["bytes_accessed"], config.batch_size, spec
    )
    report["roofline_hbm_bytes"] = compile_only.roofline(
      compiled.train["flops"], summary["hbm_bytes"], config.batch_size, spec
    )
  text = json.dumps(report, indent=2)
  print(text)
  if _TABLE.value:
    print(accounting.markdown_table(summary, per=per_chip_batch))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(compiled.train_hlo)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
