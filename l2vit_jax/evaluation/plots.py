"""Evaluation plots; each function writes one PNG and returns its path.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: they never enter pyplot's
global figure registry, so nothing leaks across many calls in a long training process, no GUI backend
is ever selected (PNG output always goes through Agg) and plotting from a background thread is safe.
The CMS style from ``mplhep`` is used when it is installed, plain matplotlib otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Iterator, Mapping

import matplotlib
import matplotlib.colors
import matplotlib.figure
import matplotlib.style
import numpy as np

from l2vit_jax.runtime import paths
from l2vit_jax.evaluation import metrics

try:  # Optional: only the look of the plots depends on it.
  import mplhep
except ImportError:  # pragma: no cover - depends on the environment
  mplhep = None

CLASS_NAMES = ("QCD (0)", "top (1)")
DPI = 120
# Residual bins with fewer examples than this are not drawn: their 16th/84th percentiles are noise.
MIN_PER_BIN = 5
# Mathtext (no LaTeX install needed) so the subscripts render instead of showing underscores.
EPS_S = r"$\varepsilon_\mathrm{S}$"
EPS_B = r"$\varepsilon_\mathrm{B}$"


# --- shared helpers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _style() -> Iterator[None]:
  """CMS style while a figure is built and saved (rcParams are read at both times)."""
  if mplhep is None:
    yield
  else:
    with matplotlib.style.context(mplhep.style.CMS):
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
    ax.set_title(f"{title}\naccuracy {np.trace(counts) / counts.sum():.4f} (N = {counts.sum()})",
                 fontsize="medium")
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
    roc_ax.set(xlabel=f"false positive rate {EPS_B}", ylabel=f"true positive rate {EPS_S}", xlim=(0, 1),
               ylim=(0, 1.01))
    efficiency = np.linspace(0.01, 1.0, 100)
    rejection_ax.plot(efficiency, 1.0 / efficiency, ls=":", color="grey", label="random")
    for working_point in metrics.REJECTION_EFFICIENCIES:
      rejection_ax.axvline(working_point, color="lightgrey", lw=0.8, zorder=0)
    rejection_ax.set_yscale("log")
    rejection_ax.set(xlabel=f"signal efficiency {EPS_S}", ylabel=f"background rejection 1/{EPS_B}",
                     xlim=(0, 1))
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
    ax.set_title(f"{title}\nMAE {errors['mae']:.2f} GeV, resolution {errors['resolution']:.1%}",
                 fontsize="medium")
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
      ax.text(0.5, 0.5, f"fewer than {MIN_PER_BIN} jets in every mass bin", transform=ax.transAxes,
              ha="center", va="center")
    ax.set(xlabel="true mass (GeV)", ylabel="predicted − true mass (GeV)", title=title)
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


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads the training loop's JSON-lines metrics; blank or unparsable lines are skipped.

  A run killed mid-write can leave a truncated last line, which should not stop the plots.
  """
  records, skipped = [], 0
  for line in paths.read_text(path).splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      skipped += 1
      continue
    if isinstance(record, dict):
      records.append(record)
    else:
      skipped += 1
  if skipped:
    logging.warning("%s: skipped %d line(s) that are not JSON objects", path, skipped)
  return records


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


def plot_training_curves(metrics_jsonl_paths: Mapping[str, str | os.PathLike], path, *,
                         title: str = "Training curves") -> str:
  """Loss, accuracy and mass-MAE curves vs epoch for one or more runs' JSON-lines metrics files.

  Every key ending in ``loss`` goes in the loss panel (train solid, val dashed); accuracy and mass-MAE
  panels appear only when some run logged them, and so does a panel for the frozen-feature probes of
  a pretraining run (``probe/*``). Missing keys in any line are tolerated. The x axis is
  ``epoch``, or ``step`` if no line of any run has an epoch.
  """
  runs = {name: read_metrics_jsonl(jsonl) for name, jsonl in metrics_jsonl_paths.items()}
  has_epoch = any(_is_number(r.get("epoch")) for records in runs.values() for r in records)
  x_key = "epoch" if has_epoch else "step"
  keys = sorted({k for records in runs.values() for r in records for k, v in r.items() if _is_number(v)})
  panels = [(label, [k for k in keys if matches(k)]) for label, matches in _PANELS]
  panels = [(label, panel_keys) for label, panel_keys in panels if panel_keys]
  with _style():
    figure, axes = _new_figure(ncols=max(len(panels), 1), width=5.5, height=4.5)
    if not panels:
      axes[0].text(0.5, 0.5, "no loss, accuracy or mass-MAE metrics found", ha="center", va="center",
                   transform=axes[0].transAxes)
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
