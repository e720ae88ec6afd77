"""scripts/benchmark.py and l2vit_jax/bench/: paired ratios with their spread, the load record, steps
built as training builds them, the per-part profile, the accelerator's filling batch.

Timings are never asserted (they depend on the machine); the statistics and the report's fields are.
"""

import json
import os
import re
import subprocess
import sys
import types

import jax
import pytest
from flax import nnx

from l2vit_jax.bench import fill, load, ours, profiling, timing
from l2vit_jax.models import depthwise, l2vit
from l2vit_jax.tpu import accounting, compile_only
from l2vit_jax.training import steps as training_steps
from scripts import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_args(*flags):
  return benchmark.parse_args(["--tiny", *flags])


def test_summarize_reports_median_and_range():
  assert timing.summarize([3.0, 1.0, 2.0]) == {
    "median": 2.0,
    "min": 1.0,
    "max": 3.0,
    "rounds": [3.0, 1.0, 2.0],
  }
  assert timing.summarize([4.0, 1.0, 2.0, 3.0])["median"] == 2.5


def test_paired_rounds_alternate_order_and_pair_ratios():
  calls = []
  runners = {name: (lambda steps, name=name: calls.append((name, steps))) for name in ("ours", "theirs")}
  rounds = timing.paired_rounds(runners, steps=2, pairs=3)
  assert [name for name, _ in calls] == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
  assert all(steps == 2 for _, steps in calls) and all(len(v) == 3 for v in rounds.values())
  # Reference time over ours, per round: ours twice as fast in every round reads 2.0.
  ratio = timing.ratio_summary([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
  assert ratio["median"] == ratio["min"] == ratio["max"] == 2.0


def test_load_monitor_marks_a_loaded_machine(monkeypatch):
  record = load.LoadMonitor().finish()
  assert {
    "loadavg_1min_before",
    "loadavg_1min_after",
    "cpu_count",
    "loaded_fraction_threshold",
    "loaded",
  } <= record.keys()
  if os.path.exists("/proc/stat"):
    assert 0.0 <= record["other_processes_cpu_fraction"]
  # Any foreign CPU at all counts as load when the threshold is below zero, none when above one.
  monkeypatch.setattr(load, "LOADED_FRACTION", -1.0)
  assert load.LoadMonitor().finish()["loaded"]
  monkeypatch.setattr(load, "LOADED_FRACTION", 2.0)
  assert not load.LoadMonitor().finish()["loaded"]


def test_machine_busy_seconds_counts_all_but_idle_iowait_and_guest(tmp_path):
  stat = tmp_path / "stat"
  # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
  stat.write_text("cpu  100 20 30 1000 50 5 5 0 7 3\ncpu0 ...\n")
  assert load.machine_busy_seconds(str(stat)) == pytest.approx(160 / os.sysconf("SC_CLK_TCK"))
  assert load.machine_busy_seconds(str(tmp_path / "missing")) is None


def test_profile_attributes_every_dropout_mask_draw_to_dropout():
  # The model's own Dropout (8-bit masks) once escaped the profile, which wrapped nnx.Dropout: its
  # mask draws counted as 'other'. The profile now reads the model's named scopes through
  # tpu/accounting.py: every random draw (drop path off: all are dropout's) must count as dropout.
  model = l2vit.L2ViT(
    img_size=10,
    patch_size=5,
    embed_dim=8,
    depth=1,
    num_heads=2,
    drop_rate=0.5,
    drop_path_rate=0.0,
    rngs=nnx.Rngs(0),
  )
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
  hlo = forward.lower(state, jax.numpy.ones((2, 10, 10, 8))).compile().as_text()
  parts = profiling.instruction_parts(hlo)
  draws = [entry.name for entry in accounting.account(hlo) if "threefry" in entry.op_name]
  assert draws and all(parts[name] == "dropout/forward" for name in draws), draws
  # Loops enclose thunks traced themselves: they are not counted.
  loops = re.findall(r"%?([\w.\-]+) = \([^=]*\) while\(", hlo)
  assert loops and all(parts[name] is None for name in loops)


def test_trace_milliseconds_counts_leaf_thunks_by_part_per_step():
  parts = {"fusion.1": "norm/backward", "dot.2": "mlp/forward", "while.3": None}
  events = [
    {"ph": "X", "name": "fusion.1", "dur": 3000, "args": {"hlo_op": "fusion.1"}},
    {"ph": "X", "name": "fusion.1", "dur": 1000, "args": {"hlo_op": "fusion.1"}},
    {"ph": "X", "name": "dot.2", "dur": 2000, "args": {"hlo_op": "dot.2"}},
    {"ph": "X", "name": "while.3", "dur": 9000, "args": {"hlo_op": "while.3"}},  # encloses others
    {"ph": "X", "name": "end: dot.2", "dur": 9000, "args": {"hlo_op": "dot.2"}},
    {"ph": "i", "name": "dot.2", "dur": 9000, "args": {"hlo_op": "dot.2"}},
    {"ph": "X", "name": "copy.9", "dur": 500, "args": {"hlo_op": "copy.9"}},  # unknown to the HLO
    {"ph": "X", "name": "python", "dur": 9000, "args": {}},
  ]
  assert profiling.trace_milliseconds(events, parts, steps=2) == {
    "norm/backward": 2.0,
    "mlp/forward": 1.0,
    "other/forward": 0.25,
  }


def _torch_event(name, parent=None, sequence_nr=-1, self_us=0.0):
  return types.SimpleNamespace(
    name=name, cpu_parent=parent, sequence_nr=sequence_nr, self_cpu_time_total=self_us
  )


def test_torch_milliseconds_takes_the_most_specific_part_and_the_forward_part_for_backward_ops():
  loss = _torch_event("part:loss")
  block_norm = _torch_event("part:norm", _torch_event("part:attention", loss))
  layer_norm = _torch_event("aten::layer_norm", block_norm, sequence_nr=7, self_us=4000)
  residual = _torch_event("aten::add", loss, sequence_nr=8, self_us=1000)
  engine = _torch_event("autograd::engine::evaluate_function: NativeLayerNormBackward0", sequence_nr=7)
  backward = _torch_event("aten::native_layer_norm_backward", engine, self_us=6000)
  step = _torch_event("aten::_foreach_add_", _torch_event("part:optimizer"), self_us=2000)
  loose = _torch_event("aten::empty", self_us=500)
  events = [loss, block_norm, layer_norm, residual, engine, backward, step, loose]
  assert profiling.torch_milliseconds(events, steps=1) == {
    "norm/forward": 4.0,
    "loss/forward": 1.0,
    "norm/backward": 6.0,
    "optimizer/forward": 2.0,
    "other/forward": 0.5,
  }


def test_torch_profile_names_the_reference_parts_as_ours_and_removes_its_hooks():
  pytest.importorskip("torch")
  from l2vit_jax.bench import pytorch  # pylint: disable=import-outside-toplevel

  args = _tiny_args()
  theirs = pytorch.TorchTrainer(args, ours.fake_batch(args))
  with profiling.torch_scopes(theirs):
    train = profiling.torch_profile(theirs.run_train, 1)["ms_per_step"]
  for part in ("patch_embed", "attention", "lcm", "mlp", "norm", "head", "dropout", "loss"):
    assert {f"{part}/forward", f"{part}/backward"} <= train.keys(), part
  assert "optimizer/forward" in train and set(k.split("/")[0] for k in train) <= set(profiling.CATEGORIES)
  # pylint: disable-next=protected-access
  hooked = [m for m in theirs.model.modules() if m._forward_hooks or m._forward_pre_hooks]
  assert not hooked
  assert theirs.scope is pytorch._no_scope  # pylint: disable=protected-access


def test_the_benchmarked_step_is_the_finetune_recipes_built_as_training_builds_it():
  args = _tiny_args("--depthwise-implementation=auto")
  config = ours.bench_config(args, "bfloat16")
  assert (config.task, config.learning_rate, config.backbone_learning_rate) == ("finetune", 1e-4, 5e-5)
  assert config.model.embed_dim == 32 and config.model.dtype == "bfloat16"
  batch = ours.fake_batch(args)
  built = ours.build(args, "float32", batch)
  # The loop's choices for this platform: 'auto' depthwise resolved, its prng, its block loop.
  platform = jax.devices()[0].platform
  assert built.steps.depthwise_implementation == depthwise.resolve_implementation("auto", platform)
  assert built.steps.scan_blocks == (platform in training_steps.SCAN_BLOCKS_PLATFORMS)
  warmup_end = int(config.warmup_epochs * compile_only.NOMINAL_STEPS_PER_EPOCH)
  assert float(built.steps.schedules["backbone"](warmup_end)) == pytest.approx(5e-5)
  assert set(built.batch) == {"image", "label", "mass"}
  mean, std = ours.mass_statistics(batch)
  assert mean == pytest.approx(float(batch["mass"].mean())) and std > 0
  assert ours.mass_statistics({"mass": batch["mass"][:1]})[1] == 1.0  # one image: no spread


def test_command_line_defaults_and_explicit_options():
  args = benchmark.parse_args(["--accelerator", "--tiny", "--steps=2"])
  assert (args.sections, args.batch, args.dtype, args.steps, args.pairs) == (
    ["model"],
    "fill",
    "bfloat16",
    2,
    2,
  )
  args = benchmark.parse_args(["--only=depthwise,profile", "--batch=8", "--dtype=bfloat16"])
  assert (args.sections, args.batch, args.dtype, args.steps, args.pairs) == (
    ["depthwise", "profile"],
    8,
    "bfloat16",
    3,
    5,
  )
  assert benchmark.parse_args([]).sections == [s for s in benchmark.SECTIONS if s != "profile"]
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--only=model,nonsense"])
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--batch=0"])


def test_tiny_run_writes_every_section_with_paired_ratios_load_and_profile(tmp_path):
  # One run of the command line for every section: the model sections compile a train step, the
  # costly part (≈ 20 s on 2 busy cores).
  out = tmp_path / "bench.json"
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "benchmark.py"),
      "--tiny",
      "--pairs=3",
      "--out",
      str(out),
      "--only=matmul,model,depthwise,attention,pipeline,profile",
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=REPO,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout) == report
  assert {
    "date",
    "hardware",
    "matmul",
    "model",
    "depthwise",
    "attention",
    "pipeline",
    "profile",
  } <= report.keys()
  assert isinstance(report["loaded"], bool)
  for section in ("model", "profile"):
    assert isinstance(report[section]["loaded"], bool)
    assert report[section]["load"]["loaded_fraction_threshold"] == load.LOADED_FRACTION
  assert ("LOADED MACHINE" in result.stderr) == report["loaded"]
  model = report["model"]
  for key in (
    "train_img_per_s",
    "inference_img_per_s",
    "train_compile_seconds",
    "train_fraction_of_matmul_peak",
    "analytic_train_gflop_per_image",
    "peak_rss_mib",
  ):
    assert model[key] > 0, key
  assert model["pairs"] == 3 and len(model["train_img_per_s_rounds"]["rounds"]) == 3
  assert set(report["depthwise"]["implementations"]) == set(depthwise.IMPLEMENTATIONS[1:])
  assert all(r["linear_ms"] > 0 and r["softmax_ms"] > 0 for r in report["attention"]["forward"])
  pipe = report["pipeline"]
  assert set(pipe["formats"]) == {"hdf5", "sparse"} and pipe["size_ratio_hdf5_over_sparse"] > 1
  profile = report["profile"]
  # The named scopes of tpu/accounting.py attribute our operations in the trace, forward and backward.
  assert profile["categories"] == list(profiling.CATEGORIES)
  assert {
    "attention/forward",
    "attention/backward",
    "mlp/forward",
    "norm/forward",
    "lcm/backward",
    "optimizer/forward",
  } <= set(profile["ours"]["train"]["ms_per_step"])
  pytest.importorskip("torch", reason="no torch: no ours/PyTorch ratios")
  for kind in ("train", "inference"):
    ratio = model[f"ratio_{kind}_ours_over_torch_rounds"]
    assert len(ratio["rounds"]) == 3 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert model[f"ratio_{kind}_ours_over_torch"] == ratio["median"] > 0
  assert "ratio_train_ours_over_torch: median" in result.stderr
  for who in ("ours", "torch"):
    for kind in ("train", "inference"):
      times = profile[who][kind]["ms_per_step"]
      assert {key.split("/")[0] for key in times} <= set(profiling.CATEGORIES), (who, kind)
      assert sum(times.values()) > 0


