"""Evaluation metrics on hand-worked cases and against sklearn; plots and report files on fake predictions.

The physics checks (mass sculpting, calibration, mass response, mean images) are tested against values
worked out by hand in the comments beside each case.
"""

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # plots build Figure objects directly; this only guards anything using pyplot

import numpy as np
import pytest

from l2vit_jax.evaluation import metrics, plots, report
from l2vit_jax.training import metrics_log

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


@pytest.mark.parametrize(
  "fn", [metrics.roc_auc, metrics.roc_curve, lambda l, s: metrics.background_rejection(l, s, 0.5)]
)
def test_single_class_is_a_clear_error(fn):
  with pytest.raises(ValueError, match="needs both classes; labels contain only class 1"):
    fn([1, 1, 1], [0.2, 0.5, 0.9])
  with pytest.raises(metrics.OneClassError, match="only class 0"):
    fn([0, 0], [0.2, 0.5])


@pytest.mark.parametrize(
  "call, message",
  [
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
  ],
)
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


# --- mass sculpting ---------------------------------------------------------------------------------


def test_jsd_of_identical_histograms_is_zero_and_of_disjoint_ones_is_one():
  assert metrics.jensen_shannon_divergence([1, 2, 3, 0], [1, 2, 3, 0]) == 0.0
  assert metrics.jensen_shannon_divergence([2, 4, 6], [1, 2, 3]) == pytest.approx(0.0, abs=1e-15)  # shapes
  assert metrics.jensen_shannon_divergence([1, 1, 0, 0], [0, 0, 3, 1]) == pytest.approx(1.0)


def test_jsd_of_a_worked_example_in_bits():
  # P = (1, 0), Q = (½, ½), M = (¾, ¼): KL(P‖M) = log2(4/3), KL(Q‖M) = ½ log2(2/3) + ½ log2(2).
  expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
  assert metrics.jensen_shannon_divergence([1, 0], [1, 1]) == pytest.approx(expected)
  assert metrics.jensen_shannon_divergence([1, 1], [1, 0]) == pytest.approx(expected)  # symmetric
  with pytest.raises(metrics.UndefinedMetricError, match="non-empty"):
    metrics.jensen_shannon_divergence([0, 0], [1, 0])
  with pytest.raises(ValueError, match="same bins"):
    metrics.jensen_shannon_divergence([1, 0], [1, 0, 0])


def test_signal_efficiency_threshold_keeps_at_least_the_requested_signal_fraction():
  labels = [1, 1, 1, 1, 0, 0]
  scores = [0.9, 0.8, 0.6, 0.3, 0.95, 0.1]  # the background's 0.95 does not move the cut
  assert metrics.signal_efficiency_threshold(labels, scores, 0.5) == 0.8  # k = 2 of 4
  assert metrics.signal_efficiency_threshold(labels, scores, 0.25) == 0.9  # k = 1
  assert metrics.signal_efficiency_threshold(labels, scores, 0.3) == 0.8  # k = ⌈1.2⌉ = 2
  assert metrics.signal_efficiency_threshold(
    [1] * 10 + [0], [0.1 * k for k in range(10)] + [0.5], 0.3
  ) == pytest.approx(0.7)  # 0.3·10 is 3, not 4
  with pytest.raises(metrics.OneClassError):
    metrics.signal_efficiency_threshold([0, 0], [0.1, 0.2])


def test_a_cut_that_ignores_the_mass_does_not_sculpt():
  # QCD at 50 and 150 GeV pass (0.9) and fail (0.1) alike; the cut at the signal's 0.85 keeps half.
  labels = [1, 1, 1, 1, 0, 0, 0, 0]
  scores = [0.95, 0.85, 0.2, 0.15, 0.9, 0.1, 0.9, 0.1]
  mass = [170, 175, 180, 165, 50, 50, 150, 150]
  sculpting = metrics.mass_sculpting(labels, scores, mass)
  assert sculpting["threshold"] == 0.85 and sculpting["signal_efficiency"] == 0.5
  assert sculpting["background_efficiency"] == 0.5 and sculpting["rejection"] == 2.0
  assert sculpting["jsd"] == 0.0 and sculpting["inverse_jsd"] == math.inf
  np.testing.assert_array_equal(sculpting["background_pass"], sculpting["background_fail"])
  assert sculpting["background_all"][2] == 0.5 and sculpting["background_all"][7] == 0.5  # 40–60, 140–160


