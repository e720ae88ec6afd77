"""Per-model evaluation outputs and the markdown comparison report.

Layout written under ``out_dir``::

  out_dir/
    report.md              side-by-side table, reference figures, metric definitions, plot links
    roc.png                all models' ROC and background-rejection curves
    training_curves.png    all models' training curves (when logs are given)
    <name>/metrics.json    classification_and_mass_metrics(...)
    <name>/predictions.npz index, label, prob, mass_true, mass_pred
    <name>/confusion_matrix.png, mass_2d.png, mass_residual.png[, training_curves.png]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from l2vit_jax.runtime import paths
from l2vit_jax.evaluation import metrics as metrics_lib
from l2vit_jax.evaluation import plots

# A reference figure: a value, a (low, high) range over several models, or None where not reported.
ReferenceValue = float | tuple[float, float] | None

PER_MODEL_PLOTS = ("confusion_matrix.png", "mass_2d.png", "mass_residual.png", "training_curves.png")
REFERENCE_LABEL = "reference figures on the real CMS test split (not comparable to synthetic data)"


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
  """One row of DESIGN.md §4 (the seed's and others' results on the real 2000-image test split)."""
  model: str
  accuracy: ReferenceValue
  roc_auc: ReferenceValue
  mass_mae: ReferenceValue  # GeV
  mass_mse: ReferenceValue  # GeV²


REFERENCE_RESULTS: tuple[ReferenceResult, ...] = (
    ReferenceResult("seed L2ViT, SimCLR-pretrained", 0.9030, 0.9649, 16.39, 508.9),
    ReferenceResult("seed L2ViT, scratch", 0.8955, 0.9611, 17.36, 549.4),
    ReferenceResult("seed L2ViT, MAE-pretrained (dropped)", 0.8605, None, None, None),
    ReferenceResult("other task solutions (XCiT, ViTs)", (0.875, 0.891), (0.939, 0.955), (18.0, 26.0), None),
    ReferenceResult("CMS E2E ResNet-15, boosted top (published)", None, (0.975, 0.982), None, None),
)


# --- per-model outputs ------------------------------------------------------------------------------

def _check_name(name: str) -> None:
  """Model names become folder names: refuse ones that would escape ``out_dir`` or be empty."""
  if not name or name in (".", "..") or "/" in name or os.sep in name:
    raise ValueError(f"model name {name!r} cannot be used as a folder name")


def _write_json(path: str, data: Mapping) -> None:
  # Strict JSON: inf/NaN were mapped to None.
  paths.write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_predictions(path: str, *, index, labels, probs, mass_true, mass_pred) -> None:
  index = np.asarray(index).reshape(-1)
  if not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f"index: expected integer example indices, got dtype {index.dtype}")
  if index.size != np.asarray(labels).reshape(-1).size:
    raise ValueError(f"index has {index.size} entries but labels have {np.asarray(labels).size}")
  paths.write_with(path, np.savez, index=index.astype(np.int64),
                   label=np.asarray(labels).reshape(-1).astype(np.int64), prob=np.asarray(probs).reshape(-1),
                   mass_true=np.asarray(mass_true).reshape(-1), mass_pred=np.asarray(mass_pred).reshape(-1))


def write_model_outputs(out_dir: str | os.PathLike, name: str, *, index, labels, probs, mass_true, mass_pred,
                        metrics_jsonl: str | os.PathLike | None = None,
                        bootstrap_samples: int = 1000) -> dict:
  """Computes one model's metrics and writes its metrics.json, predictions.npz and plots.

  Args:
    out_dir: report folder; everything goes to ``out_dir/name/``.
    name: model name (also the folder name).
    index: example indices into the source HDF5 file, so predictions can be joined back to images.
    labels, probs: true class (0/1) and predicted probability of class 1.
    mass_true, mass_pred: jet masses in GeV.
    metrics_jsonl: the run's JSON-lines training log; if given, its training curves are plotted.
    bootstrap_samples: resamples for the 68 % intervals.

  Returns:
    The metrics dict written to metrics.json.
  """
  _check_name(name)
  model_dir = paths.join(os.fspath(out_dir), name)
  paths.makedirs(model_dir)
  # Metrics first: they validate every input before anything is written.
  results = metrics_lib.classification_and_mass_metrics(labels, probs, mass_true, mass_pred,
                                                        bootstrap_samples=bootstrap_samples)
  _write_predictions(paths.join(model_dir, "predictions.npz"), index=index, labels=labels, probs=probs,
                     mass_true=mass_true, mass_pred=mass_pred)
  _write_json(paths.join(model_dir, "metrics.json"), results)
  plots.plot_confusion_matrix(labels, probs, paths.join(model_dir, "confusion_matrix.png"), title=name)
  plots.plot_mass_2d(mass_true, mass_pred, paths.join(model_dir, "mass_2d.png"), title=name)
  plots.plot_mass_residual(mass_true, mass_pred, paths.join(model_dir, "mass_residual.png"), title=name)
  if metrics_jsonl is not None:
    plots.plot_training_curves({name: metrics_jsonl}, paths.join(model_dir, "training_curves.png"),
                               title=f"{name}: training curves")
  return results


# --- markdown formatting ----------------------------------------------------------------------------

MISSING = "—"


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def _number(value, digits: int) -> str:
  return MISSING if value is None else f"{value:.{digits}f}"


def _with_interval(value, interval: Sequence[float] | None, digits: int) -> str:
  """``0.9030 (+0.0065/−0.0068)``: the bootstrap interval may be asymmetric, so both sides are shown."""
  if value is None:
    return MISSING
  if not interval:
    return _number(value, digits)
  low, high = interval
  return f"{value:.{digits}f} (+{high - value:.{digits}f}/−{value - low:.{digits}f})"


def _rejection(result: Mapping, efficiency: float) -> str:
  key = f"rejection_at_eff_{efficiency:g}"
  if key not in result:
    return MISSING
  # A present None means no background passed at this efficiency: the rejection is unbounded.
  return "∞" if result[key] is None else f"{result[key]:.1f}"


def _reference_value(value: ReferenceValue, digits: int) -> str:
  if isinstance(value, tuple):  # ranges are quoted as published, without padding zeros
    return f"{value[0]:g}–{value[1]:g}"
  return _number(value, digits)


_COLUMNS = ("model", "N (signal)", "accuracy", "ROC-AUC", "1/ε_B at ε_S=0.3", "1/ε_B at ε_S=0.5",
            "mass MAE (GeV)", "mass MSE (GeV²)", "mass resolution", "mass bias (GeV)")


def _model_row(name: str, result: Mapping) -> list[str]:
  count = result.get("num_examples")
  resolution = result.get("mass_resolution")
  bias = result.get("mass_bias")
  return [
      f"**{_cell(name)}**",
      MISSING if count is None else f"{count} ({result.get('num_signal', '?')})",
      _with_interval(result.get("accuracy"), result.get("accuracy_ci68"), 4),
      _with_interval(result.get("roc_auc"), result.get("roc_auc_ci68"), 4),
      *(_rejection(result, efficiency) for efficiency in metrics_lib.REJECTION_EFFICIENCIES),
      _with_interval(result.get("mass_mae"), result.get("mass_mae_ci68"), 2),
      _number(result.get("mass_mse"), 1),
      MISSING if resolution is None else f"{100 * resolution:.1f} %",
      MISSING if bias is None else f"{bias:+.2f}",
  ]


def _reference_row(reference: ReferenceResult) -> list[str]:
  row = [_cell(reference.model), MISSING, _reference_value(reference.accuracy, 4),
         _reference_value(reference.roc_auc, 4)]
  row += [MISSING] * len(metrics_lib.REJECTION_EFFICIENCIES)
  row += [_reference_value(reference.mass_mae, 2), _reference_value(reference.mass_mse, 1)]
  return row + [MISSING] * (len(_COLUMNS) - len(row))


def _table_line(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def comparison_table(results: Mapping[str, Mapping]) -> str:
  """Markdown table: one row per model, then a labelled block of DESIGN.md §4 reference rows."""
  lines = [_table_line(_COLUMNS), _table_line(["---"] + ["---:"] * (len(_COLUMNS) - 1))]
  lines += [_table_line(_model_row(name, result)) for name, result in results.items()]
  lines.append(_table_line([f"***{REFERENCE_LABEL}***"] + [""] * (len(_COLUMNS) - 1)))
  lines += [_table_line(_reference_row(reference)) for reference in REFERENCE_RESULTS]
  return "\n".join(lines)


METRIC_EXPLANATIONS = """\
- **accuracy**: fraction of jets whose predicted class (top if P(top) > 0.5) is the true class.
- **ROC-AUC**: area under the ROC curve = probability that a random top jet scores higher than a random
  QCD jet (ties count ½); 0.5 is chance, 1 is perfect; independent of the 0.5 threshold.
