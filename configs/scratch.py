"""The same dual-head training from random initialisation: the baseline (docs/design.md, training recipes).

python -m l2vit_jax.main --config=configs/scratch.py --workdir=runs/scratch
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "finetune"
  config.init_from = ""
  config_lib.apply_recipe(config, config_lib.recipe("scratch"))
  return config
