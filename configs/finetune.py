"""Dual-head finetuning of a SimCLR-pretrained backbone (DESIGN.md §3, "finetune (pretrained)").

  python -m l2vit_jax.main --config=configs/finetune.py --workdir=runs/finetune \
      --config.init_from=runs/simclr
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "finetune"
  config.init_from = "runs/simclr"
  config.batch_size = 64
  config.num_epochs = 50
  config.warmup_epochs = 3
  config.learning_rate = 1e-4  # heads
  config.backbone_learning_rate = 5e-5
  config.weight_decay = 0.01
  return config