- **1/ε_B at ε_S**: background rejection; the inverse of the fraction of QCD jets accepted at the threshold
  that keeps a fraction ε_S of top jets (interpolated along the ROC). Higher is better; ∞ means no QCD jet
  of the test set passes, so the true value is only known to exceed the number of QCD jets.
- **mass MAE / MSE**: mean absolute / squared error of the predicted jet mass (GeV, GeV²); MSE is
  dominated by the tails.
- **mass resolution**: half the width of the central 68 % interval (16th–84th percentile) of
  (pred − true)/true; equals σ for a Gaussian relative error and ignores outliers.
- **mass bias**: median of pred − true (GeV); a systematic shift of the mass scale.
- **intervals**: (+a/−b) are 68 % bootstrap percentile intervals over test examples (resamples with a
  single class are skipped for the AUC). They show test-set statistical noise only, not run-to-run spread.
"""


# --- the report -------------------------------------------------------------------------------------

def _image(relative_path: str, caption: str) -> str:
  return f"![{caption}]({relative_path.replace(os.sep, '/')})"


def _per_model_plot_links(out_dir: str, names: Sequence[str]) -> list[str]:
  """Links to the plots write_model_outputs left under ``out_dir/name/`` (only files that exist)."""
  lines = []
  for name in names:
    found = [plot for plot in PER_MODEL_PLOTS if paths.exists(paths.join(out_dir, name, plot))]
    if found:
      lines += [f"### {name}", ""]
      lines += [_image(os.path.join(name, plot), f"{name}: {plot[:-4].replace('_', ' ')}") for plot in found]
      lines.append("")
  return lines


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Mapping], *,
                 predictions: Mapping[str, tuple], training_logs: Mapping[str, str] | None = None,
                 title: str = "L2ViT (JAX) evaluation report", notes: str = "") -> str:
  """Writes ``out_dir/report.md`` with the comparison table, combined ROC and training-curve plots.

  Args:
    out_dir: report folder (per-model plots already in ``out_dir/name/`` are linked too).
    results: model name -> metrics dict from ``classification_and_mass_metrics`` (missing keys show —).
    predictions: model name -> (labels, probs) for the combined ROC plot.
    training_logs: model name -> JSON-lines metrics path for the combined training-curves plot.
    title: report heading.
    notes: free markdown placed after the heading (e.g. data set, run commands, caveats).

  Returns:
    The path of report.md.
  """
  out_dir = os.fspath(out_dir)
  paths.makedirs(out_dir)
  lines = [f"# {title}", ""]
  if notes:
    lines += [notes.strip(), ""]
  lines += ["## Results", "", comparison_table(results), "",
            f"Rows below the label are {REFERENCE_LABEL}: different data, listed for orientation only.", ""]
  lines += ["## Metrics", "", METRIC_EXPLANATIONS]
  figures = []
  if predictions:
    plots.plot_roc(dict(predictions), paths.join(out_dir, "roc.png"), title="ROC and background rejection")
    figures.append(_image("roc.png", "ROC curves and background rejection"))
  if training_logs:
    plots.plot_training_curves(dict(training_logs), paths.join(out_dir, "training_curves.png"))
    figures.append(_image("training_curves.png", "training curves"))
  per_model = _per_model_plot_links(out_dir, list(results))
  if figures or per_model:
    lines += ["## Plots", ""] + [line for figure in figures for line in (figure, "")] + per_model
  path = paths.join(out_dir, "report.md")
  paths.write_text(path, "\n".join(lines).rstrip() + "\n")
  return path