def test_a_cut_that_keeps_only_heavy_qcd_sculpts_completely():
  # The cut sits at the better signal's 0.9: QCD at 180 and 520 GeV pass, at 60 and 40 GeV fail.
  labels = [1, 1, 0, 0, 0, 0]
  scores = [0.9, 0.2, 0.92, 0.1, 0.95, 0.05]
  mass = [170, 170, 180, 60, 520, 40]  # 520 GeV is overflow: counted in the last bin (380–400)
  sculpting = metrics.mass_sculpting(labels, scores, mass)
  assert sculpting["num_pass"] == 2 and sculpting["num_fail"] == 2
  assert sculpting["rejection"] == 2.0 and sculpting["jsd"] == pytest.approx(1.0)
  assert sculpting["background_pass"][9] == 0.5 and sculpting["background_pass"][19] == 0.5
  assert metrics.sculpting_jsd(labels, scores, mass) == pytest.approx(1.0)


def test_jsd_null_floor_of_one_passing_and_one_failing_jet_is_one():
  # Two QCD jets in different bins, one passing: every random split of them is disjoint.
  labels, scores, mass = [1, 1, 0, 0], [0.9, 0.1, 0.95, 0.05], [170, 170, 50, 150]
  assert metrics.sculpting_jsd_null(labels, scores, mass, num_samples=10) == 1.0


def test_jsd_null_floor_shrinks_with_more_qcd_jets_and_matches_a_mass_blind_cut():
  floors = []
  for size in (200, 5000):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size)
    scores = rng.random(size)  # blind to the mass: no sculpting beyond noise
    mass = rng.uniform(20, 380, size)
    floor = metrics.sculpting_jsd_null(labels, scores, mass, num_samples=50)
    assert metrics.sculpting_jsd(labels, scores, mass) == pytest.approx(floor, rel=0.6)
    floors.append(floor)
  assert floors[1] < floors[0] / 10  # ~ 1/N


def test_no_background_passing_gives_unbounded_r50_and_undefined_jsd():
  labels, scores, mass = [1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], [170, 170, 80, 90]
  sculpting = metrics.mass_sculpting(labels, scores, mass)
  assert sculpting["rejection"] == math.inf and math.isnan(sculpting["jsd"])
  assert np.isnan(sculpting["background_pass"]).all()
  with pytest.raises(metrics.UndefinedMetricError):
    metrics.sculpting_jsd(labels, scores, mass)
  result = metrics.classification_and_mass_metrics(
    labels, scores, mass, [170, 170, 80, 90], bootstrap_samples=20
  )
  assert result["sculpting_r50"] is None and result["sculpting_jsd50"] is None
  assert result["sculpting_jsd50_error"] is None and result["sculpting_inverse_jsd50_error"] is None
  assert result["sculpting_jsd50_null"] is None
  assert result["sculpting_background_mass_pass"] == [None] * 20


# --- calibration ------------------------------------------------------------------------------------


def test_ece_of_a_perfectly_calibrated_binned_example_is_zero():
  # Four jets at P = 0.25 with one top, four at P = 0.75 with three: each bin's top fraction = its P.
  probs = [0.25] * 4 + [0.75] * 4
  labels = [1, 0, 0, 0, 1, 1, 1, 0]
  assert metrics.expected_calibration_error(labels, probs) == 0.0
  bins = metrics.reliability_bins(labels, probs)
  assert bins["count"].tolist() == [0, 0, 4, 0, 0, 0, 0, 4, 0, 0]
  assert np.isnan(bins["confidence"][0]) and np.isnan(bins["signal_fraction"][0])  # empty bin


