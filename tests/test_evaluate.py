"""Evaluation of restored checkpoints: trained by us, or imported from the PyTorch original."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, randomise_torch_module, tiny_config, write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io
from l2vit_jax.evaluation import evaluate
from l2vit_jax.training import loop
from l2vit_jax.baselines import bdt
from l2vit_jax.data import hdf5, sources, split
from l2vit_jax.evaluation import plots, report as report_lib

# What every row of a report (checkpoint, probe, physics baseline) must carry beside the original metrics.
PHYSICS_KEYS = (
  "sculpting_r50",
  "sculpting_r50_ci68",
  "sculpting_jsd50",
  "sculpting_inverse_jsd50",
  "sculpting_inverse_jsd50_error",
  "sculpting_inverse_jsd50_null",
  "calibration_ece",
  "calibration_brier",
  "reliability_signal_fraction",
  "mass_response_top_median",
  "mass_response_qcd_resolution",
  "mass_response_binned_all_median",
  "qcd_top_window_fraction_pred",
  "qcd_top_window_pileup",
)
PHYSICS_PLOTS = ("mass_sculpting", "reliability", "mass_response")


def _assert_has_physics_checks(out, name, report_text):
  """``name``'s metrics.json has the physics keys, its plots exist and each physics table has its row."""
  metrics = json.load(open(os.path.join(out, name, "metrics.json")))
  assert set(PHYSICS_KEYS) <= set(metrics), sorted(set(PHYSICS_KEYS) - set(metrics))
  for png in PHYSICS_PLOTS:
    with open(os.path.join(out, name, png + ".png"), "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
    assert f"]({name}/{png}.png)" in report_text
  assert report_text.count(f"| **{name}** |") == 4  # results, sculpting, calibration, mass response


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _evaluate_config(labelled, checkpoints, split_name="test"):
  config = tiny_config("evaluate", labelled)
  config.checkpoints = checkpoints
  config.split = split_name
  config.bootstrap_samples = 50
  config.report_title = "test report"
  config.report_notes = ""
  return config


def test_parse_checkpoints():
  assert evaluate.parse_checkpoints("a=runs/x, runs/y/") == {"a": "runs/x", "y": "runs/y/"}
  with pytest.raises(ValueError, match="twice"):
    evaluate.parse_checkpoints("a=x,a=y")


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
  """A labelled file and a one-epoch finetuning workdir on it, shared by the tests that evaluate it."""
  directory = tmp_path_factory.mktemp("finetuned")
  labelled = write_jet_file(directory / "labelled.h5", num=80)
  run = str(directory / "run")
  loop.train_and_evaluate(tiny_config("finetune", labelled, num_epochs=1), run)
  return labelled, run


def test_both_checkpoints_record_the_file_and_split_the_model_trained_with(finetuned_run):
  labelled, run = finetuned_run
  expected = sources.open_labelled(labelled, split_seed=split.SPLIT_SEED).fingerprint()
  for kept in (model_io.BEST_DIR, model_io.LATEST_DIR):
    assert model_io.read_model_meta(run, prefer=(kept,))["data_split"] == expected


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_another_split_seed_is_refused_in_one_line_with_nothing_written(finetuned_run, tmp_path):
  labelled, run = finetuned_run
  out = tmp_path / "report"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "l2vit_jax.main",
      "--config=configs/evaluate.py",
      f"--workdir={out}",
      f"--config.checkpoints=tiny={run}",
      f"--config.data.labelled_path={labelled}",
      "--config.data.split_seed=7",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: config.data.split_seed=7 gives another test split than the model of {run} was trained "
    "with (seed 42); evaluate with --config.data.split_seed=42"
  )
  assert not out.exists()


def test_another_labelled_file_is_refused_naming_it(finetuned_run, tmp_path):
  _, run = finetuned_run
  other = write_jet_file(tmp_path / "other.h5", num=80, seed=1)
  out = tmp_path / "report"
  with pytest.raises(
    errors.DataError,
    match=rf"^{other}: not the labelled file the model of {run} was "
    r"trained on \(80 jets, .*; it trained on 80 jets, .*--config.split=all$",
  ):
    evaluate.evaluate_checkpoints(_evaluate_config(other, f"tiny={run}"), str(out))
  assert not out.exists()


def _labelled_and_meta(finetuned_run):
  labelled, run = finetuned_run
  return sources.open_labelled(labelled, split_seed=split.SPLIT_SEED), model_io.read_model_meta(run)


