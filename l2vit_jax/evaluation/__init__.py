"""Evaluation: metrics (numpy only), plots and the comparison report.

Only the metrics are re-exported here so that importing them does not pull in matplotlib; use
``from l2vit_jax.evaluation import plots, report`` for the rest.
"""

from l2vit_jax.evaluation.metrics import (
  ClassMeanImages,
  OneClassError,
  UndefinedMetricError,
  accuracy,
  background_rejection,
  binned_mass_response,
  bootstrap_interval,
  brier_score,
  classification_and_mass_metrics,
  confusion_matrix,
  expected_calibration_error,
  jensen_shannon_divergence,
  mass_errors,
  mass_sculpting,
  predict_classes,
  reliability_bins,
  roc_auc,
  roc_curve,
  sculpting_jsd_null,
  signal_efficiency_threshold,
  top_window_fractions,
)

__all__ = [
  "ClassMeanImages",
  "OneClassError",
  "UndefinedMetricError",
  "accuracy",
  "background_rejection",
  "binned_mass_response",
  "bootstrap_interval",
  "brier_score",
  "classification_and_mass_metrics",
  "confusion_matrix",
  "expected_calibration_error",
  "jensen_shannon_divergence",
  "mass_errors",
  "mass_sculpting",
  "predict_classes",
  "reliability_bins",
  "roc_auc",
  "roc_curve",
  "sculpting_jsd_null",
  "signal_efficiency_threshold",
  "top_window_fractions",
]
