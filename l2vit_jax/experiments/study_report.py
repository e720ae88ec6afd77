"""The label-efficiency study's outputs: mean ± std over seeds, the plot, the report and the verdicts."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import matplotlib.ticker
import numpy as np

from l2vit_jax.runtime import paths
from l2vit_jax.evaluation import plots

# metric → (label, higher is better, digits)
METRICS = {
  "accuracy": ("accuracy", True, 3),
  "roc_auc": ("ROC-AUC", True, 3),
  "mass_mae": ("mass MAE (GeV)", False, 1),
}
PRETRAINED_ARMS = ("finetune_simclr", "finetune_mae", "probe_simclr", "probe_mae")
NETWORK_ARMS = ("scratch", "finetune_simclr", "finetune_mae", "probe_simclr", "probe_mae")
BASELINE_ARM = "physics_bdt"


def _mean_std(values: Sequence[float]) -> dict:
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std}


def summarise(results: Iterable[Mapping], *, arms: Sequence[str], counts: Sequence[int]) -> dict:
  """Cells (with metrics) → {'cells', 'summary': arm → count → metric → mean/std/values/seeds, 'verdicts'}.

  The standard deviation is over seeds (ddof=1), so it holds the spread of initialisation, data order
  and which jets were labelled.
  """
  cells = sorted(
    (dict(r) for r in results if r.get("metrics")),
    key=lambda r: (arms.index(r["arm"]) if r["arm"] in arms else 99, r["count"], r["seed"]),
  )
  summary = {}
  for arm in arms:
    for count in counts:
      chosen = [c for c in cells if c["arm"] == arm and c["count"] == count]
      if not chosen:
        continue
      entry = {"seeds": [c["seed"] for c in chosen]}
      for metric in METRICS:
        values = [c["metrics"][metric] for c in chosen]
        entry[metric] = {**_mean_std(values), "values": values}
      summary.setdefault(arm, {})[str(count)] = entry
  study = {
    "arms": list(arms),
    "counts": [int(c) for c in counts],
    "summary": summary,
    "cells": [{k: c[k] for k in ("arm", "count", "seed", "seconds", "metrics")} for c in cells],
  }
  study["verdicts"] = verdicts(summary, counts)
  return study


def _separation(a: Mapping, b: Mapping, metric: str) -> tuple[float, bool]:
  """(a − b, signed so that > 0 means a is better; whether it exceeds the larger seed spread)."""
  better_high = METRICS[metric][1]
  difference = (a[metric]["mean"] - b[metric]["mean"]) * (1 if better_high else -1)
  return difference, abs(difference) > max(a[metric]["std"], b[metric]["std"])


def _compare(summary: Mapping, arm: str, other: str, count: int) -> str | None:
  a, b = summary.get(arm, {}).get(str(count)), summary.get(other, {}).get(str(count))
  if not a or not b:
    return None
  parts = []
  for metric, (label, _, digits) in METRICS.items():
    difference, beyond = _separation(a, b, metric)
    raw = a[metric]["mean"] - b[metric]["mean"]
    spread = max(a[metric]["std"], b[metric]["std"])
    word = ("better" if difference > 0 else "worse") if beyond else "within the seed spread"
    parts.append(f"{label} {raw:+.{digits}f} (spread ±{spread:.{digits}f}: {word})")
  return f"n={count}: {arm} − {other}: " + "; ".join(parts)


def verdicts(summary: Mapping, counts: Sequence[int]) -> list[str]:
  """Plain sentences from the numbers: pretrained arms vs scratch at the smallest and largest counts,
  and the best network vs the physics baseline at the largest count.

  "Better" means the difference of the means exceeds the larger of the two standard deviations over
  seeds (the error bars of the plot); anything less is reported as within the seed spread.
  """
  lines = []
  for count in sorted({min(counts), max(counts)}):
    for arm in PRETRAINED_ARMS:
      line = _compare(summary, arm, "scratch", count)
      if line:
        lines.append(line)
  largest = str(max(counts))
  networks = [arm for arm in NETWORK_ARMS if largest in summary.get(arm, {})]
  if networks and largest in summary.get(BASELINE_ARM, {}):
    best = max(networks, key=lambda arm: summary[arm][largest]["roc_auc"]["mean"])
    lines.append(
      "best network by ROC-AUC vs the physics baseline, " + _compare(summary, best, BASELINE_ARM, max(counts))
    )
  return lines


# --- outputs ----------------------------------------------------------------------------------------


def plot_study(study: Mapping, path: str) -> str:
  """Accuracy, ROC-AUC and mass MAE against the number of labelled jets (log x), mean ± std per arm."""
  with plots._style():  # pylint: disable=protected-access
    figure, axes = plots._new_figure(ncols=len(METRICS), width=5.0, height=4.2)  # pylint: disable=protected-access
    arms = list(study["summary"])
    for axis, (metric, (label, _, _)) in zip(axes, METRICS.items()):
      for position, arm in enumerate(arms):
        by_count = study["summary"][arm]
        counts = sorted(int(c) for c in by_count)
        mean = [by_count[str(c)][metric]["mean"] for c in counts]
        std = [by_count[str(c)][metric]["std"] for c in counts]
        # Arms side by side around each count (a few % apart on the log axis), so error bars don't overlap.
        dodge = 1.04 ** (position - (len(arms) - 1) / 2)
        style = dict(linestyle="--", marker="s") if arm == BASELINE_ARM else dict(marker="o")
        axis.errorbar([c * dodge for c in counts], mean, yerr=std, capsize=3, label=arm, **style)
      axis.set_xscale("log")
      axis.set_xticks(study["counts"], [str(c) for c in study["counts"]])
      axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      axis.set_xlabel("labelled jets")
      axis.set_ylabel(label)
      axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    title = "Label efficiency" + _data_label(study.get("data", {}), " ({})")
    figure.suptitle(f"{title}: mean ± std over {len(study.get('data', {}).get('seeds', [])) or '?'} seeds")
    return plots._save(figure, path)  # pylint: disable=protected-access


def _data_label(data: Mapping, template: str) -> str:
  """What the jets were, for titles: generated with Pythia 8, the toy generator, or "" (a user's file)."""
  if data.get("synthetic"):
    return template.format("synthetic toy jets, not a physics result")
  if data.get("generator") == "pythia":
    return template.format("jets generated with Pythia 8 and FastJet in a CMS-like detector model")
  return ""


def markdown_tables(study: Mapping) -> str:
  """One table per metric: arm × label count, mean ± std over seeds."""
  counts = study["counts"]
  blocks = []
  for metric, (label, better_high, digits) in METRICS.items():
    lines = [
      f"**{label}** ({'higher' if better_high else 'lower'} is better)",
      "",
      "| arm | " + " | ".join(f"n={c}" for c in counts) + " |",
      "|---|" + "---|" * len(counts),
    ]
    for arm in study["arms"]:
      by_count = study["summary"].get(arm, {})
      cells = [
        f"{by_count[str(c)][metric]['mean']:.{digits}f} ± {by_count[str(c)][metric]['std']:.{digits}f}"
        if str(c) in by_count
        else "—"
        for c in counts
      ]
      lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def write_report(study: Mapping, path: str) -> str:
  data = study.get("data", {})
  kind = _data_label(data, "{}") or "the labelled file"
  lines = [
    "# Label-efficiency study",
    "",
    f"Command: `{study.get('command', '')}`",
    "",
    f"Data: {kind} `{data.get('labelled')}` ({data.get('image_size')}×{data.get('image_size')} images); "
    f"fixed splits train {data.get('train')} / val {data.get('val')} / test {data.get('test')}; "
    f"labelled subsets: nested stratified prefixes of the train split, drawn per seed; "
    f"seeds {data.get('seeds')}. Pretraining used `{data.get('unlabelled')}`.",
    "",
    "Every number is the mean ± standard deviation over seeds on the same test split.",
    "",
    "![study](study.png)",
    "",
    markdown_tables(study),
    "",
    "## Verdict",
    "",
    "A difference counts only when it exceeds the larger standard deviation over seeds.",
    "",
    *([f"- {line}" for line in study.get("verdicts", [])] or ["- (not enough arms to compare)"]),
    "",
  ]
  paths.write_text(path, "\n".join(lines))
  return path


def write_outputs(workdir: str, study: Mapping) -> dict[str, str]:
  """study.json, study.png and report.md in ``workdir``."""
  outputs = {name: paths.join(workdir, name) for name in ("study.json", "study.png", "report.md")}
  paths.write_json(outputs["study.json"], study)
  plot_study(study, outputs["study.png"])
  write_report(study, outputs["report.md"])
  return outputs
