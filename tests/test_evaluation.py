"""Evaluation metrics on hand-worked cases and against sklearn; plots and report files on fake predictions."""

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # plots build Figure objects directly; this only guards anything using pyplot

import numpy as np
import pytest

from l2vit_jax.evaluation import metrics, plots, report

try:
  import sklearn.metrics as sklearn_metrics
except ImportError:  # pragma: no cover - sklearn is in requirements-test.txt
  sklearn_metrics = None

needs_sklearn = pytest.mark.skipif(sklearn_metrics is None, reason="scikit-learn not installed")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- classification, by hand ------------------------------------------------------------------------

def test_auc_of_tiny_example_worked_by_hand():
  # Signal 0.35 beats background 0.1 but not 0.4; signal 0.8 beats both: 3 of 4 pairs.
  assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_tied_pairs_count_one_half():
  assert metrics.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
  # Pairs: 0.5>0.2 (1), 0.5=0.5 (½), 0.9>0.2 (1), 0.9>0.5 (1) -> 3.5 / 4.
  assert metrics.roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
  assert metrics.roc_auc([1, 0, 1, 0], np.full(4, 0.3)) == pytest.approx(0.5)


def test_perfect_and_inverted_classifiers():
  labels = np.array([0, 0, 0, 1, 1])
  probs = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
  assert metrics.roc_auc(labels, probs) == 1.0
  assert metrics.accuracy(labels, probs) == 1.0
  assert metrics.roc_auc(labels, 1 - probs) == 0.0
  assert metrics.accuracy(labels, 1 - probs) == 0.0


def test_accuracy_threshold_sends_exact_half_to_class_zero_like_argmax():
  assert metrics.accuracy([0, 1], [0.5, 0.5]) == 0.5
  assert metrics.predict_classes([0.5, 0.51]).tolist() == [0, 1]
  assert metrics.accuracy([0, 1], [0.2, 0.3], threshold=0.25) == 1.0


def test_confusion_matrix_counts_rows_true_columns_predicted():
  counts = metrics.confusion_matrix([0, 0, 0, 1, 1], [0.1, 0.7, 0.2, 0.9, 0.4])
  np.testing.assert_array_equal(counts, [[2, 1], [1, 1]])


def test_roc_curve_of_tiny_example():
  fpr, tpr, thresholds = metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_moves_tied_scores_together():
  fpr, tpr, thresholds = metrics.roc_curve([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
  np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.1])


def test_background_rejection_interpolates_along_hand_made_roc():
  # ROC points (fpr, tpr): (0,0) -> (0,.5) at 0.9 -> (.5,1) at the tied 0.5 -> (1,1).
  labels, scores = [1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]
  assert metrics.background_rejection(labels, scores, 0.75) == pytest.approx(4.0)  # ε_B = 0.25
  assert metrics.background_rejection(labels, scores, 1.0) == pytest.approx(2.0)
  assert metrics.background_rejection(labels, scores, 0.3) == math.inf  # no background at all


def test_background_rejection_takes_best_point_where_roc_is_flat_in_tpr():
  # Signal [.9 .8 .6 .3], background [.7 .5 .2 .1]: at tpr .75 the curve runs from fpr .25 to .5.
  labels = [1, 1, 1, 1, 0, 0, 0, 0]
  scores = [0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.2, 0.1]
  assert metrics.background_rejection(labels, scores, 0.75) == pytest.approx(4.0)
  assert metrics.background_rejection(labels, scores, 0.875) == pytest.approx(2.0)
  assert metrics.background_rejection(labels, scores, 0.5) == math.inf
  with pytest.raises(ValueError, match="signal_efficiency"):
    metrics.background_rejection(labels, scores, 0.0)


# --- classification vs sklearn ----------------------------------------------------------------------

@needs_sklearn
@pytest.mark.parametrize("seed", range(6))
def test_auc_and_roc_curve_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  size = int(rng.integers(20, 400))
  labels = rng.integers(0, 2, size)
  labels[:2] = [0, 1]
  # Few distinct values -> many ties, within and across classes.
  scores = rng.integers(0, int(rng.integers(2, 25)), size) / 7.0 + 0.3 * labels
  expected = sklearn_metrics.roc_auc_score(labels, scores)
  assert metrics.roc_auc(labels, scores) == pytest.approx(expected, abs=1e-6)
  for drop in (True, False):
    ours = metrics.roc_curve(labels, scores, drop_intermediate=drop)
    theirs = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=drop)
    for mine, reference in zip(ours, theirs):
      np.testing.assert_allclose(mine, reference, atol=1e-6)


