"""Compile-only checks: the real train step compiles for a v5e slice (and, where the CUDA plugin is
installed, for H100s) on this CPU-only machine.

Compiles run ``scripts/compile_tpu.py`` in a subprocess: libtpu and the CUDA plugin must see their
environment before JAX starts its backends, and the test process's own JAX stays CPU-only.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from l2vit_jax.runtime import sharding
from l2vit_jax.tpu import chips, compile_only
from l2vit_jax.training import recipes, steps
from l2vit_jax.models import depthwise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL_FLAGS = [
  "--config.model.embed_dim=32",
  "--config.model.depth=2",
  "--config.model.num_heads=2",
  "--config.model.mlp_ratio=2.0",
  "--config.model.img_size=25",
  "--config.model.dtype=bfloat16",
]


def _compile_report(out_dir, topology: str) -> dict:
  out = out_dir / "report.json"
  command = [
    sys.executable,
    os.path.join(REPO, "scripts", "compile_tpu.py"),
    f"--topology={topology}",
    "--config=" + os.path.join(REPO, "configs", "finetune.py"),
    *TINY_MODEL_FLAGS,
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--max_batch=false",
    f"--out={out}",
  ]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def v5e_report(tmp_path_factory):
  pytest.importorskip("libtpu", reason="needs jax[tpu] (requirements-test.txt) for libtpu")
  return _compile_report(tmp_path_factory.mktemp("v5e"), "v5e:2x2")


@pytest.fixture(scope="module")
def h100_report(tmp_path_factory):
  if not (importlib.util.find_spec("jax_plugins") and importlib.util.find_spec("jax_plugins.xla_cuda12")):
    pytest.skip('needs the CUDA plugin (pip install "jax[cuda12]"; ~3 GB, not in CI), no GPU')
  return _compile_report(tmp_path_factory.mktemp("h100"), "h100:4")


@pytest.mark.parametrize("target", ["v5e_report", "h100_report"])
def test_tiny_train_step_compiles_split_over_four_chips(target, request):
  report = request.getfixturevalue(target)
  assert (report["chips"], report["hosts"]) == (4, 1)
  assert report["platform"] == {"v5e_report": "tpu", "h100_report": "gpu"}[target]
  train_step = report["train_step"]
  # The batch is split over the 4 chips, parameters are whole on each (replicated).
  assert train_step["per_chip_batch_bytes"] * 4 == report["global_batch_bytes"] > 0
  assert train_step["per_chip_parameter_bytes"] == report["parameter_bytes"] > 0
  # Replicated parameters need their gradients summed over chips.
  assert train_step["collectives"]["all-reduce"]["count"] >= 1
  assert 0 < train_step["peak_memory_bytes"] <= report["chip_spec"]["hbm_bytes"] and report["fits_hbm"]
  assert train_step["flops"] > 0 and report["eval_step"]["flops"] > 0
  assert report["roofline"]["step_seconds_lower_bound"] > 0


@pytest.mark.parametrize("target", ["v5e_report", "h100_report"])
def test_depthwise_and_prng_follow_the_target_not_the_host(target, request):
  report = request.getfixturevalue(target)
  # This host alone would pick the CPU formulation; the target's step must have grouped convolutions.
  assert depthwise.resolve_implementation("auto") != "lax"
  assert report["depthwise_implementation"] == "lax"
  assert report["train_step"]["grouped_convolutions"] > 0
  assert report["prng_impl"] == {"v5e_report": "rbg", "h100_report": "threefry2x32"}[target]


@pytest.mark.parametrize("target", ["v5e_report", "h100_report"])
def test_tpu_steps_scan_their_blocks_and_count_every_trip_of_the_loop(target, request):
  report = request.getfixturevalue(target)
  if target == "h100_report":  # 'auto' scans on TPU only
    assert (report["scan_blocks"], report["remat_policy"]) == (False, "")
    return
  assert (report["scan_blocks"], report["remat_policy"]) == (True, "nothing_saveable")
  # XLA's cost analysis counts the scanned body once; the report counts it per block (2 here).
  train_step = report["train_step"]
  assert train_step["flops"] > 1.5 * train_step["xla_flops"]
  assert train_step["bytes_accessed"] > train_step["xla_bytes_accessed"]


def test_build_steps_with_rbg_keys_keeps_one_compilation_and_draws_by_step():
  """The dropout key implementation changes the masks, not the state crossing jit, and keys still
  depend only on (seed, step), which is what makes resumes exact."""
  config = tiny_config("finetune", prng_impl="rbg")
  config.model.update(drop_rate=0.5, drop_path_rate=0.5)
  model, loss = recipes.build_model_and_loss(config)
  mesh = sharding.make_mesh()
  jitted, (params, batch_stats, other) = steps.build_steps(
    config, model, loss, mesh, steps_per_epoch=10, total_steps=100
  )
  assert (jitted.platform, jitted.prng_impl) == ("cpu", "rbg")
  assert jitted.depthwise_implementation == depthwise.resolve_implementation("auto", "cpu")
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
    {
      "image": rng.exponential(1.0, (8, 25, 25, 8)).astype(np.float32),
      "label": np.arange(8, dtype=np.int32) % 2,
      "mass": rng.uniform(50, 300, 8).astype(np.float32),
    },
    mesh,
  )
  opt_state = jitted.tx.init(params)
  copy = lambda tree: jax.tree.map(np.array, tree)
  losses = []
  with jax.set_mesh(mesh):
    for step in (0, 1, 0):  # step 0 again, from the same state: the same masks
      new = jitted.train(copy(params), copy(batch_stats), other, copy(opt_state), np.int32(step), batch)
      losses.append(float(new[3]["loss"]))
  assert losses[0] == losses[2] != losses[1]
  assert jitted.train._cache_size() == 1  # pylint: disable=protected-access


def test_cloud_accelerator_types_map_to_topologies():
  expected = {
    "v5litepod-4": "v5e:2x2",
    "v5litepod-8": "v5e:2x4",
    "v5litepod-16": "v5e:4x4",
    "v5litepod-256": "v5e:16x16",
    "v6e-8": "v6e:2x4",
    "v5p-8": "v5p:2x2x1",
    "v5p-16": "v5p:2x2x2",
    "v4-8": "v4:2x2x1",
    "v4-32": "v4:2x2x4",
    "v4-128": "v4:4x4x4",
    "v5e:4x8": "v5e:4x8",
  }
  assert {name: chips.topology_for_accelerator_type(name) for name in expected} == expected
  with pytest.raises(ValueError, match="power-of-two"):
    chips.topology_for_accelerator_type("v4-1536")
  with pytest.raises(ValueError, match="unknown TPU generation"):
    chips.chip_spec("v9:2x2")


def test_device_kinds_as_jax_names_them_map_to_their_published_bf16_peaks():
  peaks = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v4": 275e12,
  }
  assert {kind: chips.spec_for_device_kind(kind).peak_bf16_flops for kind in peaks} == peaks
  assert chips.spec_for_device_kind("cpu") is None


def test_largest_fitting_batch_search_is_bounded_and_exact_for_linear_memory():
  hbm, compiles = 1000, []

  def peak_memory_at(batch):  # 100 bytes fixed, 3 per example; out of memory past HBM
    compiles.append(batch)
    peak = 100 + 3 * batch
    return peak if peak <= hbm else None

  found = compile_only.largest_fitting_batch(
    peak_memory_at, known=(8, 124), hbm_bytes=hbm, multiple=4, max_compiles=6
  )
  assert (found["largest_fitting"], found["smallest_failing"], found["exact"]) == (300, 304, True)
  assert len(compiles) <= 6 and all(b % 4 == 0 for b in compiles)
  bounded = compile_only.largest_fitting_batch(
    peak_memory_at, known=(8, 124), hbm_bytes=hbm, multiple=4, max_compiles=1
  )
  assert bounded["largest_fitting"] == 16 and not bounded["exact"]


def test_collectives_are_read_from_optimized_hlo_once_per_run():
  hlo = """HloModule m

