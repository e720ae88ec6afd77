"""SimCLR pretraining of the L2ViT backbone on the unlabelled file (DESIGN.md §3).

  python -m l2vit_jax.main --config=configs/simclr.py --workdir=runs/simclr
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "simclr"
  config.batch_size = 128  # images; each contributes two views
  config.num_epochs = 100
  config.warmup_epochs = 5
  config.learning_rate = 3e-4
  config.weight_decay = 0.05
  config.loss.temperature = 0.5
  config.loss.projection_dim = 128
  config.early_stopping_patience = 15
  return config