@needs_sklearn
def test_auc_matches_sklearn_on_continuous_scores():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, 3000)
  scores = rng.normal(labels * 1.2, 1.0).astype(np.float32)
  expected = sklearn_metrics.roc_auc_score(labels, scores)
  assert metrics.roc_auc(labels, scores) == pytest.approx(expected, abs=1e-6)


# --- input errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [metrics.roc_auc, metrics.roc_curve,
                                lambda l, s: metrics.background_rejection(l, s, 0.5)])
def test_single_class_is_a_clear_error(fn):
  with pytest.raises(ValueError, match="needs both classes; labels contain only class 1"):
    fn([1, 1, 1], [0.2, 0.5, 0.9])
  with pytest.raises(metrics.OneClassError, match="only class 0"):
    fn([0, 0], [0.2, 0.5])


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.accuracy([0, 1, 1], [0.2, 0.8]), "same length, got labels=3, probs=2"),
    (lambda: metrics.roc_auc([0, 1], [0.2, 0.8, 0.1]), "same length"),
    (lambda: metrics.mass_errors([100.0, 120.0], [110.0]), "same length"),
    (lambda: metrics.roc_auc([], []), "labels: empty input"),
    (lambda: metrics.mass_errors([], []), "empty input"),
    (lambda: metrics.roc_auc([0, 1], [0.2, np.nan]), "scores: values must be finite, found nan at index 1"),
    (lambda: metrics.mass_errors([100.0, np.nan], [1.0, 2.0]), "mass_true: values must be finite"),
    (lambda: metrics.accuracy([0, 2], [0.2, 0.8]), r"expected class labels in \{0, 1\}, found 2.0"),
    (lambda: metrics.mass_errors([100.0, 0.0], [1.0, 2.0]), "expected positive masses"),
    (lambda: metrics.roc_auc([0, 1], np.ones((2, 2))), r"probs\[:, 1\]"),
])
def test_bad_inputs_raise_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_column_vectors_from_hdf5_are_accepted():
  labels = np.array([[0.0], [1.0], [1.0]], np.float32)
  assert metrics.roc_auc(labels, np.array([[0.1], [0.9], [0.8]])) == 1.0


# --- mass -------------------------------------------------------------------------------------------

def test_mass_errors_on_constructed_residuals():
  # Relative residuals (k - 50)/500 for k = 0..100: linear percentiles land exactly on ±34/500.
  mass_true = np.full(101, 100.0)
  offsets = (np.arange(101) - 50) / 500
  errors = metrics.mass_errors(mass_true, mass_true * (1 + offsets))
  assert errors["resolution"] == pytest.approx(0.068)
  assert errors["bias"] == pytest.approx(0.0, abs=1e-12)
  assert errors["relative_bias"] == pytest.approx(0.0, abs=1e-12)
  assert errors["mae"] == pytest.approx(2 * sum(range(51)) / 101 / 5)  # mean |k - 50| / 5 GeV
  assert errors["mse"] == pytest.approx(2 * sum(j * j for j in range(51)) / 101 / 25)
  # A 10 % scale shift moves the biases and leaves the width alone.
  shifted = metrics.mass_errors(mass_true, mass_true * (1.1 + offsets))
  assert shifted["resolution"] == pytest.approx(0.068)
  assert shifted["relative_bias"] == pytest.approx(0.1)
  assert shifted["bias"] == pytest.approx(10.0)


def test_mass_resolution_is_sigma_for_gaussian_relative_errors():
  rng = np.random.default_rng(0)
  mass_true = rng.uniform(50, 300, 100_000)
  mass_pred = mass_true * (1 + rng.normal(0.0, 0.08, mass_true.size))
  assert metrics.mass_errors(mass_true, mass_pred)["resolution"] == pytest.approx(0.08, rel=0.02)


# --- bootstrap --------------------------------------------------------------------------------------