%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[16]{0} get-tuple-element(%p), index=1
  %all-reduce.3 = f32[16]{0} all-reduce(%v), channel_id=3
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[16]{0}) tuple(%next, %all-reduce.3)
}

%cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[32], a: bf16[3,2,16], b: f32[], y: f32[8], z: f32[16]) -> f32[32] {
  %zero = s32[] constant(0)
  %init = (s32[], f32[16]{0}) tuple(%zero, %z)
  %all-reduce.1 = f32[32]{0:T(128)} all-reduce(%x), channel_id=1
  %all-reduce.2 = (bf16[3,2,16]{2,1,0}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=2
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%y), dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
  ROOT %fusion = f32[32]{0} fusion(%all-reduce.1), kind=kLoop
}
"""
  # The loop's all-reduce runs 6 times: its counter goes from 0 in steps of 1 while < 6 (libtpu
  # leaves no known_trip_count on its loops).
  assert compile_only.collectives(hlo) == {
    "all-reduce": {"count": 2 + 6, "bytes": 128 + 192 + 4 + 6 * 64},
    "all-gather": {"count": 1, "bytes": 128},
  }
  # A loop of another shape (here: counting from 2) cannot be read, and counts once.
  assert compile_only.collectives(hlo.replace("constant(0)", "constant(2)"))["all-reduce"]["count"] == 2 + 1


def test_compile_table_row_reads_the_report(v5e_report, tmp_path):
  """scripts/compile_table.py turns a report into the row of the compile table (docs/compile_only.md), cell for cell."""
  path = tmp_path / "report.json"
  path.write_text(json.dumps(v5e_report))
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "compile_table.py"), "--header", str(path)],
    capture_output=True,
    text=True,
    check=True,
  )
  header, rule, row = done.stdout.splitlines()
  assert len(header.split("|")) == len(rule.split("|")) == len(row.split("|"))
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert cells[:4] == ["finetune", "v5e:2x2", "8", "bfloat16"]
  step = v5e_report["train_step"]
  assert float(cells[4]) == pytest.approx(step["peak_memory_bytes"] / 2**30, abs=0.005)
  assert float(cells[8]) == pytest.approx(step["hbm_bytes"] / 1e9, abs=0.005)
  assert 0 < step["hbm_bytes"] <= step["bytes_accessed"]
  assert f"all-reduce {step['collectives']['all-reduce']['count']}×" in cells[9]
  assert cells[13].endswith(f"{v5e_report['roofline_hbm']['mfu_at_bound']:.2f}")
  assert cells[14] == "not searched"
