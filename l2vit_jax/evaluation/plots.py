"""Evaluation plots; each function writes one PNG and returns its path.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: they never enter pyplot's
global figure registry, so nothing leaks across many calls in a long training process, no GUI backend
is ever selected (PNG output always goes through Agg) and plotting from a background thread is safe.
The look is chosen here, never by what happens to be installed: matplotlib's defaults unless the CMS
style of ``mplhep`` (the ``hep`` extra) is asked for, with ``set_style("cms")`` or the environment
variable ``L2VIT_PLOT_STYLE=cms``. The same code therefore writes the same PNGs with or without mplhep.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Mapping

import matplotlib
import matplotlib.colors
import matplotlib.figure
import matplotlib.style
import numpy as np

from l2vit_jax.errors import ConfigError
from l2vit_jax.runtime import paths
from l2vit_jax.evaluation import metrics
from l2vit_jax.training import metrics_log

# 'matplotlib': matplotlib's default rcParams (a matplotlibrc or a style someone set globally changes
# nothing either); 'cms': mplhep's CMS style on top of them, only when asked for.
STYLES = ("matplotlib", "cms")
STYLE_VARIABLE = "L2VIT_PLOT_STYLE"
_chosen_style = os.environ.get(STYLE_VARIABLE, "matplotlib")

CLASS_NAMES = ("QCD (0)", "top (1)")
DPI = 120
# Residual bins with fewer examples than this are not drawn: their 16th/84th percentiles are noise.
MIN_PER_BIN = 5
# Mathtext (no LaTeX install needed) so the subscripts render instead of showing underscores.
EPS_S = r"$\varepsilon_\mathrm{S}$"
EPS_B = r"$\varepsilon_\mathrm{B}$"


# --- shared helpers ---------------------------------------------------------------------------------


def set_style(name: str) -> None:
  """Chooses the look of every figure made from now on: one of STYLES (checked here)."""
  global _chosen_style  # pylint: disable=global-statement
  _style_sheets(name)
  _chosen_style = name


def _style_sheets(name: str) -> list:
  """The matplotlib style sheets of style ``name``.

  Raises:
    ConfigError: an unknown name, or 'cms' without mplhep installed.
  """
  if name == "matplotlib":
    return ["default"]
  if name == "cms":
    try:
      import mplhep  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(
        "plot style 'cms' needs mplhep: pip install -e \".[hep]\" (or use the default "
        f"style: unset {STYLE_VARIABLE})"
      ) from None
    return ["default", mplhep.style.CMS]
  raise ConfigError(
    f"unknown plot style {name!r} ({STYLE_VARIABLE} or plots.set_style); use one of {list(STYLES)}"
  )


@contextlib.contextmanager
def _style() -> Iterator[None]:
  """The chosen style while a figure is built and saved (rcParams are read at both times)."""
  with matplotlib.style.context(_style_sheets(_chosen_style)):
    yield


def _new_figure(ncols: int = 1, width: float = 6.0, height: float = 5.0):
  """Figure with ``ncols`` panels; sizes are for 10 pt text and grow with the style's font size."""
  # The CMS style uses ~26 pt text, which would not fit panels sized for matplotlib's default 10 pt.
  scale = max(1.0, float(matplotlib.rcParams["font.size"]) / 12.0)
  figure = matplotlib.figure.Figure(figsize=(width * ncols * scale, height * scale), layout="constrained")
  axes = figure.subplots(1, ncols, squeeze=False)[0]
  return figure, list(axes)


def _save(figure: matplotlib.figure.Figure, path: str | os.PathLike) -> str:
  """Writes the figure as PNG (parent folders created; local or gs://) and releases its memory."""
  path = os.fspath(path)
  paths.write_with(path, figure.savefig, dpi=DPI, format="png")
  figure.clear()  # Drop artists now rather than whenever the garbage collector gets to them.
  return path


# --- classification ---------------------------------------------------------------------------------


