"""Evaluation of restored checkpoints: trained by us, or imported from the PyTorch original."""

import json
import os

import numpy as np
import pytest

from conftest import randomise_torch_module, tiny_config, write_jet_file
from l2vit_jax.checkpoint import model_io
from l2vit_jax.evaluation import evaluate
from l2vit_jax.training import loop
from l2vit_jax.baselines import bdt
from l2vit_jax.data import hdf5, sources, split
from l2vit_jax.evaluation import plots, report as report_lib

# What every row of a report (checkpoint, probe, physics baseline) must carry beside the original metrics.
PHYSICS_KEYS = ("sculpting_r50", "sculpting_r50_ci68", "sculpting_jsd50", "sculpting_inverse_jsd50",
                "sculpting_inverse_jsd50_error", "sculpting_inverse_jsd50_null", "calibration_ece",
                "calibration_brier", "reliability_signal_fraction", "mass_response_top_median",
                "mass_response_qcd_resolution", "mass_response_binned_all_median",
                "qcd_top_window_fraction_pred", "qcd_top_window_pileup")
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
  monkeypatch.setattr(plots, "plot_roc", lambda curves, *args, **kwargs: (
      roc_curves.update(curves), plot_roc(curves, *args, **kwargs)))
  config = _evaluate_config(labelled, f"tiny={run}")
  config.physics_baseline = True
  out = str(tmp_path / "report")
  results = evaluate.evaluate_checkpoints(config, out)

  assert list(results) == list(roc_curves) == ["tiny", bdt.BASELINE_NAME]
  test_indices = split.stratified_split(hdf5.read_labels(labelled)["label"])["test"]
  baseline_dir = os.path.join(out, bdt.BASELINE_NAME)
  assert json.load(open(os.path.join(baseline_dir, "metrics.json"))) == json.loads(
      json.dumps(results[bdt.BASELINE_NAME]))
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
      torch_reference.build_torch_l2vit(img_size=25, embed_dim=32, depth=2, num_heads=2,
                                        mlp_ratio=2.0), torch.Generator().manual_seed(0))
  weights = str(tmp_path / "best_model.pt")
  torch.save({"model_state_dict": torch_model.state_dict(), "mass_mean": 142.46, "mass_std": 50.58,
              "history": {}}, weights)
  model, _, meta = torch_import.import_checkpoint(weights)
  model_io.save_model_checkpoint(str(tmp_path / "imported"), model, meta)

  labelled = write_jet_file(tmp_path / "labelled.h5", num=30)
  out = str(tmp_path / "report")
  evaluate.evaluate_checkpoints(
      _evaluate_config(labelled, f"imported={tmp_path / 'imported'}", split_name="all"), out)
  predictions = np.load(os.path.join(out, "imported", "predictions.npz"))
  with hdf5.open_hdf5(labelled) as f:
    images = torch.from_numpy(f["jet"][...]).permute(0, 3, 1, 2)
  with torch.no_grad():
    logits, mass_z = torch_model(images)
  np.testing.assert_allclose(predictions["prob"], torch.softmax(logits, -1)[:, 1].numpy(), atol=1e-4)
  np.testing.assert_allclose(predictions["mass_pred"], mass_z[:, 0].numpy() * 50.58 + 142.46,
                             atol=1e-4 * 50.58)
