"""Quickstart: the whole study end to end on generated data, small enough for 2 CPU cores (< 10 min).

  python -m l2vit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  # also masked-image pretraining, at equal compute: --config.pretrain=both (or mae)

Writes synthetic CMS-like jets (real schema, 125×125×8) under runs/quickstart/data, pretrains a tiny
L2ViT with SimCLR (and/or masked-image modelling), finetunes it, trains the same model from scratch,
and evaluates them side by side:
runs/quickstart/report/report.md.
"""

import ml_collections

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "pipeline"
  config.model = config_lib.model_config("tiny")
  config.log_every_steps = 10
  config.eval_batch_size = 100
  config.early_stopping_patience = 15

  config.pretrain = "simclr"  # simclr | mae | both: which self-supervised backbones to finetune
  config.quickstart = ml_collections.ConfigDict(dict(
      num_labelled=1000, num_unlabelled=1200, data_seed=0,
      simclr_epochs=3, mae_epochs=6, pretrain_batch_size=64, pretrain_learning_rate=1e-3,
      finetune_epochs=8, finetune_batch_size=32,
      finetune_head_learning_rate=1e-3, finetune_backbone_learning_rate=5e-4,
      scratch_learning_rate=1e-3))

  # Read by the evaluation stage.
  config.checkpoints = ""
  config.split = "test"
  config.bootstrap_samples = 200
  config.physics_baseline = True  # row physics_bdt: boosted trees on jet observables
  config.report_title = "Quickstart (synthetic data): self-supervised pretraining vs scratch L2ViT"
  config.report_notes = ("Tiny model, few epochs, synthetic jets: a smoke test of the whole study, "
                         "not a physics result.")
  return config