def test_ece_and_brier_of_an_overconfident_example_worked_by_hand():
  # Two QCD jets at P = 0.9 (gap 0.9) and two at P = 0.1 (gap 0.1): ECE = (2·0.9 + 2·0.1)/4.
  labels, probs = [0, 0, 0, 0], [0.9, 0.9, 0.1, 0.1]
  assert metrics.expected_calibration_error(labels, probs) == pytest.approx(0.5)
  assert metrics.brier_score(labels, probs) == pytest.approx((2 * 0.81 + 2 * 0.01) / 4)
  assert metrics.brier_score([0, 1], [0.5, 0.5]) == 0.25
  assert metrics.brier_score([0, 1], [0.0, 1.0]) == 0.0


def test_reliability_bins_are_half_open_with_the_last_one_closed():
  bins = metrics.reliability_bins([0, 1, 1, 0], [0.0, 0.3, 1.0, 0.0999])
  assert bins["edges"].tolist() == [k / 10 for k in range(11)]
  assert bins["count"].tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1]  # 0.3 opens bin 3, 1.0 is in bin 9
  with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], found 1.2"):
    metrics.brier_score([0, 1], [0.3, 1.2])


# --- mass response ----------------------------------------------------------------------------------


def test_binned_response_median_and_resolution_on_a_constructed_sample():
  # 101 jets at 120 GeV with r = 1.1 + (k − 50)/500 (median 1.1, (q84 − q16)/2 = 0.068) and three at
  # 260 GeV, too few for a measurement.
  offsets = (np.arange(101) - 50) / 500
  mass_true = np.r_[np.full(101, 120.0), np.full(3, 260.0)]
  mass_pred = np.r_[120.0 * (1.1 + offsets), [260.0, 250.0, 270.0]]
  binned = metrics.binned_mass_response(mass_true, mass_pred)
  assert binned["edges"].tolist() == [100.0, 150.0, 200.0, 250.0, 300.0]
  assert binned["count"].tolist() == [101, 0, 0, 3]
  assert binned["median"][0] == pytest.approx(1.1) and binned["resolution"][0] == pytest.approx(0.068)
  assert np.isnan(binned["median"][1:]).all() and np.isnan(binned["resolution"][3])
  loose = metrics.binned_mass_response(mass_true, mass_pred, min_count=3)
  assert loose["median"][3] == pytest.approx(1.0)


def test_response_edges_are_multiples_of_fifty_gev_covering_every_mass():
  assert metrics.mass_response_edges([50.0, 99.9]).tolist() == [50.0, 100.0]
  assert metrics.mass_response_edges([49.0, 100.0]).tolist() == [0.0, 50.0, 100.0, 150.0]


def test_top_window_fractions_count_qcd_jets_only_in_a_half_open_window():
  labels = [0, 0, 0, 0, 1, 1]
  mass_true = [160, 100, 180, 300, 100, 100]  # QCD in [150, 200): 160, 180
  mass_pred = [170, 175, 200, 190, 170, 170]  # QCD in [150, 200): 170, 175, 190 (200 is outside)
  assert metrics.top_window_fractions(labels, mass_true, mass_pred) == (0.5, 0.75)
  assert metrics.top_window_excess(labels, mass_true, mass_pred) == 0.25
  with pytest.raises(metrics.OneClassError):
    metrics.top_window_fractions([1, 1], [100, 120], [170, 170])


def test_pileup_needs_a_large_and_significant_excess():
  assert metrics.piles_up_at_top_mass(0.10, 0.20, [0.05, 0.15])
  assert not metrics.piles_up_at_top_mass(0.10, 0.12, [0.01, 0.03])  # significant but small
  assert not metrics.piles_up_at_top_mass(0.10, 0.20, [-0.01, 0.2])  # large but noise
  assert metrics.piles_up_at_top_mass(0.0, 0.05, None)
  assert not metrics.piles_up_at_top_mass(0.0, 0.0, [0.0, 0.0])


