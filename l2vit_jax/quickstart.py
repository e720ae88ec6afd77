"""The quickstart pipeline: synthetic data → pretraining (SimCLR and/or MAE) → finetune → scratch → report.

Every stage runs in its own sub-directory of the workdir and resumes there, so re-running the same
command continues where it stopped.
"""

from __future__ import annotations

import jax
from absl import logging

from l2vit_jax import evaluate, paths, train
from l2vit_jax.data import hdf5, synthetic


def generate_data(config, workdir: str) -> dict[str, str]:
  """Writes the synthetic labelled and unlabelled files once (process 0), with the real schema."""
  if paths.is_remote(workdir):
    raise hdf5.DataError(f"{workdir}: the quickstart writes its synthetic jet files into the workdir, and "
                         "jet files must be on local disk; use a local --workdir")
  q = config.quickstart
  files = {"labelled": paths.join(workdir, "data", "synthetic_labelled.h5"),
           "unlabelled": paths.join(workdir, "data", "synthetic_unlabelled.h5")}
  if jax.process_index() == 0:
    paths.makedirs(paths.join(workdir, "data"))
    for kind, num, seed in (("labelled", q.num_labelled, q.data_seed),
                            ("unlabelled", q.num_unlabelled, q.data_seed + 1)):
      if not paths.exists(files[kind]):
        logging.info("Generating %d synthetic %s jets → %s", num, kind, files[kind])
        synthetic.write_synthetic_hdf5(files[kind], num, labelled=kind == "labelled", seed=seed,
                                       image_size=config.model.img_size)
  return files


def _stage(config, data_files: dict[str, str], task: str, **fields):
  stage = config.copy_and_resolve_references()
  with stage.unlocked():
    stage.task = task
    stage.data.labelled_path = data_files["labelled"]
    stage.data.unlabelled_path = data_files["unlabelled"]
    for key, value in fields.items():
      setattr(stage, key, value)
  return stage


PRETRAINING = {"simclr": ("simclr",), "mae": ("mae",), "both": ("simclr", "mae")}


def stage_configs(config, workdir: str, data_files: dict[str, str]) -> dict:
  """Stage name → config: pretraining runs, a finetune of each, scratch, and the evaluation."""
  if config.pretrain not in PRETRAINING:
    raise ValueError(f"config.pretrain must be one of {sorted(PRETRAINING)}, got {config.pretrain!r}")
  q = config.quickstart
  finetune = dict(batch_size=q.finetune_batch_size, num_epochs=q.finetune_epochs, warmup_epochs=1,
                  weight_decay=0.01)
  stages = {}
  for pretraining in PRETRAINING[config.pretrain]:
    # Equal compute: SimCLR encodes two views per image, masked pretraining one, so MAE gets twice
    # the epochs (q.mae_epochs defaults to 2 × q.simclr_epochs).
    stages[pretraining] = _stage(
        config, data_files, pretraining, batch_size=q.pretrain_batch_size, warmup_epochs=1,
        num_epochs=q.simclr_epochs if pretraining == "simclr" else q.mae_epochs,
        learning_rate=q.pretrain_learning_rate, weight_decay=0.05)
    # Frozen-feature probes every epoch show whether the pretraining features improve as it runs.
    stages[pretraining].online_probe.labelled_path = data_files["labelled"]
    stages[f"finetune_{pretraining}"] = _stage(
        config, data_files, "finetune", init_from=paths.join(workdir, pretraining),
        learning_rate=q.finetune_head_learning_rate,
        backbone_learning_rate=q.finetune_backbone_learning_rate, **finetune)
  stages["scratch"] = _stage(config, data_files, "finetune", init_from="",
                             learning_rate=q.scratch_learning_rate, **finetune)
  evaluated = {name.removeprefix("finetune_"): paths.join(workdir, name)
               for name in stages if name.startswith("finetune_") or name == "scratch"}
  stages["evaluate"] = _stage(config, data_files, "evaluate",
                              checkpoints=",".join(f"{k}={v}" for k, v in evaluated.items()))
  return stages


def _unfinished(summary: dict) -> bool:
  """A stage that returned before its last step without stopping early (``stop_after_steps``)."""
  return summary["step"] < summary["total_steps"] and not summary["stopped_early"]


def run_pipeline(config, workdir: str) -> dict:
  data_files = generate_data(config, workdir)
  stages = stage_configs(config, workdir, data_files)
  for name, stage in stages.items():
    if name == "evaluate":
      continue
    logging.info("=== quickstart stage: %s ===", name)
    summary = train.train_and_evaluate(stage, paths.join(workdir, name))
    if _unfinished(summary):  # later stages must not start from (or evaluate) a half-trained model
      logging.info("Quickstart paused in stage %s at step %d of %d (stop_after_steps); rerun the same "
                   "command to continue.", name, summary["step"], summary["total_steps"])
      return {}
  logging.info("=== quickstart stage: evaluate ===")
  results = evaluate.evaluate_checkpoints(stages["evaluate"], paths.join(workdir, "report"))
  if jax.process_index() == 0:
    print(f"\nQuickstart done. Report: {paths.join(workdir, 'report', 'report.md')}")
    for name, metrics in results.items():
      print(f"  {name:>10}: accuracy {metrics['accuracy']:.3f}  ROC-AUC {metrics['roc_auc']:.3f}  "
            f"mass MAE {metrics['mass_mae']:.1f} GeV")
  return results
