"""Classification, mass-regression and physics-check metrics in plain numpy.

Conventions: ``labels`` are 0 (QCD, the background) / 1 (boosted top, the signal); ``probs`` and
``scores`` are the model's probability (or any monotone score) for class 1; masses are in GeV. Every
public function validates its inputs and raises ``ValueError`` with a one-line message on empty inputs,
length mismatches, NaN/Inf values, labels outside {0, 1} or, where a ROC is needed, a single class.
A metric that has no value on valid inputs (a single class, an empty selection) raises
``UndefinedMetricError``, which ``bootstrap_interval`` skips.

Beside accuracy, ROC-AUC, rejection and mass errors there are the checks physicists read in a tagger
report: mass sculpting (``mass_sculpting``: R50 and 1/JSD50), calibration (``reliability_bins``,
``expected_calibration_error``, ``brier_score``), the binned mass response m_pred/m_true
(``binned_mass_response``, ``top_window_fractions``) and the mean image per class and channel
(``ClassMeanImages``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

# Signal efficiencies at which background rejection is reported (CMS boosted-top convention).
REJECTION_EFFICIENCIES = (0.3, 0.5)


class UndefinedMetricError(ValueError):
  """Raised when a metric has no value on otherwise valid inputs (one class, an empty selection).

  A subclass of ``ValueError`` so callers can catch either; ``bootstrap_interval`` skips resamples that
  raise it, and raises it itself when fewer than two resamples give a value.
  """


class OneClassError(UndefinedMetricError):
  """Raised when a metric needs both classes but the labels contain only one."""


# --- input validation -------------------------------------------------------------------------------


def _as_1d(name: str, values: np.ndarray | Sequence[float]) -> np.ndarray:
  """Returns ``values`` as a finite float64 vector; (N, 1) columns (the HDF5 layout) are flattened."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim == 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.ndim != 1:
    hint = " (pass the class-1 column, e.g. probs[:, 1])" if array.ndim == 2 else ""
    raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}{hint}")
  if array.size == 0:
    raise ValueError(f"{name}: empty input")
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    raise ValueError(
      f"{name}: values must be finite, found {array[bad[0]]} at index {bad[0]}"
      f" ({bad.size} non-finite in total)"
    )
  return array


def _as_labels(labels: np.ndarray | Sequence[float]) -> np.ndarray:
  """Returns labels as an int64 vector after checking that every value is 0 or 1."""
  array = _as_1d("labels", labels)
  bad = np.flatnonzero((array != 0) & (array != 1))
  if bad.size:
    raise ValueError(f"labels: expected class labels in {{0, 1}}, found {array[bad[0]]} at index {bad[0]}")
  return array.astype(np.int64)


def _check_same_length(**arrays: np.ndarray) -> None:
  lengths = {name: len(array) for name, array in arrays.items()}
  if len(set(lengths.values())) > 1:
    listed = ", ".join(f"{name}={length}" for name, length in lengths.items())
    raise ValueError(f"inputs must have the same length, got {listed}")


def validate_labels_and_scores(labels, scores, scores_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
  """Checked (int64 labels in {0, 1}, float64 scores) vectors of equal, non-zero length."""
  labels = _as_labels(labels)
  scores = _as_1d(scores_name, scores)
  _check_same_length(labels=labels, **{scores_name: scores})
  return labels, scores


def _require_both_classes(labels: np.ndarray, what: str) -> None:
  present = np.unique(labels)
  if present.size < 2:
    raise OneClassError(f"{what} needs both classes; labels contain only class {int(present[0])}")


# --- classification ---------------------------------------------------------------------------------


def predict_classes(probs: np.ndarray | Sequence[float], threshold: float = 0.5) -> np.ndarray:
  """Hard class predictions: 1 where ``probs > threshold``.

  Strictly greater, so that at the default threshold an exact 0.5 goes to class 0 like ``argmax`` over
  the two logits (which returns the first index on a tie) in the original training code.
  """
  return (_as_1d("probs", probs) > threshold).astype(np.int64)


def accuracy(labels, probs, threshold: float = 0.5) -> float:
  """Fraction of examples whose hard prediction (see ``predict_classes``) equals the label."""
  labels, probs = validate_labels_and_scores(labels, probs, "probs")
  return float(np.mean(predict_classes(probs, threshold) == labels))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of ``values``; tied values all get the mean of the ranks they span."""
  order = np.argsort(values, kind="mergesort")
  _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
  ranks = np.empty(values.size, dtype=np.float64)
  ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
  return ranks


def confusion_matrix(labels, probs, threshold: float = 0.5) -> np.ndarray:
  """2×2 counts: rows are the true class, columns the predicted class (rule of ``predict_classes``)."""
  labels, probs = validate_labels_and_scores(labels, probs, "probs")
  return np.bincount(2 * labels + predict_classes(probs, threshold), minlength=4).reshape(2, 2)


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve via the Mann–Whitney U statistic.

  AUC = P(score of a random signal > score of a random background) + ½ P(equal scores). Average ranks
  make each signal/background tie contribute exactly ½, which equals the trapezoidal area under
  ``roc_curve`` (and sklearn's ``roc_auc_score``).
  """
  labels, scores = validate_labels_and_scores(labels, scores)
  _require_both_classes(labels, "ROC-AUC")
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  rank_sum = _average_ranks(scores)[labels == 1].sum()
  return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray):
  """Cumulative (false, true) positive counts at each distinct threshold, scores descending."""
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order]
  # A threshold sits after the last example of each group of tied scores, so ties move together.
  last_of_group = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
  true_pos = np.cumsum(labels)[last_of_group]
  false_pos = last_of_group + 1 - true_pos
  return false_pos, true_pos, scores[last_of_group]