def test_regression_that_predicts_the_top_mass_for_tagged_qcd_is_flagged():
  rng = np.random.default_rng(0)
  labels = np.r_[np.zeros(400, int), np.ones(400, int)]
  mass_true = np.r_[rng.uniform(30, 140, 400), rng.normal(173, 10, 400)]
  mass_pred = mass_true * (1 + rng.normal(0, 0.05, 800))
  mass_pred[:120] = rng.normal(173, 5, 120)  # 30 % of QCD pulled to the top mass
  probs = np.where(labels == 1, 0.8, 0.2)
  result = metrics.classification_and_mass_metrics(labels, probs, mass_true, mass_pred, bootstrap_samples=50)
  assert result["qcd_top_window_fraction_true"] == 0.0 and result["qcd_top_window_fraction_pred"] > 0.25
  assert result["qcd_top_window_pileup"] is True
  honest = metrics.classification_and_mass_metrics(
    labels, probs, mass_true, mass_true * 1.01, bootstrap_samples=50
  )
  assert honest["qcd_top_window_pileup"] is False


# --- mean images ------------------------------------------------------------------------------------


def test_class_mean_images_average_each_class_separately():
  accumulator = metrics.ClassMeanImages()
  images = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
  labels = [1, 0, 1, 1, 0]
  for image, label in zip(images, labels):
    accumulator.add(image, np.int32(label))
  means = accumulator.means()
  assert means.shape == (2, 2, 2, 3) and accumulator.counts.tolist() == [2, 3]
  np.testing.assert_array_equal(means[0], (images[1] + images[4]) / 2)
  np.testing.assert_array_equal(means[1], (images[0] + images[2] + images[3]) / 3)
  assert accumulator.sums.shape == (2, 2, 2, 3)  # memory does not grow with the number of images


def test_class_mean_images_refuse_a_missing_class_or_a_changed_shape():
  accumulator = metrics.ClassMeanImages()
  accumulator.add(np.ones((2, 2, 8)), 0)
  with pytest.raises(metrics.OneClassError, match="no image of class 1"):
    accumulator.means()
  with pytest.raises(ValueError, match="differs from the first"):
    accumulator.add(np.ones((3, 3, 8)), 1)
  with pytest.raises(ValueError, match=r"\{0, 1\}"):
    accumulator.add(np.ones((2, 2, 8)), 2)


# --- everything at once -----------------------------------------------------------------------------


def _fake_model(size=400, seed=0, separation=1.5):
  labels, probs = _fake_classifier(size, seed, separation)
  rng = np.random.default_rng(seed + 100)
  mass_true = rng.uniform(50, 300, size) * np.where(labels == 1, 1.3, 1.0)
  mass_pred = mass_true * (1 + rng.normal(0.02, 0.1, size))
  return dict(labels=labels, probs=probs, mass_true=mass_true, mass_pred=mass_pred)