def test_the_same_seed_splitting_otherwise_under_another_numpy_is_refused(finetuned_run):
  labelled, meta = _labelled_and_meta(finetuned_run)
  recorded = dict(meta["data_split"], numpy="1.0.0")  # as if an older NumPy had drawn another split
  recorded["indices_sha256"] = dict(recorded["indices_sha256"], val=split.indices_digest([0, 1]))
  config = _evaluate_config(labelled.path, "", split_name="val")
  with pytest.raises(
    errors.DataError,
    match=r"split_seed=42 gives another val split under NumPy .* "
    r"trained with under NumPy 1\.0\.0 .*evaluate under NumPy 1\.0\.0",
  ):
    evaluate.check_model_split("run", dict(meta, data_split=recorded), labelled, config)
  config.split = "test"  # the test split it recorded is still this one
  evaluate.check_model_split("run", dict(meta, data_split=recorded), labelled, config)


def test_a_checkpoint_without_a_recorded_split_is_evaluated_with_a_warning(finetuned_run, caplog):
  labelled, meta = _labelled_and_meta(finetuned_run)
  older = {key: value for key, value in meta.items() if key != "data_split"}
  with caplog.at_level(logging.WARNING):
    evaluate.check_model_split("older_run", older, labelled, _evaluate_config(labelled.path, ""))
  assert "older_run: its checkpoint records no data split" in caplog.text


def test_every_jet_is_scored_whatever_split_the_model_trained_with(finetuned_run):
  labelled, meta = _labelled_and_meta(finetuned_run)
  other_seed = sources.open_labelled(labelled.path, split_seed=7)
  evaluate.check_model_split("run", meta, other_seed, _evaluate_config(labelled.path, "", split_name="all"))
  with pytest.raises(errors.ConfigError, match="split_seed=7 gives another val split"):
    evaluate.check_model_split("run", meta, other_seed, _evaluate_config(labelled.path, "", split_name="val"))


def test_an_unknown_split_name_is_refused_naming_the_known_ones(finetuned_run):
  labelled, meta = _labelled_and_meta(finetuned_run)
  with pytest.raises(
    errors.ConfigError, match="config.split='tset': expected one of train, val, test or all"
  ):
    evaluate.check_model_split("run", meta, labelled, _evaluate_config(labelled.path, "", split_name="tset"))


def test_a_damaged_recorded_split_is_refused(finetuned_run):
  labelled, meta = _labelled_and_meta(finetuned_run)
  with pytest.raises(errors.CheckpointDamagedError, match="run: damaged checkpoint: meta 'data_split' is"):
    evaluate.check_model_split(
      "run", dict(meta, data_split=[1, 2]), labelled, _evaluate_config(labelled.path, "")
    )


