"""The label-efficiency study: nested subsets, the train-subset option, resume and bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import h5py
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config, write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io
from l2vit_jax.experiments import study
from l2vit_jax.training import loop, recipes
from l2vit_jax.data import split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- nested subsets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced_labels():
  return (np.random.default_rng(3).random(2000) < 0.3).astype(np.float32)


def test_label_counts_resolve_fractions_and_absolute_counts():
  assert split.resolve_label_counts((0.01, 0.05, 0.1, 0.25, 1.0), 7000) == [70, 350, 700, 1750, 7000]
  assert split.resolve_label_counts((250, 0.5, 1.0), 100) == [50, 100, 250]


def test_nested_subsets_are_nested_stratified_exact_and_inside_train(imbalanced_labels):
  parts = split.stratified_split(imbalanced_labels)
  counts = split.resolve_label_counts((0.01, 0.05, 0.25, 1.0), len(parts["train"]))
  subsets = split.nested_subsets(imbalanced_labels, parts["train"], counts, seed=5)
  fraction = imbalanced_labels[parts["train"]].mean()
  outside = np.concatenate([parts["val"], parts["test"]])
  for small, large in zip(counts, counts[1:]):
    assert set(subsets[small]) <= set(subsets[large])
  for count, subset in subsets.items():
    assert len(subset) == len(np.unique(subset)) == count
    assert np.all(np.diff(subset) > 0)
    assert not np.intersect1d(subset, outside).size
    assert abs(imbalanced_labels[subset].sum() - fraction * count) <= 1.0  # stratified to ±1 jet
  np.testing.assert_array_equal(np.sort(subsets[counts[-1]]), parts["train"])


def test_nested_subsets_are_deterministic_per_seed_and_differ_across_seeds(imbalanced_labels):
  train = split.stratified_split(imbalanced_labels)["train"]
  first = split.nested_subsets(imbalanced_labels, train, [50], seed=1)[50]
  np.testing.assert_array_equal(first, split.nested_subsets(imbalanced_labels, train, [50], seed=1)[50])
  assert not np.array_equal(first, split.nested_subsets(imbalanced_labels, train, [50], seed=2)[50])


def test_nested_subsets_refuse_counts_outside_the_train_split(imbalanced_labels):
  train = split.stratified_split(imbalanced_labels)["train"]
  with pytest.raises(ValueError, match="label count"):
    split.nested_subsets(imbalanced_labels, train, [len(train) + 1], seed=0)


# --- the train-subset option ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("study_data")
  return {
    "labelled": write_jet_file(root / "labelled.h5", num=80),
    "unlabelled": write_jet_file(root / "unlabelled.h5", num=48, labelled=False),
  }


def test_finetune_trains_on_the_subset_with_fixed_validation_and_test(files, tmp_path):
  config = tiny_config("finetune", files["labelled"], num_epochs=1)
  full = recipes.labelled_splits(config)
  with config.unlocked():
    config.data.train_subset, config.data.train_subset_seed = 16, 3
  labels = (np.arange(80) % 2).astype(np.float32)
  expected = split.nested_subsets(labels, split.stratified_split(labels)["train"], [16], seed=3)[16]
  subset = recipes.labelled_splits(config)
  assert len(subset["train"]) == 16 and len(subset["val"]) == len(full["val"])
  assert len(subset["test"]) == len(full["test"])
  with config.unlocked():
    config.data.train_repeats = 3
  repeated = recipes.labelled_splits(config)
  assert len(repeated["train"]) == 48 and repeated["mass_mean"] == subset["mass_mean"]
  config.data.train_repeats = 1
  summary = loop.train_and_evaluate(config, str(tmp_path / "ft"))
  assert summary["step"] == 16 // config.batch_size  # one epoch over the subset, not the full split
  _, meta = model_io.read_model_checkpoint(str(tmp_path / "ft"))
  assert meta["train_subset"] == 16 and meta["train_subset_seed"] == 3
  with h5py.File(files["labelled"]) as f:
    masses = np.asarray(f["m"])[:, 0]
  assert meta["mass_mean"] == pytest.approx(masses[expected].mean(), rel=1e-6)


def test_cell_schedule_keeps_batches_within_the_subset_and_a_minimum_of_steps():
  base = ml_collections.ConfigDict(
    dict(batch_size=32, num_epochs=6, warmup_epochs=1, early_stopping_patience=15)
  )
  small = study.cell_schedule(base, 10, devices=1, min_steps=60)
  assert small == {"batch_size": 10, "data.train_repeats": 10}  # 6 epochs × 10 steps
  large = study.cell_schedule(base, 3200, devices=1, min_steps=60)
  assert large == {"batch_size": 32, "data.train_repeats": 1}
  assert study.cell_schedule(base, 10, devices=4, min_steps=60)["batch_size"] == 8


# --- the study end to end ---------------------------------------------------------------------------


def _study_config(files, arms="finetune_simclr,physics_bdt", counts=(16, 1.0)):
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(REPO, "configs", "study.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  tiny = tiny_config("study")
  config.model = tiny.model
  config.model.img_size = 25
  config.data.labelled_path, config.data.unlabelled_path = files["labelled"], files["unlabelled"]
  config.data.unlabelled_val_fraction = 0.25
  config.eval_batch_size = 16
  config.log_every_steps = 1
  config.study.update(label_counts=counts, num_seeds=1, arms=arms, min_steps=2)
  for recipe in (config.pretrain_simclr, config.pretrain_mae, config.finetune, config.scratch):
    recipe.update(batch_size=8, num_epochs=1, warmup_epochs=0, learning_rate=1e-3)
  return config


def _results(workdir):
  return sorted(
    os.path.join(root, f) for root, _, names in os.walk(workdir) for f in names if f == study.RESULT_FILE
  )


def test_study_writes_outputs_and_a_rerun_skips_done_cells(files, tmp_path, monkeypatch):
  workdir = str(tmp_path / "study")
  result = study.run_study(_study_config(files), workdir)
  for name in ("study.json", "study.png", "report.md"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  written = json.load(open(os.path.join(workdir, "study.json")))
  assert written["counts"] == [16, 56] and set(written["summary"]) == {"finetune_simclr", "physics_bdt"}
  assert len(written["cells"]) == 4 and result["summary"]["finetune_simclr"]["16"]["accuracy"]["values"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| finetune_simclr |" in report and "n=16" in report and "configs/study.py" in report
  results = _results(workdir)
  assert len(results) == 5  # pretraining + 2 arms × 2 counts
  mtimes = [os.path.getmtime(p) for p in results]

  def no_training(*args, **kwargs):
    raise AssertionError("a done cell was trained again")

  monkeypatch.setattr(loop, "train_and_evaluate", no_training)
  again = study.run_study(_study_config(files), workdir)
  assert [os.path.getmtime(p) for p in results] == mtimes
  assert again["summary"] == result["summary"]


def test_a_cell_stopped_by_stop_after_steps_is_not_recorded_and_a_rerun_finishes_it(files, tmp_path):
  workdir = str(tmp_path / "study")
  config = _study_config(files, arms="scratch", counts=(16,))
  config.scratch.num_epochs = 2  # one cell of 2 epochs of 2 steps, stopped after the first epoch
  config.stop_after_steps = 2
  assert study.run_study(config, workdir) == {}
  cell = os.path.join(workdir, "seed0", "n16", "scratch")
  assert os.path.isdir(os.path.join(cell, "checkpoints")) and not _results(workdir)
  assert not os.path.exists(os.path.join(workdir, "study.json"))
  config.stop_after_steps = 0
  result = study.run_study(config, workdir)
  recorded = json.load(open(os.path.join(cell, study.RESULT_FILE)))
  assert recorded["train_summary"]["step"] == recorded["train_summary"]["total_steps"] == 4
  assert result["summary"]["scratch"]["16"]["accuracy"]["values"]


def test_a_recorded_result_of_a_half_trained_cell_is_not_taken_for_done(files, tmp_path):
  workdir = str(tmp_path / "study")
  cell = os.path.join(workdir, "seed0", "n16", "scratch")
  os.makedirs(cell)
  with open(os.path.join(cell, study.RESULT_FILE), "w") as f:  # as older versions recorded a pause
    json.dump(
      {
        "arm": "scratch",
        "seed": 0,
        "count": 16,
        "seconds": 1.0,
        "metrics": {},
        "train_summary": {"step": 1, "total_steps": 2, "stopped_early": False},
      },
      f,
    )
  study.run_study(_study_config(files, arms="scratch", counts=(16,)), workdir)
  recorded = json.load(open(os.path.join(cell, study.RESULT_FILE)))
  assert recorded["train_summary"]["step"] == 2 and recorded["metrics"]["accuracy"] >= 0


def test_a_file_too_small_for_the_smallest_label_count_fails_before_training(files, tmp_path):
  workdir = tmp_path / "study"
  command = [
    sys.executable,
    "-m",
    "l2vit_jax.main",
    "--config=configs/study.py",
    f"--workdir={workdir}",
    f"--config.data.labelled_path={files['labelled']}",
    f"--config.data.unlabelled_path={files['unlabelled']}",
    "--config.model.img_size=25",
    "--config.study.arms=scratch",
  ]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  lines = [l for l in completed.stderr.splitlines() if l.startswith("error:")]
  assert completed.returncode == 1 and len(lines) == 1
  assert "label count 1 " in lines[0] and files["labelled"] in lines[0]  # 1 % of 56 jets
  assert not any(os.path.exists(os.path.join(workdir, d)) for d in ("seed0", "study.json"))


def test_unknown_arms_are_refused_by_name():
  config = ml_collections.ConfigDict(dict(study=dict(arms="scratch,finetune_byol")))
  with pytest.raises(errors.ConfigError, match="finetune_byol"):
    study.selected_arms(config)
  assert study.selected_arms(ml_collections.ConfigDict(dict(study=dict(arms="scratch, physics_bdt")))) == (
    "scratch",
    "physics_bdt",
  )
