"""scripts/benchmark.py: paired ratios with their spread, the load record, the per-operation profile.

Timings are never asserted (they depend on the machine); the statistics and the report's fields are.
"""

import json
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from l2vit_jax.models import depthwise, l2vit
from scripts import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summarize_reports_median_and_range():
  assert benchmark.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                                  "rounds": [3.0, 1.0, 2.0]}
  assert benchmark.summarize([4.0, 1.0, 2.0, 3.0])["median"] == 2.5


def test_paired_rounds_alternate_order_and_pair_ratios():
  calls = []
  runners = {name: (lambda steps, name=name: calls.append((name, steps))) for name in ("ours", "theirs")}
  rounds = benchmark._paired_rounds(runners, steps=2, pairs=3)  # pylint: disable=protected-access
  assert [name for name, _ in calls] == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
  assert all(steps == 2 for _, steps in calls) and all(len(v) == 3 for v in rounds.values())
  # Reference time over ours, per round: ours twice as fast in every round reads 2.0.
  ratio = benchmark._ratio_summary([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # pylint: disable=protected-access
  assert ratio["median"] == ratio["min"] == ratio["max"] == 2.0


def test_load_monitor_marks_a_loaded_machine(monkeypatch):
  load = benchmark.LoadMonitor().finish()
  assert {"loadavg_1min_before", "loadavg_1min_after", "cpu_count", "loaded_fraction_threshold",
          "loaded"} <= load.keys()
  if os.path.exists("/proc/stat"):
    assert 0.0 <= load["other_processes_cpu_fraction"]
  # Any foreign CPU at all counts as load when the threshold is below zero, none when above one.
  monkeypatch.setattr(benchmark, "LOADED_FRACTION", -1.0)
  assert benchmark.LoadMonitor().finish()["loaded"]
  monkeypatch.setattr(benchmark, "LOADED_FRACTION", 2.0)
  assert not benchmark.LoadMonitor().finish()["loaded"]


def test_profile_scopes_every_dropout_mask_draw_as_dropout():
  # The model's own Dropout (8-bit masks) once escaped the profile, which wrapped nnx.Dropout: its
  # mask draws counted as 'other'. Every op under the model's 'dropout' scope must carry the profile's.
  with benchmark._Wrapped(benchmark._jax_scope_targets(), benchmark._jax_scoped):  # pylint: disable=protected-access
    model = l2vit.L2ViT(img_size=10, patch_size=5, embed_dim=8, depth=1, num_heads=2,
                        drop_path_rate=0.0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    hlo = forward.lower(state, jax.numpy.ones((2, 10, 10, 8))).compile().as_text()
  draws = [name for name in re.findall(r'op_name="([^"]*)"', hlo) if '/dropout/' in name]  # model's scope
  assert draws and all('cat_dropout_droppath' in name for name in draws), draws


def test_tiny_run_writes_every_section_with_paired_ratios_load_and_profile(tmp_path):
  # One run of the command line for every section: the model sections compile a train step, the
  # costly part (≈ 20 s on 2 busy cores).
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--tiny", "--pairs=3", "--out", str(out),
       "--only=matmul,model,depthwise,attention,pipeline,profile"],
      capture_output=True, text=True, check=False, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout) == report
  assert {"date", "hardware", "matmul", "model", "depthwise", "attention", "pipeline", "profile"} <= report.keys()
  assert isinstance(report["loaded"], bool)
  for section in ("model", "profile"):
    assert isinstance(report[section]["loaded"], bool)
    assert report[section]["load"]["loaded_fraction_threshold"] == benchmark.LOADED_FRACTION
  assert ("LOADED MACHINE" in result.stderr) == report["loaded"]
  model = report["model"]
  for key in ("train_img_per_s", "inference_img_per_s", "train_compile_seconds",
              "train_fraction_of_matmul_peak", "analytic_train_gflop_per_image", "peak_rss_mib"):
    assert model[key] > 0, key
  assert model["pairs"] == 3 and len(model["train_img_per_s_rounds"]["rounds"]) == 3
  assert set(report["depthwise"]["implementations"]) == set(depthwise.IMPLEMENTATIONS[1:])
  assert all(r["linear_ms"] > 0 and r["softmax_ms"] > 0 for r in report["attention"]["forward"])
  pipe = report["pipeline"]
  assert set(pipe["formats"]) == {"hdf5", "sparse"} and pipe["size_ratio_hdf5_over_sparse"] > 1
  profile = report["profile"]
  # The scopes that attribute our operations are found in the trace, forward and backward.
  assert {"linear_matmuls/fwd", "linear_matmuls/bwd", "gelu/fwd", "layernorm/fwd",
          "depthwise_lcm/bwd"} <= set(
      profile["ours"]["train"]["ms_per_step"])
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("no torch: no ours/PyTorch ratios")
  for kind in ("train", "inference"):
    ratio = model[f"ratio_{kind}_ours_over_torch_rounds"]
    assert len(ratio["rounds"]) == 3 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert model[f"ratio_{kind}_ours_over_torch"] == ratio["median"] > 0
  assert "ratio_train_ours_over_torch: median" in result.stderr
  for who in ("ours", "torch"):
    for kind in ("train", "inference"):
      times = profile[who][kind]["ms_per_step"]
      assert {key.split("/")[0] for key in times} <= set(benchmark.PROFILE_CATEGORIES), (who, kind)
      assert sum(times.values()) > 0


def test_fill_batch_is_the_largest_power_of_two_whose_plan_fits():
  # 100 fixed bytes + 10 per image: 64 images need 740 bytes, 128 need 1380.
  assert benchmark.choose_fill_batch(100, 10, 740, max_batch=1024) == 64
  assert benchmark.choose_fill_batch(100, 10, 739, max_batch=1024) == 32
  assert benchmark.choose_fill_batch(100, 10, 10**9, max_batch=16) == 16
  assert benchmark.choose_fill_batch(100, 10, 50, max_batch=1024) == 1  # never below one image


def test_accelerator_run_fills_the_batch_reports_mfu_and_times_pytorch_under_bf16_autocast(
    monkeypatch, tmp_path):
  # The GPU command on the CPU: a device memory limit and an H100's name stand in for the GPU's.
  from l2vit_jax.tpu import chips  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(benchmark, "_device_bytes_limit", lambda: 4 * 2**30)
  monkeypatch.setattr(benchmark, "_chip", lambda: chips.spec_for_device_kind("NVIDIA H100 80GB HBM3"))
  report = benchmark.main(["--accelerator", "--tiny", "--max-batch=8", "--pairs=1",
                           "--out", str(tmp_path / "gpu.json")])
  fill, model = report["batch_fill"], report["model"]
  assert fill["batch"] == 8 and fill["temp_bytes_per_image"] > 0 and fill["fixed_bytes"] > 0
  assert model["config"]["batch"] == 8 and model["config"]["dtype"] == "bfloat16"
  assert model["published_peak_bf16_flops"] == 989e12
  assert model["train_mfu"] == pytest.approx(
      model["analytic_train_gflop_per_image"] * 1e9 * model["train_img_per_s"] / 989e12)
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("no torch: no PyTorch reference")
  assert model["torch"]["autocast_dtype"] == "torch.bfloat16" and model["torch"]["device"] == "cpu"
  assert model["torch"]["batch"] == 8
  assert model["torch"]["inference_mfu"] == pytest.approx(
      model["analytic_inference_gflop_per_image"] * 1e9 * model["torch"]["inference_img_per_s"] / 989e12)
  assert model["torch"]["train_mfu"] > 0