# The keys metrics.json has always had: later additions must leave every one of them in place.
ORIGINAL_KEYS = {
  "accuracy",
  "roc_auc",
  "mass_mae",
  "mass_mse",
  "mass_bias",
  "mass_resolution",
  "mass_relative_bias",
  "rejection_at_eff_0.3",
  "rejection_at_eff_0.5",
  "accuracy_ci68",
  "roc_auc_ci68",
  "mass_mae_ci68",
  "num_examples",
  "num_signal",
}
PHYSICS_KEYS = {
  "sculpting_target_signal_efficiency",
  "sculpting_signal_efficiency",
  "sculpting_threshold",
  "sculpting_background_efficiency",
  "sculpting_r50",
  "sculpting_r50_ci68",
  "sculpting_jsd50",
  "sculpting_jsd50_error",
  "sculpting_inverse_jsd50",
  "sculpting_inverse_jsd50_error",
  "sculpting_jsd50_null",
  "sculpting_inverse_jsd50_null",
  "sculpting_num_background_pass",
  "sculpting_num_background_fail",
  "sculpting_mass_edges",
  "sculpting_background_mass_all",
  "sculpting_background_mass_pass",
  "sculpting_background_mass_fail",
  "calibration_ece",
  "calibration_ece_ci68",
  "calibration_brier",
  "calibration_brier_ci68",
  "reliability_bin_edges",
  "reliability_count",
  "reliability_confidence",
  "reliability_signal_fraction",
  "mass_response_bin_edges",
  "top_mass_window",
  "qcd_top_window_fraction_true",
  "qcd_top_window_fraction_pred",
  "qcd_top_window_excess_ci68",
  "qcd_top_window_pileup",
  *(f"mass_response_{group}_{stat}" for group in ("all", "top", "qcd") for stat in ("median", "resolution")),
  *(
    f"mass_response_binned_{group}_{stat}"
    for group in ("all", "top", "qcd")
    for stat in ("count", "median", "resolution")
  ),
}
EXPECTED_KEYS = ORIGINAL_KEYS | PHYSICS_KEYS


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
  for key in ("sculpting_r50", "calibration_ece", "calibration_brier"):
    low, high = result[f"{key}_ci68"]
    assert low <= result[key] <= high, key
  # The fake tagger's score ignores the mass: JSD50 is at the floor that statistics alone give.
  assert 0 < result["sculpting_jsd50"] < 2 * result["sculpting_jsd50_null"]
  assert result["sculpting_jsd50_error"] > 0
  assert result["sculpting_inverse_jsd50_error"] == pytest.approx(
    result["sculpting_jsd50_error"] / result["sculpting_jsd50"] ** 2
  )
  assert 0.5 <= result["sculpting_signal_efficiency"] < 0.52
  # The cut-based R50 and the ROC-interpolated one differ by at most the jets at the cut.
  assert result["sculpting_r50"] == pytest.approx(result["rejection_at_eff_0.5"], rel=0.1)
  assert sum(result["reliability_count"]) == 400 == sum(result["mass_response_binned_all_count"])
  assert sum(result["sculpting_background_mass_all"]) == pytest.approx(1.0)
  assert result == metrics.classification_and_mass_metrics(*data.values(), bootstrap_samples=50)  # seeded


def test_the_physics_checks_leave_the_original_metrics_unchanged():
  labels, probs, mass_true, mass_pred = _fake_model(separation=0.5).values()
  result = metrics.classification_and_mass_metrics(labels, probs, mass_true, mass_pred, bootstrap_samples=30)
  assert result["roc_auc"] == metrics.roc_auc(labels, probs)
  assert result["rejection_at_eff_0.5"] == metrics.background_rejection(labels, probs, 0.5)
  assert result["mass_resolution"] == metrics.mass_errors(mass_true, mass_pred)["resolution"]
  expected = metrics.bootstrap_interval(metrics.roc_auc, labels, probs, num_samples=30, seed=0)
  assert result["roc_auc_ci68"] == list(expected)
  assert list(result)[: len(ORIGINAL_KEYS)] == [key for key in result if key in ORIGINAL_KEYS]  # added after


def test_bootstrap_skips_resamples_where_a_metric_is_undefined():
  assert issubclass(metrics.OneClassError, metrics.UndefinedMetricError)
  labels, scores = _fake_classifier(60)
  calls = []

  def sometimes_undefined(labels, scores):
    calls.append(1)
    if len(calls) % 2:
      raise metrics.UndefinedMetricError("odd resample")
    return float(np.mean(scores))

  low, high = metrics.bootstrap_interval(sometimes_undefined, labels, scores, num_samples=40)
  assert len(calls) == 40 and low <= high


def test_unbounded_rejection_is_none_in_json():
  labels = np.array([0, 0, 1, 1])
  result = metrics.classification_and_mass_metrics(
    labels, [0.1, 0.2, 0.8, 0.9], [100.0] * 4, [101.0] * 4, bootstrap_samples=20
  )
  assert result["rejection_at_eff_0.3"] is None and result["rejection_at_eff_0.5"] is None