def test_evaluating_a_trained_checkpoint_writes_every_output(finetuned_run, tmp_path):
  labelled, run = finetuned_run
  out = str(tmp_path / "report")
  results = evaluate.evaluate_checkpoints(_evaluate_config(labelled, f"tiny={run}"), out)

  test_indices = split.stratified_split(hdf5.read_labels(labelled)["label"])["test"]
  metrics = json.load(open(os.path.join(out, "tiny", "metrics.json")))
  assert metrics == json.loads(json.dumps(results["tiny"]))
  assert metrics["num_examples"] == len(test_indices)
  assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["roc_auc"] <= 1
  assert metrics["mass_mae"] > 0 and metrics["mass_mse"] >= metrics["mass_mae"] ** 2
  low, high = metrics["accuracy_ci68"]
  assert low <= metrics["accuracy"] <= high
  predictions = np.load(os.path.join(out, "tiny", "predictions.npz"))
  np.testing.assert_array_equal(predictions["index"], test_indices)
  assert ((predictions["prob"] >= 0) & (predictions["prob"] <= 1)).all()
  assert np.isfinite(predictions["mass_pred"]).all()
  for png in ("confusion_matrix", "mass_2d", "mass_residual", "training_curves"):
    with open(os.path.join(out, "tiny", png + ".png"), "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
  report = open(os.path.join(out, "report.md")).read()
  assert "tiny" in report and "seed L2ViT, SimCLR-pretrained" in report and "roc.png" in report
  _assert_has_physics_checks(out, "tiny", report)
  with open(os.path.join(out, report_lib.MEAN_IMAGES_PLOT), "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  num_top = int(hdf5.read_labels(labelled)["label"][test_indices].sum())
  assert f"({num_top} top, {len(test_indices) - num_top} QCD" in report


def test_report_has_the_physics_baseline_beside_the_networks(finetuned_run, tmp_path, monkeypatch):
  labelled, run = finetuned_run
  roc_curves = {}
  plot_roc = plots.plot_roc
  monkeypatch.setattr(
    plots,
    "plot_roc",
    lambda curves, *args, **kwargs: (roc_curves.update(curves), plot_roc(curves, *args, **kwargs)),
  )
  config = _evaluate_config(labelled, f"tiny={run}")
  config.physics_baseline = True
  out = str(tmp_path / "report")
  results = evaluate.evaluate_checkpoints(config, out)

  assert list(results) == list(roc_curves) == ["tiny", bdt.BASELINE_NAME]
  test_indices = split.stratified_split(hdf5.read_labels(labelled)["label"])["test"]
  baseline_dir = os.path.join(out, bdt.BASELINE_NAME)
  assert json.load(open(os.path.join(baseline_dir, "metrics.json"))) == json.loads(
    json.dumps(results[bdt.BASELINE_NAME])
  )
  predictions = np.load(os.path.join(baseline_dir, "predictions.npz"))
  np.testing.assert_array_equal(predictions["index"], test_indices)
  assert ((predictions["prob"] >= 0) & (predictions["prob"] <= 1)).all()
  assert np.isfinite(predictions["mass_pred"]).all()
  report = open(os.path.join(out, "report.md")).read()
  assert f"| **{bdt.BASELINE_NAME}** |" in report and "## Physics baseline" in report
  assert "N-subjettiness" in report and "HistGradientBoostingClassifier" in report
  for name in results:  # the physics baseline gets the same physics checks as the network
    _assert_has_physics_checks(out, name, report)


def test_mean_images_are_the_per_class_means_of_the_evaluated_split(finetuned_run):
  labelled, _ = finetuned_run
  test_indices = split.stratified_split(hdf5.read_labels(labelled)["label"])["test"]
  shuffled = np.random.default_rng(0).permutation(test_indices)  # the pass reads in index order anyway
  labelled_file = sources.open_labelled(labelled, split_seed=split.SPLIT_SEED)
  means = evaluate.class_mean_images(labelled_file, shuffled, progress=False)
  with hdf5.open_hdf5(labelled) as f:
    images, classes = f["jet"][...][test_indices].astype(np.float64), f["Y"][...][test_indices, 0]
  assert means.counts.tolist() == [int((classes == 0).sum()), int((classes == 1).sum())]
  for cls in (0, 1):
    np.testing.assert_allclose(means.means()[cls], images[classes == cls].mean(axis=0), rtol=1e-12)
  again = evaluate.class_mean_images(labelled_file, test_indices, progress=False)
  assert again.means().tobytes() == means.means().tobytes()  # bit-identical: the report is compared


def test_imported_pytorch_checkpoint_predicts_like_the_original(tmp_path):
  torch = pytest.importorskip("torch", reason="needs torch: pip install torch")
  from l2vit_jax.interop import torch_import, torch_reference  # pylint: disable=import-outside-toplevel

  torch_model = randomise_torch_module(
    torch_reference.build_torch_l2vit(img_size=25, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    torch.Generator().manual_seed(0),
  )
  weights = str(tmp_path / "best_model.pt")
  torch.save(
    {"model_state_dict": torch_model.state_dict(), "mass_mean": 142.46, "mass_std": 50.58, "history": {}},
    weights,
  )
  model, _, meta = torch_import.import_checkpoint(weights)
  model_io.save_model_checkpoint(str(tmp_path / "imported"), model, meta)

  labelled = write_jet_file(tmp_path / "labelled.h5", num=30)
  out = str(tmp_path / "report")
  evaluate.evaluate_checkpoints(
    _evaluate_config(labelled, f"imported={tmp_path / 'imported'}", split_name="all"), out
  )
  predictions = np.load(os.path.join(out, "imported", "predictions.npz"))
  with hdf5.open_hdf5(labelled) as f:
    images = torch.from_numpy(f["jet"][...]).permute(0, 3, 1, 2)
  with torch.no_grad():
    logits, mass_z = torch_model(images)
  np.testing.assert_allclose(predictions["prob"], torch.softmax(logits, -1)[:, 1].numpy(), atol=1e-4)
  np.testing.assert_allclose(
    predictions["mass_pred"], mass_z[:, 0].numpy() * 50.58 + 142.46, atol=1e-4 * 50.58
  )
