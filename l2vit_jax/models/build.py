"""Building models from configs and checkpoint meta: the one place that turns a ``model_config``
(the L2ViT constructor arguments, as stored in every checkpoint) into a model."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from l2vit_jax.models.l2vit import L2ViT

# Top-level parameter names that belong to a task's heads rather than the shared backbone: the
# finetuning optimiser gives them their own learning rate, and the pretrain→finetune bridge leaves them
# fresh.
HEAD_NAMES = ("cls_head", "reg_head", "projector", "decoder", "mask_token")


def model_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1)


def model_kwargs(model_config: dict) -> dict:
  """Constructor arguments from a JSON model config (dtype travels as a string)."""
  kwargs = dict(model_config)
  if kwargs.get("dtype") in (None, "float32", ""):
    kwargs["dtype"] = None
  else:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return kwargs


def build_l2vit(model_config: dict, seed: int = 0) -> L2ViT:
  """A freshly initialised L2ViT of ``model_config`` (a dict or ConfigDict), parameters from ``seed``."""
  if hasattr(model_config, "to_dict"):
    model_config = model_config.to_dict()
  return L2ViT(**model_kwargs(model_config), rngs=model_rngs(seed))
