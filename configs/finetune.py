"""Dual-head finetuning of a SimCLR-pretrained backbone (docs/design.md, training recipes).

  python -m l2vit_jax.main --config=configs/finetune.py --workdir=runs/finetune \
      --config.init_from=runs/simclr
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "finetune"
  config.init_from = "runs/simclr"
  config_lib.apply_recipe(config, config_lib.recipe("finetune"))
  return config