def test_fill_batch_is_the_largest_power_of_two_whose_plan_fits():
  # 100 fixed bytes + 10 per image: 64 images need 740 bytes, 128 need 1380.
  assert fill.choose_fill_batch(100, 10, 740, max_batch=1024) == 64
  assert fill.choose_fill_batch(100, 10, 739, max_batch=1024) == 32
  assert fill.choose_fill_batch(100, 10, 10**9, max_batch=16) == 16
  assert fill.choose_fill_batch(100, 10, 50, max_batch=1024) == 1  # never below one image


def test_accelerator_run_fills_the_batch_reports_mfu_and_times_pytorch_under_bf16_autocast(
  monkeypatch, tmp_path
):
  # The GPU command on the CPU: a device memory limit and an H100's name stand in for the GPU's.
  from l2vit_jax.tpu import chips  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(fill, "device_bytes_limit", lambda: 4 * 2**30)
  monkeypatch.setattr(fill, "chip", lambda: chips.spec_for_device_kind("NVIDIA H100 80GB HBM3"))
  report = benchmark.main(
    ["--accelerator", "--tiny", "--max-batch=8", "--pairs=1", "--out", str(tmp_path / "gpu.json")]
  )
  fill_record, model = report["batch_fill"], report["model"]
  assert fill_record["batch"] == 8
  assert fill_record["temp_bytes_per_image"] > 0 and fill_record["fixed_bytes"] > 0
  assert model["config"]["batch"] == 8 and model["config"]["dtype"] == "bfloat16"
  assert model["published_peak_bf16_flops"] == 989e12
  assert model["train_mfu"] == pytest.approx(
    model["analytic_train_gflop_per_image"] * 1e9 * model["train_img_per_s"] / 989e12
  )
  pytest.importorskip("torch", reason="no torch: no PyTorch reference")
  assert model["torch"]["autocast_dtype"] == "torch.bfloat16" and model["torch"]["device"] == "cpu"
  assert model["torch"]["batch"] == 8
  assert model["torch"]["inference_mfu"] == pytest.approx(
    model["analytic_inference_gflop_per_image"] * 1e9 * model["torch"]["inference_img_per_s"] / 989e12
  )
  assert model["torch"]["train_mfu"] > 0