# --- plots and report -------------------------------------------------------------------------------


def _assert_png(path):
  assert os.path.getsize(path) > 1000
  with open(path, "rb") as file:
    assert file.read(8) == PNG_SIGNATURE


def _write_training_log(path, with_validation=True):
  lines = []
  for epoch in range(1, 4):
    lines += [
      {
        "step": 16 * epoch - 8,
        "epoch": epoch - 0.5,
        "train/loss": 1.0 / epoch,
        "learning_rate": 3e-4,
        "images_per_second": 55.1,
      }
    ]
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
  assert len(metrics_log.read_metrics_jsonl(full)) == 6
  _assert_png(plots.plot_training_curves({"a": full, "b": train_only}, tmp_path / "curves.png"))
  _assert_png(plots.plot_training_curves({"simclr": str(contrastive)}, tmp_path / "simclr.png"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  _assert_png(plots.plot_training_curves({"empty": str(empty)}, tmp_path / "empty.png"))


def _fake_mean_images(seed=0):
  """Sums of 7 top and 5 QCD sparse 9 × 9 images; channel 6 is empty in every jet."""
  rng = np.random.default_rng(seed)
  accumulator = metrics.ClassMeanImages()
  for index in range(12):
    image = np.where(rng.random((9, 9, 8)) < 0.2, rng.exponential(5.0, (9, 9, 8)), 0.0)
    image[..., 6] = 0.0
    accumulator.add(image, int(index < 7))
  return accumulator


def _write_everything(out_dir):
  data = {"a": _fake_model(seed=3, separation=0.7)}
  results = {
    name: report.write_model_outputs(out_dir, name, index=np.arange(400), bootstrap_samples=30, **model)
    for name, model in data.items()
  }
  report.write_report(
    out_dir,
    results,
    mean_images=_fake_mean_images(),
    predictions={name: (model["labels"], model["probs"]) for name, model in data.items()},
  )


def test_the_same_predictions_give_byte_identical_reports_and_plots(tmp_path):
  # What an interrupted and rerun evaluation relies on (tests/test_chaos.py compares the files).
  _write_everything(tmp_path / "first")
  _write_everything(tmp_path / "second")
  files = sorted(
    str(path.relative_to(tmp_path / "first")) for path in (tmp_path / "first").rglob("*") if path.is_file()
  )
  assert {
    "report.md",
    "mean_images.png",
    "a/mass_sculpting.png",
    "a/reliability.png",
    "a/mass_response.png",
    "a/metrics.json",
  } <= set(files)
  for relative in files:
    assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes(), (
      relative
    )


def test_physics_plots_cope_with_edge_cases(tmp_path):
  # A perfect tagger: no QCD jet passes the cut, so only the before-cut shape can be drawn.
  labels = np.array([0, 0, 0, 1, 1, 1])
  probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 1.0])
  mass = np.array([60.0, 90.0, 120.0, 170.0, 175.0, 180.0])
  _assert_png(plots.plot_mass_sculpting(labels, probs, mass, tmp_path / "sculpting.png"))
  _assert_png(plots.plot_reliability(labels, probs, tmp_path / "reliability.png"))
  _assert_png(plots.plot_mass_response(labels, mass, mass * 1.05, tmp_path / "response.png"))
  means = np.zeros((2, 5, 5, 3))
  means[1, 2, 2, 0] = 4.0
  _assert_png(plots.plot_mean_images(means, [3, 4], tmp_path / "means.png"))  # channels 1, 2 all zero
  with pytest.raises(ValueError, match=r"\(2, H, W, C\)"):
    plots.plot_mean_images(np.zeros((5, 5, 3)), [1, 1], tmp_path / "bad.png")


