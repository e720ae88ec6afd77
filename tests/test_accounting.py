"""Per-instruction accounting of optimized HLO (tpu/accounting.py) against XLA's own cost analysis."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from l2vit_jax.runtime import sharding
from l2vit_jax.tpu import accounting, compile_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entries_and_cost(function, *args):
  compiled = jax.jit(function).lower(*args).compile()
  return accounting.account(compiled.as_text()), compiled.cost_analysis()


def test_a_matmul_is_counted_exactly_as_xla_counts_it():
  entries, cost = _entries_and_cost(lambda x, w: x @ w, jnp.zeros((64, 128)), jnp.zeros((128, 256)))
  assert sum(e.bytes for e in entries) == cost["bytes accessed"] == 4 * (64 * 128 + 128 * 256 + 64 * 256)
  assert sum(e.flops for e in entries) == cost["flops"] == 2 * 64 * 128 * 256


def test_elementwise_arithmetic_and_transcendentals_are_counted_apart():
  entries, cost = _entries_and_cost(lambda x: jnp.exp(x) * 2 + x, jnp.zeros((1000,)))
  assert sum(e.flops for e in entries) == cost["flops"] == 2000
  assert sum(e.transcendentals for e in entries) == cost["transcendentals"] == 1000


def test_a_loop_body_counts_once_per_trip_where_xla_counts_it_once():
  def five_matmuls(x, w):
    return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), x, None, length=5)[0]

  entries, cost = _entries_and_cost(five_matmuls, jnp.zeros((64, 128)), jnp.zeros((128, 128)))
  matmul_flops = 2 * 64 * 128 * 128
  assert cost["flops"] < 2 * matmul_flops  # XLA: the body once
  executed = accounting.executed_cost(entries, xla_flops=cost["flops"], xla_bytes=cost["bytes accessed"])
  assert 5 * matmul_flops <= executed["flops"] < 5 * matmul_flops * 1.05
  assert executed["bytes_accessed"] > 3 * cost["bytes accessed"]
  summary = accounting.summarise(entries, xla_bytes=cost["bytes accessed"], xla_flops=cost["flops"])
  assert summary["attributed_flops"] == pytest.approx(executed["flops"], rel=0.01)


def test_a_scan_moves_one_slice_of_its_stacked_inputs_and_outputs_per_trip():
  """Counted whole, the stacked arrays would count six times over; sliced, the scan moves about what
  the same computation unrolled moves (and the unrolled one's static slices are counted as XLA
  counts them)."""

  def scanned(xs, w):
    return jax.lax.scan(lambda carry, x: (carry, jnp.tanh(x @ w)), 0.0, xs)[1]

  def unrolled(xs, w):
    return jnp.stack([jnp.tanh(xs[i] @ w) for i in range(xs.shape[0])])

  args = (jnp.zeros((6, 256, 128)), jnp.zeros((128, 128)))
  entries, cost = _entries_and_cost(unrolled, *args)
  assert sum(e.bytes for e in entries) == cost["bytes accessed"]
  scan_entries, scan_cost = _entries_and_cost(scanned, *args)
  executed = accounting.executed_cost(
    scan_entries, xla_flops=scan_cost["flops"], xla_bytes=scan_cost["bytes accessed"]
  )
  assert cost["bytes accessed"] <= executed["bytes_accessed"] < 1.25 * cost["bytes accessed"]


def test_the_innermost_model_part_and_the_backward_pass_are_read_from_op_names():
  assert accounting.scope_of("jit(train_step)/transpose(jvp(loss))/block0/lcm/norm/mul") == (
    "norm",
    "backward",
  )
  assert accounting.scope_of("jit(train_step)/jvp(loss)/block1/mlp/dropout/random_bits") == (
    "dropout",
    "forward",
  )
  assert accounting.scope_of("jit(train_step)/optimizer/add") == ("optimizer", "forward")
  assert accounting.scope_of("jit(train_step)/is_finite") == ("other", "forward")


@pytest.fixture(scope="module")
def tiny_step():
  config = tiny_config("finetune")
  config.model.update(img_size=25, drop_rate=0.1)
  compiled = compile_only.CompiledSteps(config, sharding.make_mesh(), 8)
  return compiled


def test_the_train_step_is_attributed_to_every_model_part_and_adds_up_to_xla(tiny_step):
  summary = accounting.summarise(
    accounting.account(tiny_step.train_hlo),
    xla_bytes=tiny_step.train["xla_bytes_accessed"],
    xla_flops=tiny_step.train["xla_flops"],
  )
  parts = set(summary["by_part"])
  for part in ("patch_embed", "attention", "lcm", "mlp", "norm"):
    assert {f"{part}/forward", f"{part}/backward"} <= parts, parts
  assert {"dropout/forward", "optimizer/forward", "loss/forward"} <= parts, parts
  assert sum(g["share_of_bytes"] for g in summary["by_part"].values()) == pytest.approx(1.0)
  assert summary["attributed_flops"] == pytest.approx(summary["xla_flops"], rel=0.05)
  assert summary["hbm_bytes"] == summary["attributed_bytes"]  # the CPU has one memory space
  assert summary["largest"][0]["bytes_read"] + summary["largest"][0]["bytes_written"] > 0
  assert "| attention/backward |" in accounting.markdown_table(summary, per=8)


def test_an_asynchronous_copy_or_slice_moves_its_data_once_at_its_start():
  hlo = """HloModule m

