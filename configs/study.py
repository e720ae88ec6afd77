"""Label-efficiency study: scratch vs SimCLR/MAE finetuning vs frozen-feature probes vs the physics BDT.

  python -m l2vit_jax.main --config=configs/study.py --workdir=runs/study
  # the quick variant: tiny model, 25×25 images, 3 seeds × 2 label counts, on files generated under
  # WORKDIR/data unless --config.data.labelled_path/unlabelled_path name your own
  python -m l2vit_jax.main --config=configs/study.py:quick --workdir=runs/study_quick
  # full scale on generated Pythia 8 jets (125×125, default model, 10,000 labelled + 60,000 unlabelled):
  # generation ≈ 50 min on 2 CPU cores here (24 jets/s); training needs an accelerator: ≈ 56 million
  # image-steps of ≈ 19.5 GFLOP in bf16, ≥ ½ h of v5e-4 at its compute peak (1–2 h at 25–50 % MFU),
  # ≥ 2 h of one H100 at its memory bound (docs/study.md) — estimates, not measured runs
  python -m l2vit_jax.main --config=configs/study.py:pythia --workdir=runs/study_pythia \
      --config.model.dtype=bfloat16

For each seed, SimCLR and MAE pretrain once; for each label count (nested stratified subsets of the
train split; validation and test fixed) each arm trains in WORKDIR/seed{s}/n{count}/{arm}/. Rerunning
skips finished cells. Outputs: WORKDIR/study.json, study.png, report.md (docs/study.md).
"""

import ml_collections

from l2vit_jax import config_lib


def get_config(variant: str = ""):
  if variant not in ("", "quick", "pythia"):
    raise ValueError(
      f"configs/study.py:{variant}: unknown variant; use configs/study.py, "
      "configs/study.py:quick or configs/study.py:pythia"
    )
  config = config_lib.base_config()
  config.task = "study"
  config.eval_batch_size = 128
  config.log_every_steps = 50
  config.tensorboard = False

  config.study = ml_collections.ConfigDict(
    dict(
      variant=variant or "full",
      label_counts=(0.01, 0.05, 0.1, 0.25, 1.0),  # ≤ 1: fractions of the train split; > 1: jets
      num_seeds=3,
      first_seed=0,
      arms="scratch,finetune_simclr,finetune_mae,probe_simclr,probe_mae,physics_bdt",
      # Small subsets get more epochs so every cell takes at least this many optimiser steps.
      min_steps=500,
      bootstrap_samples=100,  # per-cell 68 % intervals (study.json); the error bars are the spread over seeds
    )
  )
  # Files generated under WORKDIR/data when data.labelled_path / data.unlabelled_path are empty.
  config.generate = config_lib.generated_data_config(num_labelled=1200, num_unlabelled=2000)

  # Stage recipes; every field is a top-level config field of that stage.
  config.pretrain_simclr = config_lib.recipe("simclr")
  config.pretrain_mae = config_lib.recipe("mae")
  config.finetune = config_lib.recipe("finetune")
  config.scratch = config_lib.recipe("scratch")

  if variant == "pythia":  # the real files' sizes and image format, generated with Pythia 8
    config.data.labelled_path = config.data.unlabelled_path = ""
    config.generate.update(num_labelled=10000, num_unlabelled=60000)
  if variant == "quick":
    # Tuned for the pretrained arms (docs/study.md): 32 pretraining epochs, NT-Xent temperature 0.2 and
    # the backbone finetuned at the heads' rate; with fewer epochs or a lower backbone rate they
    # trailed scratch.
    config.data.labelled_path = config.data.unlabelled_path = ""
    config.model.update(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=25)
    config.eval_batch_size, config.log_every_steps = 120, 20
    config.loss.temperature = 0.2
    config.study.update(label_counts=(0.05, 1.0), num_seeds=3, min_steps=60)
    config.pretrain_simclr.update(batch_size=64, num_epochs=32, warmup_epochs=1, learning_rate=1e-3)
    config.pretrain_mae.update(batch_size=64, num_epochs=32, warmup_epochs=1, learning_rate=1e-3)
    config.finetune.update(
      batch_size=32, num_epochs=6, warmup_epochs=1, learning_rate=1e-3, backbone_learning_rate=1e-3
    )
    config.scratch.update(batch_size=32, num_epochs=6, warmup_epochs=1, learning_rate=1e-3)
  return config