def plot_confusion_matrix(labels, probs, path, *, title: str = "Confusion matrix") -> str:
  """Confusion matrix coloured by row-normalised fraction, each cell annotated with count and fraction."""
  counts = metrics.confusion_matrix(labels, probs)
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  with _style():
    figure, (ax,) = _new_figure(width=6.0, height=5.0)
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(counts):
      colour = "white" if fractions[row, col] > 0.5 else "black"
      ax.text(col, row, f"{count}\n{fractions[row, col]:.1%}", ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(
      f"{title}\naccuracy {np.trace(counts) / counts.sum():.4f} (N = {counts.sum()})", fontsize="medium"
    )
    figure.colorbar(image, ax=ax, label="fraction of true class")
    return _save(figure, path)


def plot_roc(curves: Mapping[str, tuple], path, *, title: str = "ROC") -> str:
  """Two panels per model: TPR vs FPR, and background rejection 1/ε_B (log) vs signal efficiency ε_S.

  ``curves`` maps a model name to ``(labels, scores)``.
  """
  if not curves:
    raise ValueError("plot_roc needs at least one (labels, scores) pair")
  with _style():
    figure, (roc_ax, rejection_ax) = _new_figure(ncols=2, width=6.0, height=5.5)
    for name, (labels, scores) in curves.items():
      fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
      auc = metrics.roc_auc(labels, scores)
      (line,) = roc_ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.4f})")
      # Exact ROC points; those with ε_B = 0 have unbounded rejection and cannot be drawn on a log axis.
      finite = fpr > 0
      rejection_ax.plot(tpr[finite], 1.0 / fpr[finite], color=line.get_color(), label=name)
    roc_ax.plot([0, 1], [0, 1], ls=":", color="grey", label="random")
    roc_ax.set(
      xlabel=f"false positive rate {EPS_B}", ylabel=f"true positive rate {EPS_S}", xlim=(0, 1), ylim=(0, 1.01)
    )
    efficiency = np.linspace(0.01, 1.0, 100)
    rejection_ax.plot(efficiency, 1.0 / efficiency, ls=":", color="grey", label="random")
    for working_point in metrics.REJECTION_EFFICIENCIES:
      rejection_ax.axvline(working_point, color="lightgrey", lw=0.8, zorder=0)
    rejection_ax.set_yscale("log")
    rejection_ax.set(
      xlabel=f"signal efficiency {EPS_S}", ylabel=f"background rejection 1/{EPS_B}", xlim=(0, 1)
    )
    roc_ax.legend(loc="lower right", fontsize="small")
    rejection_ax.legend(loc="upper right", fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


# --- mass regression --------------------------------------------------------------------------------


def _mass_range(*arrays: np.ndarray) -> tuple[float, float]:
  """Common axis range that ignores the extreme 0.5 % tails so a few outliers do not squash the plot."""
  values = np.concatenate(arrays)
  low, high = np.percentile(values, [0.5, 99.5])
  if high <= low:  # all masses (nearly) equal
    low, high = low - 1.0, high + 1.0
  return float(low), float(high)


def plot_mass_2d(mass_true, mass_pred, path, *, title: str = "Jet mass", bins: int = 50) -> str:
  """2D histogram (log colour scale) of predicted vs true mass with the y = x line."""
  mass_true, mass_pred = metrics.validate_masses(mass_true, mass_pred)
  low, high = _mass_range(mass_true, mass_pred)
  edges = np.linspace(low, high, bins + 1)
  counts, _, _ = np.histogram2d(mass_true, mass_pred, bins=[edges, edges])
  errors = metrics.mass_errors(mass_true, mass_pred)
  with _style():
    figure, (ax,) = _new_figure(width=6.5, height=5.5)
    norm = matplotlib.colors.LogNorm(vmin=1, vmax=max(counts.max(), 2))
    mesh = ax.pcolormesh(edges, edges, np.ma.masked_equal(counts.T, 0), norm=norm, cmap="viridis")
    ax.plot([low, high], [low, high], color="red", lw=1.2, label="y = x")
    ax.set(xlabel="true mass (GeV)", ylabel="predicted mass (GeV)", xlim=(low, high), ylim=(low, high))
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(
      f"{title}\nMAE {errors['mae']:.2f} GeV, resolution {errors['resolution']:.1%}", fontsize="medium"
    )
    figure.colorbar(mesh, ax=ax, label="jets per bin")
    return _save(figure, path)


def binned_residual_quantiles(mass_true: np.ndarray, residual: np.ndarray, bins: int = 20):
  """Per true-mass bin: centres, 16th, 50th and 84th percentile of the residual.

  Bins span the 1st–99th percentile of the true mass; bins with fewer than ``MIN_PER_BIN`` examples
  are dropped.
  """
  low, high = np.percentile(mass_true, [1.0, 99.0])
  if high <= low:
    low, high = low - 1.0, high + 1.0
  edges = np.linspace(low, high, bins + 1)
  which = np.digitize(mass_true, edges) - 1
  rows = []
  for index in range(bins):
    in_bin = residual[which == index]
    if in_bin.size >= MIN_PER_BIN:
      rows.append([(edges[index] + edges[index + 1]) / 2, *np.percentile(in_bin, [16.0, 50.0, 84.0])])
  return np.asarray(rows, dtype=np.float64).reshape(-1, 4).T


def plot_mass_residual(mass_true, mass_pred, path, *, title: str = "Mass residual", bins: int = 20) -> str:
  """Residual (pred − true) vs true mass: binned median and the central 68 % band."""
  mass_true, mass_pred = metrics.validate_masses(mass_true, mass_pred)
  centres, p16, p50, p84 = binned_residual_quantiles(mass_true, mass_pred - mass_true, bins)
  with _style():
    figure, (ax,) = _new_figure(width=7.0, height=5.0)
    ax.axhline(0.0, color="grey", ls=":", lw=1)
    if centres.size:
      ax.fill_between(centres, p16, p84, alpha=0.3, step="mid", label="16–84 % band")
      ax.plot(centres, p50, marker="o", ms=4, drawstyle="steps-mid", label="median")
      ax.legend(loc="best", fontsize="small")
    else:
      ax.text(
        0.5,
        0.5,
        f"fewer than {MIN_PER_BIN} jets in every mass bin",
        transform=ax.transAxes,
        ha="center",
        va="center",
      )
    ax.set(xlabel="true mass (GeV)", ylabel="predicted − true mass (GeV)", title=title)
    return _save(figure, path)


# --- physics checks ---------------------------------------------------------------------------------


def plot_mass_sculpting(labels, scores, mass_true, path, *, title: str = "Mass sculpting") -> str:
  """Background (QCD) true-mass shape before the ε_S = 0.5 cut, and of the jets passing and failing it.

  Each histogram is normalised to unit area on ``metrics.SCULPTING_MASS_EDGES`` (the JSD's bins, last
  bin with the overflow), so the plot shows exactly what JSD50 compares; the title has R50 and 1/JSD50.
  """
  sculpting = metrics.mass_sculpting(labels, scores, mass_true)
  edges = sculpting["edges"]
  widths = np.diff(edges)
  with _style():
    figure, (ax,) = _new_figure(width=7.0, height=5.0)
    curves = (
      ("background_all", "all QCD (before the cut)", dict(color="black", lw=1.5)),
      ("background_pass", f"passing ({sculpting['num_pass']} jets)", dict(color="C1", lw=1.5)),
      ("background_fail", f"failing ({sculpting['num_fail']} jets)", dict(color="C0", lw=1.2, ls="--")),
    )
    for key, label, style in curves:
      fractions = sculpting[key]
      if np.isfinite(fractions).all():
        ax.stairs(fractions / widths, edges, label=label, **style)
    rejection = sculpting["rejection"]
    inverse_jsd = sculpting["inverse_jsd"]
    r50 = "∞" if not np.isfinite(rejection) else f"{rejection:.1f}"
    if np.isnan(inverse_jsd):
      jsd_text = "undefined"
    else:
      jsd_text = "∞" if np.isinf(inverse_jsd) else f"{inverse_jsd:.2f}"
    ax.set(xlabel="true jet mass (GeV)", ylabel="fraction of QCD jets per GeV", xlim=(edges[0], edges[-1]))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(
      f"{title}: cut at {EPS_S} = {sculpting['signal_efficiency']:.2f}\n"
      f"R50 = 1/{EPS_B} = {r50}, 1/JSD50 = {jsd_text}",
      fontsize="medium",
    )
    return _save(figure, path)


def plot_reliability(labels, probs, path, *, title: str = "Calibration") -> str:
  """Reliability diagram (observed top fraction vs mean P(top) per bin) and the P(top) histograms.

  Bins are ``metrics.reliability_bins``' (10 of width 0.1); empty bins are left out of the curve. The
  title has the ECE and Brier score.
  """
  bins = metrics.reliability_bins(labels, probs)
  labels, probs = metrics.validate_labels_and_scores(labels, probs, "probs")
  used = bins["count"] > 0
  with _style():
    figure, (diagram_ax, histogram_ax) = _new_figure(ncols=2, width=5.5, height=5.0)
    diagram_ax.plot([0, 1], [0, 1], ls=":", color="grey", label="calibrated")
    diagram_ax.plot(bins["confidence"][used], bins["signal_fraction"][used], marker="o", label="model")
    diagram_ax.set(
      xlabel="mean predicted P(top) in bin", ylabel="fraction of top jets in bin", xlim=(0, 1), ylim=(0, 1)
    )
    diagram_ax.set_aspect("equal")
    diagram_ax.legend(loc="upper left", fontsize="small")
    for cls, name in enumerate(CLASS_NAMES):
      histogram_ax.hist(probs[labels == cls], bins=bins["edges"], histtype="step", lw=1.5, label=name)
    histogram_ax.set(xlabel="predicted P(top)", ylabel="jets per bin", xlim=(0, 1))
    histogram_ax.legend(loc="upper center", fontsize="small")
    ece = metrics.expected_calibration_error(labels, probs)
    figure.suptitle(f"{title}: ECE {ece:.4f}, Brier {metrics.brier_score(labels, probs):.4f}")
    return _save(figure, path)


def plot_mass_response(labels, mass_true, mass_pred, path, *, title: str = "Mass response") -> str:
  """Scale (median of m_pred/m_true) and resolution ((q84 − q16)/2) vs true mass per class and overall,
  and the QCD true vs predicted mass with the top window shaded.

  Bins are ``metrics.binned_mass_response``' (50 GeV); bins with fewer than
  ``metrics.RESPONSE_MIN_COUNT`` jets are not drawn.
  """
  labels = metrics.validate_labels_and_scores(labels, mass_true, "mass_true")[0]
  mass_true, mass_pred = metrics.validate_masses(mass_true, mass_pred)
  edges = metrics.mass_response_edges(mass_true)
  centres = (edges[:-1] + edges[1:]) / 2
  groups = (
    ("all jets", None, dict(color="black")),
    ("top (1)", 1, dict(color="C1")),
    ("QCD (0)", 0, dict(color="C0")),
  )
  window = metrics.TOP_MASS_WINDOW
  with _style():
    figure, (scale_ax, resolution_ax, qcd_ax) = _new_figure(ncols=3, width=5.0, height=4.5)
    for name, cls, style in groups:
      chosen = np.ones(labels.size, bool) if cls is None else labels == cls
      if not chosen.any():
        continue
      binned = metrics.binned_mass_response(mass_true[chosen], mass_pred[chosen], edges=edges)
      drawn = np.isfinite(binned["median"])
      scale_ax.plot(centres[drawn], binned["median"][drawn], marker="o", ms=4, label=name, **style)
      resolution_ax.plot(centres[drawn], binned["resolution"][drawn], marker="o", ms=4, label=name, **style)
    scale_ax.axhline(1.0, color="grey", ls=":", lw=1)
    scale_ax.set(xlabel="true mass (GeV)", ylabel="median of m_pred / m_true", xlim=(edges[0], edges[-1]))
    resolution_ax.set(
      xlabel="true mass (GeV)",
      ylabel="resolution (q84 − q16)/2 of m_pred / m_true",
      xlim=(edges[0], edges[-1]),
    )
    resolution_ax.set_ylim(bottom=0)
    for ax in (scale_ax, resolution_ax):
      ax.legend(loc="best", fontsize="small")
    background = labels == 0
    if background.any():
      low, high = _mass_range(mass_true[background], mass_pred[background])
      mass_edges = np.linspace(min(low, window[0] - 20), max(high, window[1] + 20), 41)
      # The 0.5 % tails beyond the range are not drawn (clipping them would fake a peak at the edge).
      qcd_ax.hist(
        mass_true[background], bins=mass_edges, histtype="step", lw=1.5, color="black", label="true"
      )
      qcd_ax.hist(
        mass_pred[background], bins=mass_edges, histtype="step", lw=1.5, color="C0", label="predicted"
      )
      fraction_true, fraction_pred = metrics.top_window_fractions(labels, mass_true, mass_pred)
      qcd_ax.set_title(
        f"QCD in {window[0]:g}–{window[1]:g} GeV: true {fraction_true:.1%}, predicted {fraction_pred:.1%}",
        fontsize="small",
      )
      qcd_ax.legend(loc="upper right", fontsize="small")
    else:
      qcd_ax.text(0.5, 0.5, "no QCD jets", transform=qcd_ax.transAxes, ha="center", va="center")
    qcd_ax.axvspan(*window, color="C1", alpha=0.15, lw=0)
    qcd_ax.set(xlabel="QCD jet mass (GeV)", ylabel="jets per bin")
    figure.suptitle(title)
    return _save(figure, path)


# Channel order of the CMS end-to-end images (docs/design.md, Physics conventions).
CHANNEL_NAMES = (
  "track pT",
  "track d0",
  "track dz",
  "ECAL",
  "HCAL",
  "pixel layer 1",
  "pixel layer 2",
  "pixel layer 3",
)
# The log colour scale of a channel spans at most this many decades below its brightest mean pixel, so
# a handful of nearly empty pixels does not wash out the jet core.
MEAN_IMAGE_DECADES = 6


def plot_mean_images(means: np.ndarray, counts, path, *, title: str = "Mean jet image per class") -> str:
  """Grid of mean images: top row top (1), bottom row QCD (0), one column per channel, log colour scale.

  ``means`` is ``(2, H, W, C)`` indexed by class (``metrics.ClassMeanImages.means``), ``counts`` the
  jets per class. Pixels are drawn as stored (row 0 at the top, like ``imshow`` of an image). A
  channel's two panels share one colour scale, so the classes can be compared by eye; pixels whose mean
  is 0 (no jet ever had a deposit there) are left blank.
  """
  means = np.asarray(means, dtype=np.float64)
  if means.ndim != 4 or means.shape[0] != 2:
    raise ValueError(f"means: expected (2, H, W, C), got shape {means.shape}")
  num_channels = means.shape[-1]
  names = (
    CHANNEL_NAMES
    if num_channels == len(CHANNEL_NAMES)
    else tuple(f"channel {c}" for c in range(num_channels))
  )
  with _style():
    scale = max(1.0, float(matplotlib.rcParams["font.size"]) / 12.0)
    figure = matplotlib.figure.Figure(figsize=(2.3 * num_channels * scale, 5.4 * scale), layout="constrained")
    axes = figure.subplots(2, num_channels, squeeze=False)
    for channel in range(num_channels):
      values = means[..., channel]
      positive = values[values > 0]
      norm = None
      if positive.size:
        vmax = float(positive.max())
        norm = matplotlib.colors.LogNorm(
          vmin=max(float(positive.min()), vmax * 10.0**-MEAN_IMAGE_DECADES),
          vmax=vmax if vmax > positive.min() else vmax * 10.0,
        )
      for row, cls in enumerate((1, 0)):
        ax = axes[row, channel]
        if norm is None:
          ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center")
        else:
          image = ax.imshow(
            np.ma.masked_less_equal(values[cls], 0), norm=norm, cmap="viridis", interpolation="nearest"
          )
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
          ax.set_title(f"{channel}: {names[channel]}", fontsize="small")
        if channel == 0:
          ax.set_ylabel(f"{CLASS_NAMES[cls]}\n{int(counts[cls])} jets", fontsize="small")
      if norm is not None:
        figure.colorbar(image, ax=list(axes[:, channel]), location="bottom", shrink=0.9)
    figure.suptitle(title)
    return _save(figure, path)


# --- training curves --------------------------------------------------------------------------------

# (y-axis label, predicate on the metric key); a panel is drawn only if some run logged a matching key.
_PANELS = (
  ("loss", lambda key: key.endswith("loss")),
  ("accuracy", lambda key: key.endswith("/accuracy")),
  ("mass MAE (GeV)", lambda key: key.endswith("mass_mae")),
  # Frozen-feature probes logged during pretraining (probes.OnlineProbe); their mass MAE joins the
  # panel above.
  ("probe accuracy / ROC-AUC", lambda key: key.startswith("probe/") and key.endswith(("accuracy", "auc"))),
)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict], x_key: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(x, value) points of one metric, sorted by x (stable, so a resumed run keeps its order)."""
  points = [(r[x_key], r[key]) for r in records if _is_number(r.get(x_key)) and _is_number(r.get(key))]
  points.sort(key=lambda point: point[0])
  return np.asarray([p[0] for p in points]), np.asarray([p[1] for p in points])


def _line_style(key: str) -> dict:
  if key.startswith("val/"):
    return dict(ls="--", marker="o", ms=3)
  if key.startswith("train/"):
    return dict(ls="-", alpha=0.8)
  if key.startswith("probe/"):  # several probe series share a run's colour: style tells them apart
    return dict(ls="-." if "/linear" in key else ":", marker="s" if key.endswith("auc") else "o", ms=3)
  return dict(ls=":")


def plot_training_curves(
  metrics_jsonl_paths: Mapping[str, str | os.PathLike], path, *, title: str = "Training curves"
) -> str:
  """Loss, accuracy and mass-MAE curves vs epoch for one or more runs' JSON-lines metrics files.

  Every key ending in ``loss`` goes in the loss panel (train solid, val dashed); accuracy and mass-MAE
  panels appear only when some run logged them, and so does a panel for the frozen-feature probes of
  a pretraining run (``probe/*``). Missing keys in any line are tolerated. The x axis is
  ``epoch``, or ``step`` if no line of any run has an epoch.
  """
  runs = {name: metrics_log.read_metrics_jsonl(jsonl) for name, jsonl in metrics_jsonl_paths.items()}
  has_epoch = any(_is_number(r.get("epoch")) for records in runs.values() for r in records)
  x_key = "epoch" if has_epoch else "step"
  keys = sorted({k for records in runs.values() for r in records for k, v in r.items() if _is_number(v)})
  panels = [(label, [k for k in keys if matches(k)]) for label, matches in _PANELS]
  panels = [(label, panel_keys) for label, panel_keys in panels if panel_keys]
  with _style():
    figure, axes = _new_figure(ncols=max(len(panels), 1), width=5.5, height=4.5)
    if not panels:
      axes[0].text(
        0.5,
        0.5,
        "no loss, accuracy or mass-MAE metrics found",
        ha="center",
        va="center",
        transform=axes[0].transAxes,
      )
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, (label, panel_keys) in zip(axes, panels):
      for run_index, (name, records) in enumerate(runs.items()):
        for key in panel_keys:
          x, y = _series(records, x_key, key)
          if x.size:
            legend = f"{name}: {key}" if len(runs) > 1 else key
            ax.plot(x, y, color=colours[run_index % len(colours)], label=legend, **_line_style(key))
      ax.set(xlabel=x_key, ylabel=label)
      ax.legend(fontsize="x-small")
    figure.suptitle(title)
    return _save(figure, path)
