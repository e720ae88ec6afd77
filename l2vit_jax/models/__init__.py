"""L2ViT models in Flax NNX and the pure attention / depthwise-convolution kernels they use."""

from l2vit_jax.models.attention import linear_attention
from l2vit_jax.models.attention import softmax_attention
from l2vit_jax.models.contrastive import ContrastiveModel
from l2vit_jax.models.depthwise import depthwise_conv2d
from l2vit_jax.models.l2vit import L2ViT
from l2vit_jax.models.l2vit import SimCLRProjector
from l2vit_jax.models.l2vit import interpolate_pos_embed
from l2vit_jax.models.l2vit import param_count
from l2vit_jax.models.masked import MaskedImageModel
from l2vit_jax.models.masked import patchify
from l2vit_jax.models.masked import random_token_mask

__all__ = [
  "ContrastiveModel",
  "L2ViT",
  "MaskedImageModel",
  "SimCLRProjector",
  "depthwise_conv2d",
  "interpolate_pos_embed",
  "linear_attention",
  "param_count",
  "patchify",
  "random_token_mask",
  "softmax_attention",
]