def _fake_classifier(size, seed=0, separation=1.5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size)
  probs = 1 / (1 + np.exp(-rng.normal((labels - 0.5) * 2 * separation, 1.0)))
  return labels, probs


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_data():
  widths = []
  for size in (200, 5000):
    labels, probs = _fake_classifier(size)
    low, high = metrics.bootstrap_interval(metrics.roc_auc, labels, probs, num_samples=200)
    assert low <= metrics.roc_auc(labels, probs) <= high
    widths.append(high - low)
  assert widths[1] < widths[0] / 2  # ~ 1/sqrt(N): 5 times narrower expected


def test_bootstrap_is_seeded_and_level_widens_interval():
  labels, probs = _fake_classifier(300)
  first = metrics.bootstrap_interval(metrics.accuracy, labels, probs, num_samples=100, seed=3)
  assert first == metrics.bootstrap_interval(metrics.accuracy, labels, probs, num_samples=100, seed=3)
  wide = metrics.bootstrap_interval(metrics.accuracy, labels, probs, num_samples=100, seed=3, level=0.95)
  assert wide[0] <= first[0] and wide[1] >= first[1]


def test_bootstrap_skips_single_class_resamples():
  # One signal among six: about a third of resamples miss it and are skipped instead of crashing.
  labels, scores = [0, 0, 0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
  low, high = metrics.bootstrap_interval(metrics.roc_auc, labels, scores, num_samples=100)
  assert 0.0 <= low <= high <= 1.0
  with pytest.raises(ValueError, match="resamples gave a value"):
    metrics.bootstrap_interval(metrics.roc_auc, [1, 1], [0.2, 0.3], num_samples=10)
  with pytest.raises(ValueError, match="same length"):
    metrics.bootstrap_interval(metrics.accuracy, [0, 1], [0.3], num_samples=10)


# --- everything at once -----------------------------------------------------------------------------

def _fake_model(size=400, seed=0, separation=1.5):
  labels, probs = _fake_classifier(size, seed, separation)
  rng = np.random.default_rng(seed + 100)
  mass_true = rng.uniform(50, 300, size) * np.where(labels == 1, 1.3, 1.0)
  mass_pred = mass_true * (1 + rng.normal(0.02, 0.1, size))
  return dict(labels=labels, probs=probs, mass_true=mass_true, mass_pred=mass_pred)


EXPECTED_KEYS = {
    "accuracy", "roc_auc", "mass_mae", "mass_mse", "mass_bias", "mass_resolution", "mass_relative_bias",
    "rejection_at_eff_0.3", "rejection_at_eff_0.5", "accuracy_ci68", "roc_auc_ci68", "mass_mae_ci68",
    "num_examples", "num_signal",
}


def test_classification_and_mass_metrics_is_flat_strict_json():
  data = _fake_model(separation=0.5)  # overlapping classes: finite rejections
  result = metrics.classification_and_mass_metrics(*data.values(), bootstrap_samples=50)
  assert set(result) == EXPECTED_KEYS
  assert json.loads(json.dumps(result, allow_nan=False)) == result
  assert result["num_examples"] == 400 and result["num_signal"] == int(data["labels"].sum())
  for key in ("accuracy", "roc_auc", "mass_mae"):
    low, high = result[f"{key}_ci68"]
    assert low <= result[key] <= high
  assert result["rejection_at_eff_0.3"] > result["rejection_at_eff_0.5"] > 1


def test_unbounded_rejection_is_none_in_json():
  labels = np.array([0, 0, 1, 1])
  result = metrics.classification_and_mass_metrics(labels, [0.1, 0.2, 0.8, 0.9], [100.0] * 4,
                                                   [101.0] * 4, bootstrap_samples=20)
  assert result["rejection_at_eff_0.3"] is None and result["rejection_at_eff_0.5"] is None


# --- plots and report -------------------------------------------------------------------------------

def _assert_png(path):
  assert os.path.getsize(path) > 1000
  with open(path, "rb") as file:
    assert file.read(8) == PNG_SIGNATURE


def _write_training_log(path, with_validation=True):
  lines = []
  for epoch in range(1, 4):
    lines += [{"step": 16 * epoch - 8, "epoch": epoch - 0.5, "train/loss": 1.0 / epoch, "learning_rate": 3e-4,
               "images_per_second": 55.1}]
    end = {"step": 16 * epoch, "epoch": epoch, "train/loss": 0.9 / epoch}
    if with_validation:
      end.update({"val/loss": 1.1 / epoch, "val/accuracy": 0.7 + 0.05 * epoch, "val/mass_mae": 30.0 - epoch})
    lines.append(end)
  text = "\n".join(json.dumps(line) for line in lines) + "\n\n" + '{"step": 60, "epo'  # killed mid-write
  path.write_text(text)
  return str(path)


def test_training_curves_tolerate_missing_keys_and_truncated_lines(tmp_path):
  full = _write_training_log(tmp_path / "full.jsonl")
  train_only = _write_training_log(tmp_path / "train_only.jsonl", with_validation=False)
  contrastive = tmp_path / "simclr.jsonl"
  contrastive.write_text('{"step": 10, "train/contrastive_loss": 5.1}\n{"step": 20}\n')
  assert len(plots.read_metrics_jsonl(full)) == 6
  _assert_png(plots.plot_training_curves({"a": full, "b": train_only}, tmp_path / "curves.png"))
  _assert_png(plots.plot_training_curves({"simclr": str(contrastive)}, tmp_path / "simclr.png"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  _assert_png(plots.plot_training_curves({"empty": str(empty)}, tmp_path / "empty.png"))


def test_write_model_outputs_and_report_create_every_file(tmp_path):
  out_dir = tmp_path / "report"
  models = {"scratch": _fake_model(seed=1, separation=1.0), "simclr": _fake_model(seed=2, separation=2.0)}
  logs = {name: _write_training_log(tmp_path / f"{name}.jsonl") for name in models}
  results = {}
  for name, data in models.items():
    index = np.arange(len(data["labels"])) * 3
    results[name] = report.write_model_outputs(out_dir, name, index=index, metrics_jsonl=logs[name],
                                               bootstrap_samples=50, **data)
    model_dir = out_dir / name
    for plot in report.PER_MODEL_PLOTS:
      _assert_png(model_dir / plot)
    with open(model_dir / "metrics.json") as file:
      written = json.load(file)
    assert written == results[name] and set(written) == EXPECTED_KEYS
    assert 0.5 < written["accuracy"] <= 1 and 0.5 < written["roc_auc"] <= 1
    assert 0 < written["mass_mae"] < 50 and written["mass_resolution"] == pytest.approx(0.1, rel=0.2)
    with np.load(model_dir / "predictions.npz") as saved:
      assert set(saved.files) == {"index", "label", "prob", "mass_true", "mass_pred"}
      np.testing.assert_array_equal(saved["index"], index)
      np.testing.assert_allclose(saved["prob"], data["probs"])
  assert results["simclr"]["roc_auc"] > results["scratch"]["roc_auc"]

  predictions = {name: (data["labels"], data["probs"]) for name, data in models.items()}
  path = report.write_report(out_dir, results, predictions=predictions, training_logs=logs,
                             notes="Fake data.")
  assert path == str(out_dir / "report.md")
  _assert_png(out_dir / "roc.png")
  _assert_png(out_dir / "training_curves.png")
  text = (out_dir / "report.md").read_text()
  assert "Fake data." in text and report.REFERENCE_LABEL in text
  for name in models:
    assert f"| **{name}** |" in text
  for reference in report.REFERENCE_RESULTS:
    assert reference.model in text
  assert "| seed L2ViT, SimCLR-pretrained | — | 0.9030 | 0.9649 |" in text
  assert "0.875–0.891" in text
  for link in ("roc.png", "training_curves.png", "scratch/mass_2d.png", "simclr/confusion_matrix.png"):
    assert f"]({link})" in text and (out_dir / link).is_file()
  # The reference block comes after every model row.
  assert text.index(report.REFERENCE_LABEL) > text.index("| **simclr** |")


def test_report_without_plots_and_with_missing_keys(tmp_path):
  path = report.write_report(tmp_path, {"partial": {"accuracy": 0.8}}, predictions={})
  text = open(path).read()
  assert "| **partial** | — | 0.8000 | — |" in text and not (tmp_path / "roc.png").exists()


def test_model_name_must_be_a_plain_folder_name(tmp_path):
  data = _fake_model(size=50)
  with pytest.raises(ValueError, match="folder name"):
    report.write_model_outputs(tmp_path, "../escape", index=np.arange(50), bootstrap_samples=10, **data)
