"""Label-efficiency study: scratch vs SimCLR/MAE finetuning vs frozen-feature probes vs the physics BDT.

  python -m l2vit_jax.main --config=configs/study.py --workdir=runs/study
  # reduced grid on generated data (≈ 13 min on 2 shared CPU cores):
  python -m l2vit_jax.main --config=configs/study.py --workdir=runs/study --config.study.quick=True

For each seed, SimCLR and MAE pretrain once; for each label count (nested stratified subsets of the
train split; validation and test fixed) each arm trains in WORKDIR/seed{s}/n{count}/{arm}/. Rerunning
skips finished cells. Outputs: WORKDIR/study.json, study.png, report.md.
"""

import ml_collections

from l2vit_jax import config_lib


def _recipe(**fields) -> ml_collections.ConfigDict:
  """Top-level training fields of one stage (batch_size, num_epochs, learning rates, ...)."""
  return ml_collections.ConfigDict(fields)


def get_config():
  config = config_lib.base_config()
  config.task = "study"
  config.eval_batch_size = 128
  config.log_every_steps = 50
  config.tensorboard = False

  config.study = ml_collections.ConfigDict(dict(
      quick=False,  # True: generated data and the reduced grid of quick_settings
      label_counts=(0.01, 0.05, 0.1, 0.25, 1.0),  # ≤ 1: fractions of the train split; > 1: jets
      num_seeds=3, first_seed=0,
      arms="scratch,finetune_simclr,finetune_mae,probe_simclr,probe_mae,physics_bdt",
      # Small subsets get more epochs so every cell takes at least this many optimiser steps.
      min_steps=500,
      bootstrap_samples=100,  # per-cell 68 % intervals (study.json); the error bars are the spread over seeds
      # Generated files (quick only), written under WORKDIR/data.
      synthetic=ml_collections.ConfigDict(dict(num_labelled=1200, num_unlabelled=2000, data_seed=0)),
  ))

  # Stage recipes (DESIGN.md §3); every field is a top-level config field of that stage.
  config.pretrain_simclr = _recipe(batch_size=128, num_epochs=100, warmup_epochs=5, learning_rate=3e-4,
                                   weight_decay=0.05, early_stopping_patience=15)
  config.pretrain_mae = _recipe(batch_size=128, num_epochs=100, warmup_epochs=5, learning_rate=3e-4,
                                weight_decay=0.05, early_stopping_patience=15)
  config.finetune = _recipe(batch_size=64, num_epochs=50, warmup_epochs=3, learning_rate=1e-4,
                            backbone_learning_rate=5e-5, weight_decay=0.01, early_stopping_patience=15)
  config.scratch = _recipe(batch_size=64, num_epochs=50, warmup_epochs=3, learning_rate=3e-4,
                           weight_decay=0.01, early_stopping_patience=15)

  # Applied over the above when study.quick is set: tiny model, small images, 3 seeds × 2 counts.
  # In quick mode override these (--config.quick_settings.study.num_seeds=1), not the fields above.
  # Tuned for the pretrained arms (README, "The label-efficiency study"): 32 pretraining epochs instead
  # of 4/8, NT-Xent temperature 0.2 and the backbone finetuned at the heads' rate; with fewer epochs or
  # a lower backbone rate they trailed scratch.
  config.quick_settings = ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                           img_size=25)),
      eval_batch_size=120, log_every_steps=20,
      loss=ml_collections.ConfigDict(dict(temperature=0.2)),
      study=ml_collections.ConfigDict(dict(label_counts=(0.05, 1.0), num_seeds=3, min_steps=60)),
      pretrain_simclr=_recipe(batch_size=64, num_epochs=32, warmup_epochs=1, learning_rate=1e-3),
      pretrain_mae=_recipe(batch_size=64, num_epochs=32, warmup_epochs=1, learning_rate=1e-3),
      finetune=_recipe(batch_size=32, num_epochs=6, warmup_epochs=1, learning_rate=1e-3,
                       backbone_learning_rate=1e-3),
      scratch=_recipe(batch_size=32, num_epochs=6, warmup_epochs=1, learning_rate=1e-3),
  ))
  return config
