"""Per-model evaluation outputs and the markdown comparison report.

Layout written under ``out_dir``::

  out_dir/
    report.md              side-by-side table, physics checks (mass sculpting, calibration, mass
                           response), reference figures, metric definitions, plot links
    roc.png                all models' ROC and background-rejection curves
    training_curves.png    all models' training curves (when logs are given)
    mean_images.png        mean image per class and channel of the evaluated jets (when given)
    <name>/metrics.json    classification_and_mass_metrics(...)
    <name>/predictions.npz index, label, prob, mass_true, mass_pred
    <name>/confusion_matrix.png, mass_2d.png, mass_residual.png, mass_sculpting.png, reliability.png,
           mass_response.png[, training_curves.png]

Everything written is a function of the inputs (seeded bootstraps, no timestamps), so the same
predictions give byte-identical files: an interrupted and rerun evaluation ends with the same report.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from l2vit_jax.runtime import paths
from l2vit_jax.evaluation import metrics
from l2vit_jax.evaluation import plots

# A reference figure: a value, a (low, high) range over several models, or None where not reported.
ReferenceValue = float | tuple[float, float] | None

PER_MODEL_PLOTS = (
  "confusion_matrix.png",
  "mass_2d.png",
  "mass_residual.png",
  "mass_sculpting.png",
  "reliability.png",
  "mass_response.png",
  "training_curves.png",
)
MEAN_IMAGES_PLOT = "mean_images.png"
REFERENCE_LABEL = "reference figures on the real CMS test split (not comparable to synthetic data)"


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
  """One row of docs/design.md, Reference results (the seed's and others' results on the real 2000-image test split)."""

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


def _write_predictions(path: str, *, index, labels, probs, mass_true, mass_pred) -> None:
  index = np.asarray(index).reshape(-1)
  if not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f"index: expected integer example indices, got dtype {index.dtype}")
  if index.size != np.asarray(labels).reshape(-1).size:
    raise ValueError(f"index has {index.size} entries but labels have {np.asarray(labels).size}")
  paths.write_with(
    path,
    np.savez,
    index=index.astype(np.int64),
    label=np.asarray(labels).reshape(-1).astype(np.int64),
    prob=np.asarray(probs).reshape(-1),
    mass_true=np.asarray(mass_true).reshape(-1),
    mass_pred=np.asarray(mass_pred).reshape(-1),
  )


def write_model_outputs(
  out_dir: str | os.PathLike,
  name: str,
  *,
  index,
  labels,
  probs,
  mass_true,
  mass_pred,
  metrics_jsonl: str | os.PathLike | None = None,
  bootstrap_samples: int = 1000,
) -> dict:
  """Computes one model's metrics and writes its metrics.json, predictions.npz and plots.

  The plots are ``PER_MODEL_PLOTS``: confusion matrix, mass 2D histogram and residuals, the physics
  checks (mass sculpting at ε_S = 0.5, reliability diagram, mass response) and, with a log, training
  curves. Every row of a report (checkpoints, probes, the physics baseline) goes through here, so every
  row gets all of them.

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
  results = metrics.classification_and_mass_metrics(
    labels, probs, mass_true, mass_pred, bootstrap_samples=bootstrap_samples
  )
  _write_predictions(
    paths.join(model_dir, "predictions.npz"),
    index=index,
    labels=labels,
    probs=probs,
    mass_true=mass_true,
    mass_pred=mass_pred,
  )
  paths.write_json(paths.join(model_dir, "metrics.json"), results)  # inf/NaN were mapped to None
  plots.plot_confusion_matrix(labels, probs, paths.join(model_dir, "confusion_matrix.png"), title=name)
  plots.plot_mass_2d(mass_true, mass_pred, paths.join(model_dir, "mass_2d.png"), title=name)
  plots.plot_mass_residual(mass_true, mass_pred, paths.join(model_dir, "mass_residual.png"), title=name)
  plots.plot_mass_sculpting(labels, probs, mass_true, paths.join(model_dir, "mass_sculpting.png"), title=name)
  plots.plot_reliability(labels, probs, paths.join(model_dir, "reliability.png"), title=name)
  plots.plot_mass_response(
    labels, mass_true, mass_pred, paths.join(model_dir, "mass_response.png"), title=f"{name}: mass response"
  )
  if metrics_jsonl is not None:
    plots.plot_training_curves(
      {name: metrics_jsonl}, paths.join(model_dir, "training_curves.png"), title=f"{name}: training curves"
    )
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


_COLUMNS = (
  "model",
  "N (signal)",
  "accuracy",
  "ROC-AUC",
  "1/ε_B at ε_S=0.3",
  "1/ε_B at ε_S=0.5",
  "mass MAE (GeV)",
  "mass MSE (GeV²)",
  "mass resolution",
  "mass bias (GeV)",
)


