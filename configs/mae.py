"""Masked-image pretraining of the L2ViT backbone, keeping the LCM (the second self-supervised objective).

  python -m l2vit_jax.main --config=configs/mae.py --workdir=runs/mae
  python -m l2vit_jax.main --config=configs/finetune.py --workdir=runs/finetune_mae --config.init_from=runs/mae

60 % of the 25×25 patch tokens are replaced by a learned mask token in place (the grid, and so the LCM,
stays whole); a linear decoder reconstructs log1p(pixels) of the masked patches, with non-zero pixels
weighted 10×. ``--config.mae.mode=denoise`` instead reconstructs clean images from noisy deposits.
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "mae"
  config_lib.apply_recipe(config, config_lib.recipe("mae"))
  config.mae.mode = "mask"
  config.mae.mask_ratio = 0.6
  config.mae.nonzero_weight = 10.0
  return config
