"""The same dual-head training from random initialisation: the baseline (DESIGN.md §3, "scratch").

  python -m l2vit_jax.main --config=configs/scratch.py --workdir=runs/scratch
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "finetune"
  config.init_from = ""
  config.batch_size = 64
  config.num_epochs = 50
  config.warmup_epochs = 3
  config.learning_rate = 3e-4
  config.weight_decay = 0.01
  return config
