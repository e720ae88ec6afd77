"""Evaluation: metrics (numpy only), plots and the comparison report.

Only the metrics are re-exported here so that importing them does not pull in matplotlib; use
``from l2vit_jax.evaluation import plots, report`` for the rest.
"""

from l2vit_jax.evaluation.metrics import (
    OneClassError,
    accuracy,
    background_rejection,
    bootstrap_interval,
    classification_and_mass_metrics,
    confusion_matrix,
    mass_errors,
    predict_classes,
    roc_auc,
    roc_curve,
)

__all__ = [
    "OneClassError",
    "accuracy",
    "background_rejection",
    "bootstrap_interval",
    "classification_and_mass_metrics",
    "confusion_matrix",
    "mass_errors",
    "predict_classes",
    "roc_auc",
    "roc_curve",
]
