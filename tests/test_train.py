"""The shared training loop on tiny configs: loss goes down, devices and resumes don't change results."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TEST_XLA_FLAGS, flat_params, run_two_processes, tiny_config, write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io, naming
from l2vit_jax.runtime import process_setup, sharding
from l2vit_jax.training import loop, optimizer, recipes, steps
from l2vit_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return {
    "labelled": write_jet_file(root / "labelled.h5", num=64),
    "unlabelled": write_jet_file(root / "unlabelled.h5", num=48, labelled=False),
  }


def _config(task, files, **overrides):
  return tiny_config(task, files["labelled"], files["unlabelled"], **overrides)


def _step_on_fixed_batch(config, num_steps=2):
  """Losses of ``steps`` consecutive updates on one batch: entry i is the loss before update i."""
  task = recipes.build_task(config)
  batch = next(
    iter(
      pipeline.make_train_dataset(
        task.train_source, batch_size=config.batch_size, seed=0, augmentation=task.augmentation
      )
    )
  )
  mesh = sharding.make_mesh()
  batch = sharding.global_batch({k: batch[k] for k in task.batch_keys}, mesh)
  task.model.train()
  graphdef, params, batch_stats, other = nnx.split(task.model, nnx.Param, nnx.BatchStat, ...)
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedules(config, 10, 100))
  opt_state = tx.init(params)
  step_fn = steps.make_train_step(graphdef, task.loss, tx, jax.random.key(0))
  losses, before = [], jax.tree.map(np.asarray, params)
  for step in range(num_steps):
    params, batch_stats, opt_state, metrics = step_fn(
      params, batch_stats, other, opt_state, np.int32(step), batch
    )
    losses.append(float(metrics["loss"]))
  return losses, before, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("task", ["simclr", "finetune"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(files, task):
  losses, _, _ = _step_on_fixed_batch(_config(task, files, warmup_epochs=0))
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_differential_learning_rates_move_backbone_and_heads_at_their_rates(files):
  config = _config(
    "finetune", files, warmup_epochs=0, learning_rate=1e-3, backbone_learning_rate=1e-5, weight_decay=0.0
  )
  _, before, after = _step_on_fixed_batch(config, num_steps=1)
  change = jax.tree.map(lambda a, b: float(np.abs(a - b).mean()), before, after)
  flat = naming.flatten_names(nnx.to_pure_dict(change))
  head = np.mean([v for k, v in flat.items() if k.split("/")[0] in ("cls_head", "reg_head")])
  backbone = np.mean([v for k, v in flat.items() if k.split("/")[0] not in ("cls_head", "reg_head")])
  # Adam's first update is ≈ lr · sign(gradient) per parameter.
  assert 5e-4 < head < 1.5e-3 and 0 < backbone < 1.5e-5


def _latest_arrays(workdir):
  arrays, meta = model_io.read_model_checkpoint(workdir, prefer=(naming.LATEST_DIR,))
  return arrays, meta


def test_interrupted_and_resumed_run_equals_uninterrupted(files, tmp_path):
  config = _config("finetune", files, drop_rate=0.0)
  config.model.update(drop_rate=0.1, drop_path_rate=0.1)  # dropout keys must resume exactly too
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  interrupted = _config("finetune", files, stop_after_steps=3)
  interrupted.model.update(drop_rate=0.1, drop_path_rate=0.1)
  first = loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
  assert first["step"] == 3
  interrupted.stop_after_steps = 0
  second = loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
  assert second["step"] == straight["step"] == straight["total_steps"]
  want, _ = _latest_arrays(str(tmp_path / "straight"))
  got, _ = _latest_arrays(str(tmp_path / "resumed"))
  for group in want:
    for name in want[group]:
      np.testing.assert_array_equal(got[group][name], want[group][name], err_msg=name)
  assert second["best_val_loss"] == straight["best_val_loss"]


def test_a_run_with_scanned_blocks_trains_as_the_unrolled_run_and_writes_the_same_checkpoints(
  files, tmp_path
):
  runs = {}
  for scan in ("off", "on"):
    config = _config("finetune", files, scan_blocks=scan)
    config.model.update(depth=2, drop_rate=0.1, drop_path_rate=0.1)
    summary = loop.train_and_evaluate(config, str(tmp_path / scan))
    runs[scan] = summary, _latest_arrays(str(tmp_path / scan))[0]
  (unrolled, want), (scanned, got) = runs["off"], runs["on"]
  assert scanned["step"] == unrolled["step"] == unrolled["total_steps"]
  assert scanned["best_val_loss"] == pytest.approx(unrolled["best_val_loss"], rel=1e-3)
  for group in want:  # per-block names, shapes and (to float rounding) values: either model loads them
    assert set(got[group]) == set(want[group])
    for name in want[group]:
      np.testing.assert_allclose(got[group][name], want[group][name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_bridge_loads_backbone_and_leaves_heads_fresh(files, tmp_path):
  simclr_dir = str(tmp_path / "simclr")
  loop.train_and_evaluate(_config("simclr", files, num_epochs=1), simclr_dir)
  pretrained, meta = model_io.read_model_checkpoint(simclr_dir)
  assert meta["task"] == "simclr" and any(k.startswith("projector/") for k in pretrained["params"])
  bridged = recipes.build_task(_config("finetune", files, init_from=simclr_dir)).model
  fresh = recipes.build_task(_config("finetune", files)).model
  bridged_params = flat_params(bridged)
  fresh_params = flat_params(fresh)
  for name, value in bridged_params.items():
    if name.split("/")[0] in ("cls_head", "reg_head"):
      np.testing.assert_array_equal(value, fresh_params[name])
    else:
      np.testing.assert_array_equal(value, pretrained["params"]["encoder/" + name])
      assert not np.array_equal(value, fresh_params[name]) or name.endswith("bias")
  lcm_stats = flat_params(bridged, nnx.BatchStat)
  for name, value in lcm_stats.items():
    np.testing.assert_array_equal(value, pretrained["batch_stats"]["encoder/" + name])


def test_bridge_refuses_a_backbone_of_another_size(files, tmp_path):
  simclr_dir = str(tmp_path / "simclr")
  loop.train_and_evaluate(_config("simclr", files, num_epochs=1), simclr_dir)
  config = _config("finetune", files, init_from=simclr_dir)
  config.model.embed_dim = 48
  with pytest.raises(
    errors.CheckpointMismatchError, match=r"mis-shaped: blocks/0/attn/proj/bias \(32,\) vs model \(48,\)"
  ):
    recipes.build_task(config)


def _run_script(code, env_extra, timeout=300):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), JAX_PLATFORMS="cpu", **env_extra)
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_eight_devices_give_the_same_losses_as_one(files, tmp_path):
  code = f"""
      import json, jax
      from conftest import tiny_config
      from l2vit_jax.training import loop
      config = tiny_config("finetune", {files["labelled"]!r}, {files["unlabelled"]!r}, num_epochs=1)
      workdir = {str(tmp_path)!r} + "/devices" + str(jax.device_count())
      loop.train_and_evaluate(config, workdir)
      rows = [json.loads(l) for l in open(workdir + "/metrics.jsonl")]
      print(json.dumps([r["train/loss"] for r in rows] + [rows[-1]["val/loss"]]))
  """
  one = json.loads(_run_script(code, {}).splitlines()[-1])
  eight_devices = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"}
  eight = json.loads(_run_script(code, eight_devices).splitlines()[-1])
  assert len(one) == len(eight) > 2
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


def test_two_processes_train_checkpoint_and_resume(files, tmp_path):
  config_file = tmp_path / "two_process_config.py"
  config_file.write_text(
    textwrap.dedent(f"""
      from conftest import tiny_config
      def get_config():
        return tiny_config("finetune", {files["labelled"]!r}, {files["unlabelled"]!r})
  """)
  )
  workdir = tmp_path / "two_process"

  def launch(*overrides):
    argv = [
      sys.executable,
      "-m",
      "l2vit_jax.main",
      f"--config={config_file}",
      f"--workdir={workdir}",
      *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), JAX_PLATFORMS="cpu")
    results = run_two_processes(argv, env, tmp_path, timeout=300)
    for status, output in results:
      assert status == 0, output[-3000:]
    return [output for _, output in results]

  launch("--config.stop_after_steps=3")
  assert os.listdir(workdir / "checkpoints") == ["3"]
  outputs = launch()
  assert "Resumed finetune from step 3" in outputs[0]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) and steps[-1] == rows[-1]["step"]  # one writer, no duplicates
  assert "val/loss" in rows[-1]


def test_on_cpu_a_step_is_dispatched_only_after_the_previous_one_ended(files, tmp_path, monkeypatch):
  """XLA:CPU allocates a step's temporaries when it is dispatched; with freed memory kept for reuse
  (process_setup.configure_allocator, which main.py calls) every step run ahead would keep a block of its
  own. Each step here ends with a slow host callback, so a loop that ran ahead would dispatch before
  it ended."""
  make_train_step = steps.make_train_step
  previous_ended = []

  def make_slow_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)
    slow = jax.jit(
      lambda x: jax.pure_callback(
        lambda value: (time.sleep(0.2), value)[1], jax.ShapeDtypeStruct(x.shape, x.dtype), x
      )
    )
    last = {}

    def slow_train_step(*step_args):
      if last:
        previous_ended.append(all(leaf.is_ready() for leaf in jax.tree.leaves(last)))
      params, batch_stats, opt_state, metrics = train_step(*step_args)
      last.update(metrics, slow=slow(metrics["loss"]))
      return params, batch_stats, opt_state, dict(last)

    return slow_train_step

  monkeypatch.setattr(steps, "make_train_step", make_slow_train_step)
  monkeypatch.setattr(process_setup, "_allocator_tuned", True)  # as main.py leaves it on Linux
  loop.train_and_evaluate(
    _config("finetune", files, num_epochs=1, log_every_steps=1000), str(tmp_path)
  )  # no log row between steps: nothing else waits for them
  assert len(previous_ended) >= 3 and all(previous_ended), previous_ended