def _model_row(name: str, result: Mapping) -> list[str]:
  count = result.get("num_examples")
  resolution = result.get("mass_resolution")
  bias = result.get("mass_bias")
  return [
    f"**{_cell(name)}**",
    MISSING if count is None else f"{count} ({result.get('num_signal', '?')})",
    _with_interval(result.get("accuracy"), result.get("accuracy_ci68"), 4),
    _with_interval(result.get("roc_auc"), result.get("roc_auc_ci68"), 4),
    *(_rejection(result, efficiency) for efficiency in metrics.REJECTION_EFFICIENCIES),
    _with_interval(result.get("mass_mae"), result.get("mass_mae_ci68"), 2),
    _number(result.get("mass_mse"), 1),
    MISSING if resolution is None else f"{100 * resolution:.1f} %",
    MISSING if bias is None else f"{bias:+.2f}",
  ]


def _reference_row(reference: ReferenceResult) -> list[str]:
  row = [
    _cell(reference.model),
    MISSING,
    _reference_value(reference.accuracy, 4),
    _reference_value(reference.roc_auc, 4),
  ]
  row += [MISSING] * len(metrics.REJECTION_EFFICIENCIES)
  row += [_reference_value(reference.mass_mae, 2), _reference_value(reference.mass_mse, 1)]
  return row + [MISSING] * (len(_COLUMNS) - len(row))


