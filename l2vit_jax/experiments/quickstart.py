"""The quickstart: generated data → pretraining (SimCLR and/or MAE) → finetune → scratch → report.

Every stage runs in its own sub-directory of the workdir and resumes there (``experiments.stages``),
so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import jax
from absl import logging

from l2vit_jax import errors
from l2vit_jax.evaluation import evaluate
from l2vit_jax.experiments import stages
from l2vit_jax.runtime import paths

PRETRAINING = {"simclr": ("simclr",), "mae": ("mae",), "both": ("simclr", "mae")}


def stage_configs(config, workdir: str, files: dict[str, str]) -> dict:
  """Stage name → config: pretraining runs, a finetune of each, scratch, and the evaluation."""
  if config.pretrain not in PRETRAINING:
    raise errors.ConfigError(f"config.pretrain={config.pretrain!r}: expected one of {sorted(PRETRAINING)}")
  configs = {}
  for method in PRETRAINING[config.pretrain]:
    configs[method] = stages.stage_config(config, method, files, config[f"pretrain_{method}"], init_from="")
    # Frozen-feature probes every epoch show whether the pretraining features improve as it runs.
    configs[method].online_probe.labelled_path = files["labelled"]
    configs[f"finetune_{method}"] = stages.stage_config(
      config, "finetune", files, config.finetune, init_from=paths.join(workdir, method)
    )
  configs["scratch"] = stages.stage_config(config, "finetune", files, config.scratch, init_from="")
  evaluated = {
    name.removeprefix("finetune_"): paths.join(workdir, name)
    for name in configs
    if name.startswith("finetune_") or name == "scratch"
  }
  configs["evaluate"] = stages.stage_config(
    config, "evaluate", files, checkpoints=",".join(f"{k}={v}" for k, v in evaluated.items())
  )
  return configs


def run_quickstart(config, workdir: str) -> dict:
  files = stages.data_files(config, workdir)
  configs = stage_configs(config, workdir, files)
  for name, stage in configs.items():
    if name == "evaluate":
      continue
    logging.info("=== quickstart stage: %s ===", name)
    summary = stages.train_stage(stage, paths.join(workdir, name))
    if not stages.finished(summary):
      logging.info(
        "Quickstart paused in stage %s at step %d of %d (stop_after_steps); rerun the same "
        "command to continue.",
        name,
        summary["step"],
        summary["total_steps"],
      )
      return {}
  logging.info("=== quickstart stage: evaluate ===")
  results = evaluate.evaluate_checkpoints(configs["evaluate"], paths.join(workdir, "report"))
  if jax.process_index() == 0:
    print(f"\nQuickstart done. Report: {paths.join(workdir, 'report', 'report.md')}")
    for name, metrics in results.items():
      print(
        f"  {name:>10}: accuracy {metrics['accuracy']:.3f}  ROC-AUC {metrics['roc_auc']:.3f}  "
        f"mass MAE {metrics['mass_mae']:.1f} GeV"
      )
  return results