def roc_curve(labels, scores, *, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve as ``(fpr, tpr, thresholds)``, the same points as ``sklearn.metrics.roc_curve``.

  Each threshold classifies ``scores >= threshold`` as signal; tied scores enter together. The first
  point is (0, 0) at threshold ``inf``. With ``drop_intermediate`` (sklearn's default), points on a
  straight segment between their neighbours are removed; the curve's shape and area are unchanged.
  """
  labels, scores = validate_labels_and_scores(labels, scores)
  _require_both_classes(labels, "ROC curve")
  false_pos, true_pos, thresholds = _cumulative_counts(labels, scores)
  if drop_intermediate and false_pos.size > 2:
    corners = np.logical_or(np.diff(false_pos, 2), np.diff(true_pos, 2))
    keep = np.flatnonzero(np.r_[True, corners, True])
    false_pos, true_pos, thresholds = false_pos[keep], true_pos[keep], thresholds[keep]
  false_pos = np.r_[0, false_pos]
  true_pos = np.r_[0, true_pos]
  thresholds = np.r_[np.inf, thresholds]
  return false_pos / false_pos[-1], true_pos / true_pos[-1], thresholds


def false_positive_rate_at(fpr: np.ndarray, tpr: np.ndarray, signal_efficiency) -> np.ndarray:
  """Background efficiency ε_B at the given signal efficiencies, linear along the ROC curve.

  Where the curve is flat in TPR (several FPRs at one TPR), the lowest FPR is taken: it is the best
  working point with that signal efficiency.
  """
  efficiency = np.asarray(signal_efficiency, dtype=np.float64)
  # First curve point with tpr >= efficiency (tpr is non-decreasing along the curve).
  upper = np.clip(np.searchsorted(tpr, efficiency, side="left"), 1, tpr.size - 1)
  lower = upper - 1
  span = tpr[upper] - tpr[lower]
  weight = np.where(span > 0, (efficiency - tpr[lower]) / np.where(span > 0, span, 1.0), 0.0)
  return fpr[lower] + weight * (fpr[upper] - fpr[lower])


def background_rejection(labels, scores, signal_efficiency: float) -> float:
  """Background rejection 1/ε_B at a fixed signal efficiency ε_S in (0, 1].

  ε_B is interpolated linearly along the ROC curve between its points. Returns ``inf`` when ε_B = 0,
  i.e. some threshold keeps the requested signal fraction while accepting no background at all; with
  N background examples the true rejection is then only known to exceed about N.
  """
  if not 0.0 < signal_efficiency <= 1.0:
    raise ValueError(f"signal_efficiency must be in (0, 1], got {signal_efficiency}")
  fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
  background_efficiency = float(false_positive_rate_at(fpr, tpr, signal_efficiency))
  return float("inf") if background_efficiency <= 0.0 else 1.0 / background_efficiency


# --- mass regression --------------------------------------------------------------------------------


def validate_masses(mass_true, mass_pred) -> tuple[np.ndarray, np.ndarray]:
  """Checked float64 (true, predicted) mass vectors of equal length; true masses must be positive."""
  mass_true = _as_1d("mass_true", mass_true)
  mass_pred = _as_1d("mass_pred", mass_pred)
  _check_same_length(mass_true=mass_true, mass_pred=mass_pred)
  if np.any(mass_true <= 0):
    index = int(np.flatnonzero(mass_true <= 0)[0])
    raise ValueError(
      f"mass_true: expected positive masses (relative errors divide by them), "
      f"found {mass_true[index]} at index {index}"
    )
  return mass_true, mass_pred


def mass_errors(mass_true, mass_pred) -> dict[str, float]:
  """Regression errors of the jet mass, in GeV unless relative.

  Returns ``mae`` and ``mse`` (GeV, GeV²); ``bias``: median of pred − true (GeV; robust to the tails);
  ``relative_bias``: median of (pred − true)/true; ``resolution``: half the width of the central 68 %
  interval (16th–84th percentile) of (pred − true)/true, which equals σ for a Gaussian residual.
  """
  mass_true, mass_pred = validate_masses(mass_true, mass_pred)
  residual = mass_pred - mass_true
  relative = residual / mass_true
  low, high = np.percentile(relative, [16.0, 84.0])
  return {
    "mae": float(np.mean(np.abs(residual))),
    "mse": float(np.mean(residual**2)),
    "bias": float(np.median(residual)),
    "resolution": float((high - low) / 2.0),
    "relative_bias": float(np.median(relative)),
  }


def mass_mae(mass_true, mass_pred) -> float:
  """Mean absolute mass error in GeV (a single-number wrapper for bootstrapping)."""
  return mass_errors(mass_true, mass_pred)["mae"]


# --- mass sculpting ---------------------------------------------------------------------------------

# Working point of the sculpting check (ATLAS/DisCo convention, Kasieczka et al., PRL 125, 122001).
SCULPTING_EFFICIENCY = 0.5
# Fixed background-mass bins of the JSD (GeV): 0–400 GeV in 20 bins of 20 GeV. Fixed rather than data
# driven so that JSD values of different models and reports are computed on the same histogram; masses
# above 400 GeV are counted in the last bin (overflow) so that every QCD jet enters.
SCULPTING_MASS_EDGES = np.linspace(0.0, 400.0, 21)


def signal_efficiency_threshold(labels, scores, signal_efficiency: float = SCULPTING_EFFICIENCY) -> float:
  """The highest threshold t for which ``scores >= t`` keeps at least ``signal_efficiency`` of the signal.

  t is the k-th highest signal score with k = ⌈ε_S · N_S⌉, taken from the signal jets' scores alone (the
  background does not move the cut). Ties at t all pass, so the achieved signal efficiency can exceed
  ε_S by the tied fraction; ``mass_sculpting`` reports the achieved value.
  """
  labels, scores = validate_labels_and_scores(labels, scores)
  if not 0.0 < signal_efficiency <= 1.0:
    raise ValueError(f"signal_efficiency must be in (0, 1], got {signal_efficiency}")
  signal = np.sort(scores[labels == 1])[::-1]
  if signal.size == 0:
    raise OneClassError("a signal-efficiency threshold needs signal jets; labels contain only class 0")
  # round() first: 0.3 * 10 is 3.0000000000000004 in binary, whose ceiling would be 4.
  keep = max(1, math.ceil(round(signal_efficiency * signal.size, 9)))
  return float(signal[keep - 1])


def normalised_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Fractions per bin of ``edges`` (sum 1); values outside the range count in the first/last bin.

  Raises ``UndefinedMetricError`` for no values: an empty selection has no shape.
  """
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  if values.size == 0:
    raise UndefinedMetricError("a normalised histogram needs at least one value")
  counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
  return counts / counts.sum()


def jensen_shannon_divergence(p, q) -> float:
  """JSD(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M) with M = (P + Q)/2, in bits (log base 2), so 0 ≤ JSD ≤ 1.

  ``p`` and ``q`` are histograms on the same bins (non-negative; normalised here). 0 for identical
  shapes, 1 for shapes with no bin in common. Bins where a distribution is 0 contribute 0 to its KL
  term (the limit x log x → 0), so empty bins need no regularisation, unlike KL itself.
  """
  p = np.asarray(p, dtype=np.float64).reshape(-1)
  q = np.asarray(q, dtype=np.float64).reshape(-1)
  if p.shape != q.shape:
    raise ValueError(f"histograms must have the same bins, got {p.size} and {q.size}")
  if (p < 0).any() or (q < 0).any() or not (np.isfinite(p).all() and np.isfinite(q).all()):
    raise ValueError("histograms must be finite and non-negative")
  if p.sum() <= 0 or q.sum() <= 0:
    raise UndefinedMetricError("the JSD needs two non-empty histograms")
  p, q = p / p.sum(), q / q.sum()
  m = (p + q) / 2.0

  def kl_to_m(x: np.ndarray) -> float:
    used = x > 0  # m > 0 wherever x > 0
    return float(np.sum(x[used] * np.log2(x[used] / m[used])))

  return float(np.clip(0.5 * kl_to_m(p) + 0.5 * kl_to_m(q), 0.0, 1.0))


def _sculpting_inputs(labels, scores, mass_true):
  labels, scores = validate_labels_and_scores(labels, scores)
  mass_true = _as_1d("mass_true", mass_true)
  _check_same_length(labels=labels, mass_true=mass_true)
  _require_both_classes(labels, "mass sculpting")
  return labels, scores, mass_true


def mass_sculpting(
  labels,
  scores,
  mass_true,
  *,
  signal_efficiency: float = SCULPTING_EFFICIENCY,
  edges: np.ndarray = SCULPTING_MASS_EDGES,
) -> dict:
  """How much a cut on the score reshapes the background's true-mass distribution.

  The score is cut at ``signal_efficiency_threshold`` (ε_S = 0.5 by default: half the signal passes).
  P and Q are the normalised histograms (``edges``) of the true mass of the background (label 0) jets
  that pass and fail; a tagger that learnt the mass makes P and Q differ. Returns numpy/float values:
  ``threshold``, ``signal_efficiency`` (achieved), ``background_efficiency`` ε_B, ``rejection`` 1/ε_B
  (R50 at the default; ``inf`` when no background passes), ``jsd`` = JSD(P, Q) in bits (NaN when P or Q
  is empty), ``inverse_jsd`` 1/JSD (``inf`` for JSD = 0, NaN when undefined), ``num_pass``/``num_fail``
  background counts, and the histograms ``background_all``, ``background_pass``, ``background_fail``
  (fractions per bin; NaN-filled when empty) with ``edges``. Higher R50 and higher 1/JSD50 are both
  better: the ATLAS/DisCo plane (PRL 125, 122001).
  """
  labels, scores, mass_true = _sculpting_inputs(labels, scores, mass_true)
  threshold = signal_efficiency_threshold(labels, scores, signal_efficiency)
  passed = scores >= threshold
  background = labels == 0
  mass_pass, mass_fail = mass_true[background & passed], mass_true[background & ~passed]
  efficiency = mass_pass.size / int(background.sum())
  edges = np.asarray(edges, dtype=np.float64)
  empty = np.full(edges.size - 1, np.nan)
  hist_pass = normalised_histogram(mass_pass, edges) if mass_pass.size else empty
  hist_fail = normalised_histogram(mass_fail, edges) if mass_fail.size else empty
  jsd = jensen_shannon_divergence(hist_pass, hist_fail) if mass_pass.size and mass_fail.size else np.nan
  return {
    "threshold": threshold,
    "signal_efficiency": float(np.mean(passed[labels == 1])),
    "background_efficiency": float(efficiency),
    "rejection": float("inf") if efficiency == 0 else 1.0 / efficiency,
    "jsd": float(jsd),
    "inverse_jsd": float("nan") if np.isnan(jsd) else (float("inf") if jsd == 0 else 1.0 / jsd),
    "num_pass": int(mass_pass.size),
    "num_fail": int(mass_fail.size),
    "edges": edges,
    "background_all": normalised_histogram(mass_true[background], edges),
    "background_pass": hist_pass,
    "background_fail": hist_fail,
  }


def sculpting_background_efficiency(labels, scores, mass_true) -> float:
  """ε_B at the ε_S = 0.5 cut of ``mass_sculpting`` (a single number for bootstrapping R50)."""
  return mass_sculpting(labels, scores, mass_true)["background_efficiency"]


def sculpting_jsd(labels, scores, mass_true) -> float:
  """JSD50 of ``mass_sculpting``; raises ``UndefinedMetricError`` where no background passes or fails."""
  jsd = mass_sculpting(labels, scores, mass_true)["jsd"]
  if np.isnan(jsd):
    raise UndefinedMetricError("JSD50 needs background jets both passing and failing the cut")
  return jsd


def sculpting_jsd_null(labels, scores, mass_true, *, num_samples: int = 200, seed: int = 0) -> float:
  """Median JSD50 of random pass/fail splits of the QCD jets with the cut's counts: the statistical floor.

  JSD is biased upward on finite samples: two histograms drawn from one distribution differ by their
  noise, so even a cut that ignores the mass has JSD50 > 0, more so with few QCD jets passing (at R50 ≈ 30
  on 1000 QCD jets, about 30 jets fill 20 bins). The permutation null keeps the number of passing and
  failing QCD jets of ``mass_sculpting`` and assigns them at random (seeded, so deterministic): a JSD50
  near it means no sculpting measurable with this test set, and 1/null is the largest 1/JSD50 it can
  resolve. NaN where no QCD jet passes or none fails.
  """
  labels, scores, mass_true = _sculpting_inputs(labels, scores, mass_true)
  sculpting = mass_sculpting(labels, scores, mass_true)
  num_pass, num_fail = sculpting["num_pass"], sculpting["num_fail"]
  if num_pass == 0 or num_fail == 0:
    return float("nan")
  background = mass_true[labels == 0]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_samples):
    shuffled = rng.permutation(background)
    values.append(
      jensen_shannon_divergence(
        normalised_histogram(shuffled[:num_pass], sculpting["edges"]),
        normalised_histogram(shuffled[num_pass:], sculpting["edges"]),
      )
    )
  return float(np.median(values))