def _table_line(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def comparison_table(results: Mapping[str, Mapping]) -> str:
  """Markdown table: one row per model, then a labelled block of docs/design.md, Reference results reference rows."""
  lines = [_table_line(_COLUMNS), _table_line(["---"] + ["---:"] * (len(_COLUMNS) - 1))]
  lines += [_table_line(_model_row(name, result)) for name, result in results.items()]
  lines.append(_table_line([f"***{REFERENCE_LABEL}***"] + [""] * (len(_COLUMNS) - 1)))
  lines += [_table_line(_reference_row(reference)) for reference in REFERENCE_RESULTS]
  return "\n".join(lines)


# --- physics checks ---------------------------------------------------------------------------------

UNBOUNDED = "∞"


def _unbounded_with_interval(result: Mapping, key: str, digits: int) -> str:
  """A value whose None means unbounded (R50 with no background passing), with its interval.

  Interval endpoints may be None (unbounded) too: ``12.5 (+∞/−3.1)``.
  """
  if key not in result:
    return MISSING
  value, interval = result[key], result.get(f"{key}_ci68")
  if value is None:
    return UNBOUNDED
  if not interval:
    return f"{value:.{digits}f}"
  low, high = interval
  upper = UNBOUNDED if high is None else f"{high - value:.{digits}f}"
  lower = UNBOUNDED if low is None else f"{value - low:.{digits}f}"
  return f"{value:.{digits}f} (+{upper}/−{lower})"


def _with_error(value, error, digits: int) -> str:
  """``0.0874 ± 0.0311``: a bootstrap σ (the JSD's resamples are biased, see metrics)."""
  if value is None:
    return MISSING
  return f"{value:.{digits}f}" if error is None else f"{value:.{digits}f} ± {error:.{digits}f}"


def _inverse_jsd(
  result: Mapping, key: str = "sculpting_inverse_jsd50", jsd_key: str = "sculpting_jsd50"
) -> str:
  """1/JSD50: ∞ for identical pass/fail shapes (JSD 0), — where undefined (no QCD jet passes or fails)."""
  if key not in result:
    return MISSING
  if result[key] is None:
    return UNBOUNDED if result.get(jsd_key) == 0 else MISSING
  return _with_error(result[key], result.get(f"{key}_error"), 2)


def _percent(value, digits: int = 1) -> str:
  return MISSING if value is None else f"{100 * value:.{digits}f} %"


_SCULPTING_COLUMNS = (
  "model",
  "ε_S at the cut",
  "QCD jets passing / failing",
  "R50 = 1/ε_B",
  "JSD50 (bits)",
  "1/JSD50",
  "1/JSD50 floor (no sculpting)",
)


def _sculpting_row(name: str, result: Mapping) -> list[str]:
  passing, failing = result.get("sculpting_num_background_pass"), result.get("sculpting_num_background_fail")
  return [
    f"**{_cell(name)}**",
    _number(result.get("sculpting_signal_efficiency"), 3),
    MISSING if passing is None else f"{passing} / {failing}",
    _unbounded_with_interval(result, "sculpting_r50", 1),
    _with_error(result.get("sculpting_jsd50"), result.get("sculpting_jsd50_error"), 4),
    _inverse_jsd(result),
    _inverse_jsd(result, "sculpting_inverse_jsd50_null", "sculpting_jsd50_null"),
  ]


_CALIBRATION_COLUMNS = ("model", "ECE (10 bins)", "Brier score")


def _calibration_row(name: str, result: Mapping) -> list[str]:
  return [
    f"**{_cell(name)}**",
    _with_interval(result.get("calibration_ece"), result.get("calibration_ece_ci68"), 4),
    _with_interval(result.get("calibration_brier"), result.get("calibration_brier_ci68"), 4),
  ]


def _window_text() -> str:
  low, high = metrics.TOP_MASS_WINDOW
  return f"{low:g}–{high:g} GeV"


_RESPONSE_COLUMNS = (
  "model",
  "scale top",
  "resolution top",
  "scale QCD",
  "resolution QCD",
  f"QCD in {_window_text()}: true → predicted",
  "QCD piles up at the top mass?",
)


def _pileup(result: Mapping) -> str:
  verdict = result.get("qcd_top_window_pileup")
  if verdict is None:
    return MISSING
  true, pred = result.get("qcd_top_window_fraction_true"), result.get("qcd_top_window_fraction_pred")
  ratio = f" (×{pred / true:.2f})" if true else ""
  return f"**yes**{ratio}" if verdict else f"no{ratio}"


def _response_row(name: str, result: Mapping) -> list[str]:
  true, pred = result.get("qcd_top_window_fraction_true"), result.get("qcd_top_window_fraction_pred")
  return [
    f"**{_cell(name)}**",
    _number(result.get("mass_response_top_median"), 3),
    _percent(result.get("mass_response_top_resolution")),
    _number(result.get("mass_response_qcd_median"), 3),
    _percent(result.get("mass_response_qcd_resolution")),
    MISSING if true is None else f"{_percent(true)} → {_percent(pred)}",
    _pileup(result),
  ]


def _table(columns: Sequence[str], rows: list[list[str]]) -> str:
  lines = [_table_line(columns), _table_line(["---"] + ["---:"] * (len(columns) - 1))]
  return "\n".join(lines + [_table_line(row) for row in rows])


def pileup_sentence(results: Mapping[str, Mapping]) -> str:
  """One sentence naming the models whose QCD mass predictions pile up at the top mass."""
  judged = {
    name: result["qcd_top_window_pileup"]
    for name, result in results.items()
    if result.get("qcd_top_window_pileup") is not None
  }
  if not judged:
    return "No model has the top-window check."
  piling = [name for name, verdict in judged.items() if verdict]
  window = _window_text()
  rule = (
    f"(at least {metrics.PILEUP_RATIO:g}× as many QCD jets predicted in {window} as truly in it, "
    "with the 68 % interval of the excess above zero)"
  )
  if not piling:
    return f"QCD mass predictions do not pile up at the top mass for any model {rule}."
  listed = ", ".join(f"**{_cell(name)}**" for name in piling)
  return f"QCD mass predictions pile up at the top mass for {listed} {rule}."


def physics_checks(results: Mapping[str, Mapping]) -> str:
  """Markdown of the three per-model physics checks: mass sculpting, calibration, mass response."""
  names = list(results)
  edges = metrics.SCULPTING_MASS_EDGES
  parts = [
    "### Mass sculpting at ε_S = 0.5",
    "",
    _table(_SCULPTING_COLUMNS, [_sculpting_row(name, results[name]) for name in names]),
    "",
    f"The class score is cut where half of the top jets pass; JSD50 compares the true-mass shapes of the "
    f"QCD jets passing and failing the cut on {edges.size - 1} bins of {edges[1] - edges[0]:g} GeV over "
    f"{edges[0]:g}–{edges[-1]:g} GeV (last bin with the overflow). Higher R50 and higher 1/JSD50 are "
    "both better (ATLAS/DisCo convention, PRL 125, 122001). The floor is 1/JSD50 of random pass/fail "
    "splits of the same QCD jets: a 1/JSD50 near it means no sculpting this test set can resolve. "
    "Plots: `<model>/mass_sculpting.png`.",
    "",
    "### Calibration",
    "",
    _table(_CALIBRATION_COLUMNS, [_calibration_row(name, results[name]) for name in names]),
    "",
    "Reliability diagrams: `<model>/reliability.png`; per-bin values in `metrics.json` (`reliability_*`).",
    "",
    "### Mass response",
    "",
    _table(_RESPONSE_COLUMNS, [_response_row(name, results[name]) for name in names]),
    "",
    pileup_sentence(results) + " Scale and resolution per "
    f"{metrics.RESPONSE_BIN_WIDTH:g}-GeV bin of true mass, per class and overall: "
    "`<model>/mass_response.png` and `metrics.json` (`mass_response_binned_*`).",
  ]
  return "\n".join(parts)


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
- **intervals**: (+a/−b) are 68 % bootstrap percentile intervals over test examples (resamples on which a
  metric is undefined, e.g. a single class for the AUC, are skipped). They show test-set statistical noise
  only, not run-to-run spread. The R50 interval is the inverted interval of ε_B. JSD50 is biased upward
  on finite samples, and resamples (with repeated jets) more so, so its resamples can lie entirely above
  it: its error is a bootstrap σ (± half the 68 % width), and 1/JSD50's is σ/JSD50².
- **mass sculpting**: the score is cut at the threshold that keeps half of the top jets (from the top
  jets' scores alone; ties at the threshold pass, so the achieved ε_S is shown). P and Q are the
  normalised true-mass histograms of the QCD jets passing and failing the cut;
  JSD50 = ½ KL(P‖M) + ½ KL(Q‖M) with M = (P + Q)/2 and log base 2, so 0 ≤ JSD50 ≤ 1 (0: the cut does
  not change the QCD mass shape; 1: passing and failing jets have no mass bin in common). R50 = 1/ε_B at
  this cut (it can differ from the interpolated 1/ε_B at ε_S=0.5 above by the jets at the cut). The
  floor is the median JSD50 of random splits of the QCD jets with the cut's pass/fail counts (seeded):
  what noise alone gives, so 1/JSD50 cannot be resolved much above 1/floor.
- **calibration**: 10 equal-width bins of the predicted P(top) ([k/10, (k+1)/10), the last closed).
  ECE = Σ_b (n_b/N) |acc_b − conf_b|, with conf_b the mean P(top) in bin b and acc_b the fraction of top
  jets in it (0 = calibrated, binary form, not the multi-class top-label ECE). Brier score = mean((p − y)²)
  with y = 1 for top (0.25 for a constant 0.5).
- **mass response**: r = m_pred/m_true. Scale = median of r (1 = unbiased), resolution = (q84 − q16)/2
  of r (σ for a Gaussian), for top and QCD jets; per 50-GeV true-mass bin (bins with fewer than 5 jets
  not measured) in the plots and metrics.json.
- **top-mass pile-up**: the fraction of QCD jets whose predicted mass is in 150–200 GeV against the
  fraction whose true mass is; a regression that leans on the class pushes QCD predictions there.
- **mean images**: the pixel-wise mean of the evaluated jets' raw images (channel units, before the
  training pixel scale) per class and channel; a property of the data, shown once per report.
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


def write_report(
  out_dir: str | os.PathLike,
  results: Mapping[str, Mapping],
  *,
  predictions: Mapping[str, tuple],
  training_logs: Mapping[str, str] | None = None,
  mean_images: metrics.ClassMeanImages | None = None,
  title: str = "L2ViT (JAX) evaluation report",
  notes: str = "",
) -> str:
  """Writes ``out_dir/report.md``: comparison table, physics checks, combined ROC and training curves.

  Args:
    out_dir: report folder (per-model plots already in ``out_dir/name/`` are linked too).
    results: model name -> metrics dict from ``classification_and_mass_metrics`` (missing keys show —).
    predictions: model name -> (labels, probs) for the combined ROC plot.
    training_logs: model name -> JSON-lines metrics path for the combined training-curves plot.
    mean_images: the evaluated jets' per-class image sums; plotted once as ``mean_images.png``.
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
  lines += [
    "## Results",
    "",
    comparison_table(results),
    "",
    f"Rows below the label are {REFERENCE_LABEL}: different data, listed for orientation only.",
    "",
  ]
  if results:
    lines += ["## Physics checks", "", physics_checks(results), ""]
  lines += ["## Metrics", "", METRIC_EXPLANATIONS]
  figures = []
  if predictions:
    plots.plot_roc(dict(predictions), paths.join(out_dir, "roc.png"), title="ROC and background rejection")
    figures.append(_image("roc.png", "ROC curves and background rejection"))
  if training_logs:
    plots.plot_training_curves(dict(training_logs), paths.join(out_dir, "training_curves.png"))
    figures.append(_image("training_curves.png", "training curves"))
  if mean_images is not None:
    counts = mean_images.counts
    plots.plot_mean_images(
      mean_images.means(),
      counts,
      paths.join(out_dir, MEAN_IMAGES_PLOT),
      title=f"Mean jet image per class and channel ({counts[1]} top, {counts[0]} QCD jets)",
    )
    figures.append(
      f"Mean image of the evaluated jets per class and channel ({counts[1]} top, {counts[0]} "
      "QCD; raw pixel values, log colour scale shared by a channel's two panels, blank where "
      "no jet has a deposit):\n\n" + _image(MEAN_IMAGES_PLOT, "mean jet image per class and channel")
    )
  per_model = _per_model_plot_links(out_dir, list(results))
  if figures or per_model:
    lines += ["## Plots", ""] + [line for figure in figures for line in (figure, "")] + per_model
  path = paths.join(out_dir, "report.md")
  paths.write_text(path, "\n".join(lines).rstrip() + "\n")
  return path
