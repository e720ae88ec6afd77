"""SimCLR pretraining of the L2ViT backbone on the unlabelled file (docs/design.md, training recipes).

python -m l2vit_jax.main --config=configs/simclr.py --workdir=runs/simclr
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "simclr"
  config_lib.apply_recipe(config, config_lib.recipe("simclr"))
  config.loss.temperature = 0.5
  config.loss.projection_dim = 128
  return config