# --- calibration ------------------------------------------------------------------------------------

CALIBRATION_BINS = 10


def _validate_probabilities(labels, probs) -> tuple[np.ndarray, np.ndarray]:
  labels, probs = validate_labels_and_scores(labels, probs, "probs")
  outside = np.flatnonzero((probs < 0) | (probs > 1))
  if outside.size:
    raise ValueError(
      f"probs: calibration needs probabilities in [0, 1], found {probs[outside[0]]} at index {outside[0]}"
    )
  return labels, probs


def reliability_bins(labels, probs, num_bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
  """The reliability diagram of the class-1 probability on ``num_bins`` equal-width bins of [0, 1].

  Bins are [k/n, (k+1)/n), the last one closed so that p = 1 is counted. Returns ``edges`` (n + 1),
  ``count`` (n, int), ``confidence`` (mean predicted P(top) per bin) and ``signal_fraction`` (observed
  fraction of label 1 per bin); both are NaN in empty bins. A calibrated model has
  ``signal_fraction ≈ confidence`` in every bin.
  """
  labels, probs = _validate_probabilities(labels, probs)
  if num_bins < 1:
    raise ValueError(f"num_bins must be at least 1, got {num_bins}")
  edges = np.arange(num_bins + 1) / num_bins  # k/n: 0.3 rather than linspace's 0.30000000000000004
  which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    confidence = np.bincount(which, weights=probs, minlength=num_bins) / count
    signal_fraction = np.bincount(which, weights=labels, minlength=num_bins) / count
  return {"edges": edges, "count": count, "confidence": confidence, "signal_fraction": signal_fraction}


def expected_calibration_error(labels, probs, num_bins: int = CALIBRATION_BINS) -> float:
  """ECE = Σ_b (n_b/N) |acc_b − conf_b| over the bins of ``reliability_bins``.

  Binary form: conf_b is the mean predicted class-1 probability in bin b and acc_b the fraction of
  class-1 (top) jets in it, so the ECE is the jet-weighted mean distance of the reliability diagram
  from its diagonal (0 = calibrated at this binning, at most 1). This is not the top-label ECE of
  multi-class papers, which bins max(p, 1 − p) against the accuracy of the argmax.
  """
  bins = reliability_bins(labels, probs, num_bins)
  used = bins["count"] > 0
  gap = np.abs(bins["signal_fraction"][used] - bins["confidence"][used])
  return float(np.sum(bins["count"][used] * gap) / bins["count"].sum())


def brier_score(labels, probs) -> float:
  """Brier score mean((p − y)²) of the class-1 probability: 0 is perfect, 0.25 a constant 0.5."""
  labels, probs = _validate_probabilities(labels, probs)
  return float(np.mean((probs - labels) ** 2))


# --- mass response ----------------------------------------------------------------------------------

RESPONSE_BIN_WIDTH = 50.0  # GeV
# Bins with fewer jets get no median or resolution: their 16th/84th percentiles are noise.
RESPONSE_MIN_COUNT = 5
# Where QCD predictions would pile up if the network learnt "tagged jets have the top mass" (GeV, [lo, hi)).
TOP_MASS_WINDOW = (150.0, 200.0)
# A pile-up is declared when at least this many times more QCD jets are predicted in the window than
# truly are in it, and the 68 % interval of the excess excludes zero.
PILEUP_RATIO = 1.5


def mass_response_edges(mass_true, bin_width: float = RESPONSE_BIN_WIDTH) -> np.ndarray:
  """Edges every ``bin_width`` GeV (multiples of it, so reports line up) covering every true mass."""
  mass_true = _as_1d("mass_true", mass_true)
  low = math.floor(mass_true.min() / bin_width) * bin_width
  high = (math.floor(mass_true.max() / bin_width) + 1) * bin_width
  return low + bin_width * np.arange(round((high - low) / bin_width) + 1)


def response_median_and_resolution(response: np.ndarray) -> tuple[float, float]:
  """(median, (q84 − q16)/2) of the response r = m_pred/m_true: the mass scale and its resolution."""
  low, median, high = np.percentile(np.asarray(response, dtype=np.float64), [16.0, 50.0, 84.0])
  return float(median), float((high - low) / 2.0)


def binned_mass_response(
  mass_true, mass_pred, *, edges: np.ndarray | None = None, min_count: int = RESPONSE_MIN_COUNT
) -> dict[str, np.ndarray]:
  """Median and resolution of r = m_pred/m_true in bins [lo, hi) of the true mass.

  ``edges`` default to ``mass_response_edges`` (50 GeV). Returns ``edges``, ``count`` (int) and
  ``median``/``resolution`` (NaN in bins with fewer than ``min_count`` jets). The median is the mass
  scale (1 = unbiased) and (q84 − q16)/2 the resolution (σ of r for a Gaussian), as ``mass_errors``
  defines them for all jets together.
  """
  mass_true, mass_pred = validate_masses(mass_true, mass_pred)
  edges = mass_response_edges(mass_true) if edges is None else np.asarray(edges, dtype=np.float64)
  response = mass_pred / mass_true
  which = np.searchsorted(edges, mass_true, side="right") - 1
  num_bins = edges.size - 1
  count = np.zeros(num_bins, dtype=np.int64)
  median, resolution = np.full(num_bins, np.nan), np.full(num_bins, np.nan)
  for index in range(num_bins):
    in_bin = response[which == index]
    count[index] = in_bin.size
    if in_bin.size >= max(min_count, 1):
      median[index], resolution[index] = response_median_and_resolution(in_bin)
  return {"edges": edges, "count": count, "median": median, "resolution": resolution}


def _in_window(mass: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  return (mass >= window[0]) & (mass < window[1])


def top_window_fractions(
  labels, mass_true, mass_pred, window: tuple[float, float] = TOP_MASS_WINDOW
) -> tuple[float, float]:
  """(true, predicted) fraction of QCD (label 0) jets whose mass lies in ``window`` = [lo, hi) GeV.

  A predicted fraction well above the true one means QCD predictions pile up at the top mass: the
  regression leans on the class rather than on the jet.
  """
  labels = _as_labels(labels)
  mass_true, mass_pred = validate_masses(mass_true, mass_pred)
  _check_same_length(labels=labels, mass_true=mass_true)
  background = labels == 0
  if not background.any():
    raise OneClassError("the QCD top-window fraction needs QCD jets; labels contain only class 1")
  return (
    float(np.mean(_in_window(mass_true[background], window))),
    float(np.mean(_in_window(mass_pred[background], window))),
  )


def top_window_excess(labels, mass_true, mass_pred) -> float:
  """Predicted minus true QCD fraction in ``TOP_MASS_WINDOW`` (a single number for bootstrapping)."""
  fraction_true, fraction_pred = top_window_fractions(labels, mass_true, mass_pred)
  return fraction_pred - fraction_true


def piles_up_at_top_mass(
  fraction_true: float, fraction_pred: float, excess_interval: Sequence[float] | None
) -> bool:
  """The report's verdict: QCD predictions pile up at the top mass.

  True when the predicted fraction is at least ``PILEUP_RATIO`` times the true one (an effect large
  enough to matter) and the 68 % bootstrap interval of the excess lies above zero (more than test-set
  noise). Without an interval only the ratio is used.
  """
  large = fraction_pred > 0 and fraction_pred >= PILEUP_RATIO * fraction_true
  significant = excess_interval is None or excess_interval[0] > 0
  return bool(large and significant)


# --- mean images ------------------------------------------------------------------------------------


class ClassMeanImages:
  """Running per-class sums of images, for the mean image of each class and channel in one pass.

  Memory is two (H, W, C) float64 sums whatever the number of images, so a split of any size streams
  through. Sums are float64 and added in the order given, so the same images in the same order give
  bit-identical means.
  """

  def __init__(self):
    self.sums: np.ndarray | None = None  # (2, H, W, C)
    self.counts = np.zeros(2, dtype=np.int64)

  def add(self, image: np.ndarray, label: int) -> None:
    """Adds one (H, W, C) image of class ``label`` (0 QCD, 1 top)."""
    image = np.asarray(image, dtype=np.float64)
    label = int(np.asarray(label).reshape(-1)[0])
    if label not in (0, 1):
      raise ValueError(f"labels: expected class labels in {{0, 1}}, found {label}")
    if image.ndim != 3:
      raise ValueError(f"image: expected (H, W, C), got shape {image.shape}")
    if self.sums is None:
      self.sums = np.zeros((2, *image.shape), dtype=np.float64)
    elif image.shape != self.sums.shape[1:]:
      raise ValueError(f"image: shape {image.shape} differs from the first image's {self.sums.shape[1:]}")
    self.sums[label] += image
    self.counts[label] += 1

  def means(self) -> np.ndarray:
    """(2, H, W, C) mean images, row 0 QCD and row 1 top; a class without images raises OneClassError."""
    if self.sums is None or not self.counts.all():
      missing = 0 if self.counts[0] == 0 else 1
      raise OneClassError(f"mean images per class need both classes; no image of class {missing}")
    return self.sums / self.counts[:, None, None, None]


# --- uncertainties ----------------------------------------------------------------------------------


def bootstrap_interval(
  metric_fn: Callable[..., float], *arrays, num_samples: int = 1000, seed: int = 0, level: float = 0.68
) -> tuple[float, float]:
  """Percentile bootstrap interval of ``metric_fn(*arrays)`` at the given confidence ``level``.

  Every array is resampled with the same indices (examples stay paired). Resamples for which
  ``metric_fn`` raises ``UndefinedMetricError`` (e.g. an AUC on a resample that drew a single class, a
  JSD on one where no background jet passed the cut) are skipped, not fatal; if fewer than two
  resamples survive an ``UndefinedMetricError`` is raised. The same ``seed`` draws the same resamples
  for every metric of one input size, so results are reproducible byte for byte.
  """
  if not arrays:
    raise ValueError("bootstrap_interval needs at least one array to resample")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if num_samples < 2:
    raise ValueError(f"num_samples must be at least 2, got {num_samples}")
  arrays = tuple(np.asarray(a) for a in arrays)
  _check_same_length(**{f"array{i}": a for i, a in enumerate(arrays)})
  size = len(arrays[0])
  if size == 0:
    raise ValueError("bootstrap_interval: empty input")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_samples):
    index = rng.integers(0, size, size)
    try:
      values.append(metric_fn(*(a[index] for a in arrays)))
    except UndefinedMetricError:
      continue
  if len(values) < 2:
    raise UndefinedMetricError(
      f"bootstrap_interval: only {len(values)} of {num_samples} resamples gave "
      "a value (the metric was undefined on the others, e.g. a single class)"
    )
  low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return float(low), float(high)


# --- everything at once -----------------------------------------------------------------------------


def _rejection_key(efficiency: float) -> str:
  return f"rejection_at_eff_{efficiency:g}"


def _json_number(value: float) -> float | None:
  """Finite floats pass through; ``inf`` (unbounded rejection) and NaN (undefined) become None."""
  return float(value) if np.isfinite(value) else None


def _json_list(values: np.ndarray) -> list:
  """A vector as a JSON list: ints stay ints, non-finite floats (empty bins) become None."""
  values = np.asarray(values)
  if np.issubdtype(values.dtype, np.integer):
    return [int(v) for v in values]
  return [_json_number(float(v)) for v in values]


def _interval_or_none(metric_fn: Callable[..., float], *arrays, **bootstrap) -> list[float] | None:
  """``bootstrap_interval`` as a list, or None where too few resamples gave a value."""
  try:
    return list(bootstrap_interval(metric_fn, *arrays, **bootstrap))
  except UndefinedMetricError:
    return None


def _inverse_interval(interval: list[float] | None) -> list[float | None] | None:
  """Interval of 1/x from the interval [lo, hi] of x ≥ 0: [1/hi, 1/lo]; 1/0 (unbounded) is None.

  Bootstrapping x (ε_B for R50) and inverting avoids quantiles over infinite resamples (ε_B = 0); for
  the percentile bootstrap the two agree up to the interpolation between neighbouring resamples.
  """
  if interval is None:
    return None
  low, high = interval
  return [1.0 / high if high > 0 else None, 1.0 / low if low > 0 else None]


def _sculpting_metrics(labels, probs, mass_true, bootstrap: dict) -> dict:
  sculpting = mass_sculpting(labels, probs, mass_true)
  efficiency_interval = _interval_or_none(
    sculpting_background_efficiency, labels, probs, mass_true, **bootstrap
  )
  # JSD50 is biased upward on finite samples and a resample (with its repeated jets) is noisier still, so
  # the resamples' JSDs sit above the value, often entirely: their percentile interval is no interval
  # around it. Their spread is still the statistical error, quoted as σ = half the 68 % width. No error
  # where the JSD itself is undefined: resamples that happen to define it are not its spread.
  jsd = sculpting["jsd"]
  jsd_interval = (
    None if np.isnan(jsd) else _interval_or_none(sculpting_jsd, labels, probs, mass_true, **bootstrap)
  )
  jsd_error = None if jsd_interval is None else (jsd_interval[1] - jsd_interval[0]) / 2.0
  null = sculpting_jsd_null(
    labels, probs, mass_true, num_samples=bootstrap["num_samples"], seed=bootstrap["seed"]
  )
  return {
    "sculpting_target_signal_efficiency": SCULPTING_EFFICIENCY,
    "sculpting_signal_efficiency": sculpting["signal_efficiency"],
    "sculpting_threshold": sculpting["threshold"],
    "sculpting_background_efficiency": sculpting["background_efficiency"],
    "sculpting_r50": _json_number(sculpting["rejection"]),
    "sculpting_r50_ci68": _inverse_interval(efficiency_interval),
    "sculpting_jsd50": _json_number(sculpting["jsd"]),
    "sculpting_jsd50_error": jsd_error,
    "sculpting_inverse_jsd50": _json_number(sculpting["inverse_jsd"]),
    # σ(1/J) = σ(J)/J², propagated to first order.
    "sculpting_inverse_jsd50_error": None if jsd_error is None or jsd == 0 else jsd_error / jsd**2,
    "sculpting_jsd50_null": _json_number(null),
    "sculpting_inverse_jsd50_null": None if not null > 0 else 1.0 / null,  # NaN or 0: None
    "sculpting_num_background_pass": sculpting["num_pass"],
    "sculpting_num_background_fail": sculpting["num_fail"],
    "sculpting_mass_edges": _json_list(sculpting["edges"]),
    "sculpting_background_mass_all": _json_list(sculpting["background_all"]),
    "sculpting_background_mass_pass": _json_list(sculpting["background_pass"]),
    "sculpting_background_mass_fail": _json_list(sculpting["background_fail"]),
  }


def _calibration_metrics(labels, probs, bootstrap: dict) -> dict:
  bins = reliability_bins(labels, probs)
  return {
    "calibration_ece": expected_calibration_error(labels, probs),
    "calibration_ece_ci68": list(bootstrap_interval(expected_calibration_error, labels, probs, **bootstrap)),
    "calibration_brier": brier_score(labels, probs),
    "calibration_brier_ci68": list(bootstrap_interval(brier_score, labels, probs, **bootstrap)),
    "reliability_bin_edges": _json_list(bins["edges"]),
    "reliability_count": _json_list(bins["count"]),
    "reliability_confidence": _json_list(bins["confidence"]),
    "reliability_signal_fraction": _json_list(bins["signal_fraction"]),
  }


RESPONSE_GROUPS = {"all": None, "top": 1, "qcd": 0}  # key suffix -> class (None: every jet)


def _response_metrics(labels, mass_true, mass_pred, bootstrap: dict) -> dict:
  edges = mass_response_edges(mass_true)
  result: dict = {"mass_response_bin_edges": _json_list(edges)}
  for group, cls in RESPONSE_GROUPS.items():
    chosen = np.ones(labels.size, bool) if cls is None else labels == cls
    median, resolution = response_median_and_resolution(mass_pred[chosen] / mass_true[chosen])
    binned = binned_mass_response(mass_true[chosen], mass_pred[chosen], edges=edges)
    result.update(
      {
        f"mass_response_{group}_median": median,
        f"mass_response_{group}_resolution": resolution,
        f"mass_response_binned_{group}_count": _json_list(binned["count"]),
        f"mass_response_binned_{group}_median": _json_list(binned["median"]),
        f"mass_response_binned_{group}_resolution": _json_list(binned["resolution"]),
      }
    )
  fraction_true, fraction_pred = top_window_fractions(labels, mass_true, mass_pred)
  excess_interval = _interval_or_none(top_window_excess, labels, mass_true, mass_pred, **bootstrap)
  result.update(
    {
      "top_mass_window": list(TOP_MASS_WINDOW),
      "qcd_top_window_fraction_true": fraction_true,
      "qcd_top_window_fraction_pred": fraction_pred,
      "qcd_top_window_excess_ci68": excess_interval,
      "qcd_top_window_pileup": piles_up_at_top_mass(fraction_true, fraction_pred, excess_interval),
    }
  )
  return result


def classification_and_mass_metrics(
  labels, probs, mass_true, mass_pred, *, bootstrap_samples: int = 1000, seed: int = 0
) -> dict:
  """All report metrics as a flat, JSON-ready dict (Python floats, ints, bools, lists and None only).

  Keys: ``accuracy``, ``roc_auc``, ``mass_mae``, ``mass_mse``, ``mass_bias``, ``mass_resolution``,
  ``mass_relative_bias``, ``rejection_at_eff_0.3``, ``rejection_at_eff_0.5`` (None when no background
  passes, i.e. the rejection is unbounded), 68 % bootstrap intervals ``accuracy_ci68``,
  ``roc_auc_ci68``, ``mass_mae_ci68`` as ``[low, high]``, ``num_examples`` and ``num_signal``. Then
  the physics checks, every key added after these (so older readers keep working):

  * ``sculpting_*`` (``mass_sculpting`` at ε_S = 0.5 on ``SCULPTING_MASS_EDGES``): achieved
    ``signal_efficiency``, ``threshold``, ``background_efficiency``, ``r50`` (1/ε_B at the cut; None
    when unbounded) with ``r50_ci68`` (the inverted 68 % interval of ε_B, None endpoints unbounded),
    ``jsd50`` (None when undefined), ``inverse_jsd50`` (None when unbounded or undefined), their
    bootstrap σ ``jsd50_error`` (half the width of the 68 % percentile interval) and
    ``inverse_jsd50_error`` (σ/JSD², first order), ``jsd50_null`` and ``inverse_jsd50_null``
    (``sculpting_jsd_null``: the floor from statistics alone), the background counts and the
    normalised background-mass histograms (``all``, ``pass``, ``fail``; None-filled when empty). JSD50
    is biased upward on small samples, resamples more so: their percentile interval can lie entirely
    above the value, hence a σ rather than an interval, and the null floor beside it.
  * ``calibration_ece``/``calibration_brier`` with ``_ci68``, and the reliability diagram
    ``reliability_bin_edges``, ``reliability_count``, ``reliability_confidence``,
    ``reliability_signal_fraction`` (None in empty bins).
  * ``mass_response_{all,top,qcd}_{median,resolution}`` of r = m_pred/m_true, the same per 50-GeV
    true-mass bin (``mass_response_bin_edges``) as ``mass_response_binned_<group>_{count,median,
    resolution}`` (None in bins with fewer than ``RESPONSE_MIN_COUNT`` jets; edges shared by the groups),
    and ``qcd_top_window_fraction_{true,pred}``, ``qcd_top_window_excess_ci68`` and the verdict
    ``qcd_top_window_pileup`` (``piles_up_at_top_mass``) for ``top_mass_window`` in GeV.

  Every interval uses ``bootstrap_samples`` resamples drawn from ``seed``: the result is deterministic.
  """
  labels, probs = validate_labels_and_scores(labels, probs, "probs")
  mass_true, mass_pred = validate_masses(mass_true, mass_pred)
  _check_same_length(labels=labels, mass_true=mass_true)
  mass = mass_errors(mass_true, mass_pred)
  result = {
    "accuracy": accuracy(labels, probs),
    "roc_auc": roc_auc(labels, probs),
    **{f"mass_{key}": value for key, value in mass.items()},
  }
  for efficiency in REJECTION_EFFICIENCIES:
    result[_rejection_key(efficiency)] = _json_number(background_rejection(labels, probs, efficiency))
  bootstrap = dict(num_samples=bootstrap_samples, seed=seed, level=0.68)
  result["accuracy_ci68"] = list(bootstrap_interval(accuracy, labels, probs, **bootstrap))
  result["roc_auc_ci68"] = list(bootstrap_interval(roc_auc, labels, probs, **bootstrap))
  result["mass_mae_ci68"] = list(bootstrap_interval(mass_mae, mass_true, mass_pred, **bootstrap))
  result["num_examples"] = int(labels.size)
  result["num_signal"] = int(labels.sum())
  result.update(_sculpting_metrics(labels, probs, mass_true, bootstrap))
  result.update(_calibration_metrics(labels, probs, bootstrap))
  result.update(_response_metrics(labels, mass_true, mass_pred, bootstrap))
  return result
