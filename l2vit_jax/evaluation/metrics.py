"""Classification and mass-regression metrics in plain numpy.

Conventions: ``labels`` are 0 (QCD) / 1 (boosted top, the signal); ``probs`` and ``scores`` are the
model's probability (or any monotone score) for class 1; masses are in GeV. Every public function
validates its inputs and raises ``ValueError`` with a one-line message on empty inputs, length
mismatches, NaN/Inf values, labels outside {0, 1} or, where a ROC is needed, a single class.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# Signal efficiencies at which background rejection is reported (CMS boosted-top convention).
REJECTION_EFFICIENCIES = (0.3, 0.5)


class OneClassError(ValueError):
  """Raised when a metric needs both classes but the labels contain only one.

  A subclass of ``ValueError`` so callers can catch either; ``bootstrap_interval`` skips resamples that
  raise it.
  """


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
    raise ValueError(f"{name}: values must be finite, found {array[bad[0]]} at index {bad[0]}"
                     f" ({bad.size} non-finite in total)")
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


def validate_labels_and_scores(labels, scores, scores_name: str = "scores"
                               ) -> tuple[np.ndarray, np.ndarray]:
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


def roc_curve(labels, scores, *, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    raise ValueError(f"mass_true: expected positive masses (relative errors divide by them), "
                     f"found {mass_true[index]} at index {index}")
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
      "mse": float(np.mean(residual ** 2)),
      "bias": float(np.median(residual)),
      "resolution": float((high - low) / 2.0),
      "relative_bias": float(np.median(relative)),
  }


def mass_mae(mass_true, mass_pred) -> float:
  """Mean absolute mass error in GeV (a single-number wrapper for bootstrapping)."""
  return mass_errors(mass_true, mass_pred)["mae"]


# --- uncertainties ----------------------------------------------------------------------------------

def bootstrap_interval(metric_fn: Callable[..., float], *arrays, num_samples: int = 1000, seed: int = 0,
                       level: float = 0.68) -> tuple[float, float]:
  """Percentile bootstrap interval of ``metric_fn(*arrays)`` at the given confidence ``level``.

  Every array is resampled with the same indices (examples stay paired). Resamples for which
  ``metric_fn`` raises ``OneClassError`` (e.g. an AUC on a resample that drew a single class) are
  skipped, not fatal; if fewer than two resamples survive a ``ValueError`` is raised.
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
    except OneClassError:
      continue
  if len(values) < 2:
    raise ValueError(f"bootstrap_interval: only {len(values)} of {num_samples} resamples gave a value "
                     "(the others contained a single class)")
  low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return float(low), float(high)


# --- everything at once -----------------------------------------------------------------------------

def _rejection_key(efficiency: float) -> str:
  return f"rejection_at_eff_{efficiency:g}"


def _json_number(value: float) -> float | None:
  """Finite floats pass through; ``inf`` (unbounded rejection) becomes None, which JSON can hold."""
  return value if np.isfinite(value) else None


def classification_and_mass_metrics(labels, probs, mass_true, mass_pred, *, bootstrap_samples: int = 1000,
                                    seed: int = 0) -> dict:
  """All report metrics as a flat, JSON-ready dict (Python floats, ints, lists and None only).

  Keys: ``accuracy``, ``roc_auc``, ``mass_mae``, ``mass_mse``, ``mass_bias``, ``mass_resolution``,
  ``mass_relative_bias``, ``rejection_at_eff_0.3``, ``rejection_at_eff_0.5`` (None when no background
  passes, i.e. the rejection is unbounded), 68 % bootstrap intervals ``accuracy_ci68``,
  ``roc_auc_ci68``, ``mass_mae_ci68`` as ``[low, high]``, ``num_examples`` and ``num_signal``.
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
  return result