def test_report_shows_unbounded_r50_and_names_models_whose_qcd_piles_up(tmp_path):
  perfect = {
    "sculpting_r50": None,
    "sculpting_r50_ci68": [None, None],
    "sculpting_jsd50": None,
    "sculpting_inverse_jsd50": None,
    "sculpting_num_background_pass": 0,
    "sculpting_num_background_fail": 10,
    "qcd_top_window_pileup": True,
    "qcd_top_window_fraction_true": 0.1,
    "qcd_top_window_fraction_pred": 0.3,
  }
  flat = {
    "sculpting_r50": 4.0,
    "sculpting_r50_ci68": [3.0, None],
    "sculpting_jsd50": 0.0,
    "sculpting_inverse_jsd50": None,
    "sculpting_jsd50_null": 0.02,
    "sculpting_inverse_jsd50_null": 50.0,
    "qcd_top_window_pileup": False,
    "qcd_top_window_fraction_true": 0.1,
    "qcd_top_window_fraction_pred": 0.1,
  }
  text = open(report.write_report(tmp_path, {"perfect": perfect, "flat": flat}, predictions={})).read()
  assert "| **perfect** | — | 0 / 10 | ∞ | — | — | — |" in text  # JSD undefined: no QCD jet passes
  # JSD 0: identical shapes.
  assert "| **flat** | — | — | 4.0 (+∞/−1.0) | 0.0000 | ∞ | 50.00 |" in text
  sculpted = {
    "sculpting_jsd50": 0.25,
    "sculpting_jsd50_error": 0.05,
    "sculpting_inverse_jsd50": 4.0,
    "sculpting_inverse_jsd50_error": 0.8,
  }
  row = report._sculpting_row("sculpted", sculpted)  # pylint: disable=protected-access
  assert row[4:6] == ["0.2500 ± 0.0500", "4.00 ± 0.80"]
  assert "| **yes** (×3.00) |" in text and "| no (×1.00) |" in text
  assert "pile up at the top mass for **perfect** (" in text


def test_write_model_outputs_and_report_create_every_file(tmp_path):
  out_dir = tmp_path / "report"
  models = {"scratch": _fake_model(seed=1, separation=1.0), "simclr": _fake_model(seed=2, separation=2.0)}
  logs = {name: _write_training_log(tmp_path / f"{name}.jsonl") for name in models}
  results = {}
  for name, data in models.items():
    index = np.arange(len(data["labels"])) * 3
    results[name] = report.write_model_outputs(
      out_dir, name, index=index, metrics_jsonl=logs[name], bootstrap_samples=50, **data
    )
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
  path = report.write_report(
    out_dir,
    results,
    predictions=predictions,
    training_logs=logs,
    mean_images=_fake_mean_images(),
    notes="Fake data.",
  )
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
  # Every model has a row in each physics-check table, and its three physics plots are linked.
  for heading in ("### Mass sculpting at ε_S = 0.5", "### Calibration", "### Mass response"):
    assert heading in text
  for name in models:
    assert text.count(f"| **{name}** |") == 4  # results, sculpting, calibration, response
    for plot in ("mass_sculpting", "reliability", "mass_response"):
      assert f"]({name}/{plot}.png)" in text
  assert "pile up at the top mass" in text and "R50" in text and "1/JSD50" in text
  _assert_png(out_dir / report.MEAN_IMAGES_PLOT)
  assert f"]({report.MEAN_IMAGES_PLOT})" in text and "(7 top, 5 QCD" in text


def test_report_without_plots_and_with_missing_keys(tmp_path):
  path = report.write_report(tmp_path, {"partial": {"accuracy": 0.8}}, predictions={})
  text = open(path).read()
  assert "| **partial** | — | 0.8000 | — |" in text and not (tmp_path / "roc.png").exists()


def test_model_name_must_be_a_plain_folder_name(tmp_path):
  data = _fake_model(size=50)
  with pytest.raises(ValueError, match="folder name"):
    report.write_model_outputs(tmp_path, "../escape", index=np.arange(50), bootstrap_samples=10, **data)