ENTRY %main (p: f32[16,128]) -> f32[4,128] {
  %p = f32[16,128]{1,0} parameter(0)
  %copy-start.1 = (f32[16,128]{1,0:S(1)}, f32[16,128]{1,0}, u32[]) copy-start(%p)
  %copy-done.1 = f32[16,128]{1,0:S(1)} copy-done(%copy-start.1)
  %slice-start.1 = ((f32[16,128]{1,0}), f32[4,128]{1,0:S(1)}, s32[]) slice-start(%copy-done.1), slice={[0:4], [0:128]}
  ROOT %slice-done.1 = f32[4,128]{1,0:S(1)} slice-done(%slice-start.1), metadata={op_name="jit(f)/block0/mlp/slice"}
}
"""
  entries = {e.opcode: e for e in accounting.account(hlo)}
  assert (entries["copy-start"].bytes_read, entries["copy-start"].bytes_written) == (8192, 8192)
  assert (entries["slice-start"].bytes_read, entries["slice-start"].bytes_written) == (2048, 2048)
  assert entries["copy-done"].bytes == entries["slice-done"].bytes == 0
  # No metadata of their own: they take the part of the operation that uses their result.
  assert entries["slice-start"].scope == entries["copy-start"].scope == "mlp"


def test_traffic_in_on_chip_memory_is_told_apart_from_hbm_traffic():
  # The prefetch reads 8 kB of HBM and writes them on chip; the add then reads the prefetched copy
  # (on chip) and p (HBM) and writes its result on chip: of the 40 kB XLA counts, 16 kB are HBM traffic.
  hlo = """HloModule m

ENTRY %main (p: f32[16,128]) -> f32[16,128] {
  %p = f32[16,128]{1,0} parameter(0)
  %copy-start.1 = (f32[16,128]{1,0:S(1)}, f32[16,128]{1,0}, u32[]) copy-start(%p)
  %copy-done.1 = f32[16,128]{1,0:S(1)} copy-done(%copy-start.1)
  ROOT %add.1 = f32[16,128]{1,0:T(8,128)S(1)} add(%copy-done.1, %p), metadata={op_name="jit(f)/block0/mlp/add"}
}
"""
  entries = {e.opcode: e for e in accounting.account(hlo)}
  assert (entries["copy-start"].bytes, entries["copy-start"].on_chip_bytes) == (16384, 8192)
  assert (entries["add"].bytes, entries["add"].on_chip_bytes) == (24576, 16384)
  summary = accounting.summarise(list(entries.values()), xla_bytes=40960, xla_flops=2048)
  assert summary["hbm_bytes"] == 16384 and summary["by_part"]["mlp/forward"]["hbm_bytes"] == 16384
  assert accounting.on_chip_bytes("(f32[4]{0:S(1)}, bf16[8]{0}, s8[2]{0:S(0)})") == 16


def test_a_batched_matmul_written_as_a_dilated_convolution_counts_one_tap_per_batch_element():
  conv = accounting.parse_instruction(
    "  %c = f32[16,4,625,64]{2,3,1,0} convolution(%a, %b), window={size=16x4 stride=15x3 "
    "lhs_dilate=16x4}, dim_labels=01bf_01oi->01bf"
  )
  conv.operand_types = ["f32[16,4,625,65]{2,3,1,0}", "f32[16,4,64,65]{3,2,1,0}"]
  assert accounting.instruction_flops(conv) == (2.0 * 16 * 4 * 625 * 64 * 65, 0.0)


def test_a_matmul_written_as_a_convolution_padded_over_an_input_of_extent_one_counts_one_tap():
  """libtpu wrote the qkv matmul of a large SimCLR batch this way; counting the 625-wide window as
  taps made the step 70 times its FLOPs."""
  conv = accounting.parse_instruction(
    "  %c = bf16[1024,625,768]{0,2,1} convolution(%a, %b), window={size=625 pad=624_624 "
    "rhs_reversal=1}, dim_labels=fb0_o0i->f0b"
  )
  conv.operand_types = ["bf16[256,768,1]{0,1,2}", "bf16[1024,625,256]{0,2,1}"]
  assert accounting.instruction_flops(conv) == (2.0 * 1024 * 625 * 768 * 256, 0.0)


def test_the_script_reports_a_tpu_steps_hbm_traffic_both_roofline_bounds_and_where_its_compile_went(tmp_path):
  tiny = [
    "--config.model.img_size=25",
    "--config.model.depth=1",
    "--config.model.embed_dim=32",
    "--config.model.num_heads=2",
    "--config.batch_size=8",
    "--config.model.dtype=bfloat16",
  ]
  hlo_out = tmp_path / "train.hlo"
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "hlo_accounting.py"),
      "--topology=v5e:2x2",
      "--config=configs/finetune.py",
      *tiny,
      "--compile_profile=3",
      f"--hlo_out={hlo_out}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["per_chip_batch"] == 2
  # Memory-space assignment puts some of the step's arrays on chip: less HBM traffic than XLA counts.
  assert 0 < report["hbm_bytes_per_image"] < report["bytes_accessed_per_image"]
  by_xla, by_hbm = report["roofline_xla_bytes"], report["roofline_hbm_bytes"]
  assert (
    by_hbm["memory_seconds"] < by_xla["memory_seconds"] and by_hbm["mfu_at_bound"] > by_xla["mfu_at_bound"]
  )
  # The compile's code generation, per instruction of the train step's own optimized HLO, slowest first.
  profile = report["compile_profile"]
  slowest = profile["slowest"]
  assert len(slowest) == 3 and profile["instructions"] >= 3
  assert slowest[0]["seconds"] >= slowest[1]["seconds"] >= slowest[2]["seconds"] > 0
  assert 0 < sum(row["share"] for row in slowest) <= 1
  assert profile["emission_seconds"] <= report["train_compile_cpu_seconds"]
  hlo = hlo_out.read_text()
  for row in slowest:
    assert f"%{row['instruction']} = " in hlo
  assert any(row["op_name"].startswith("jit(train_step)") for row in slowest)
