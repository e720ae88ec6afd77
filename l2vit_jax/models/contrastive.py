"""The SimCLR model: the L2ViT backbone with a projection head."""

from __future__ import annotations

import jax
from flax import nnx

from l2vit_jax.models.l2vit import L2ViT, SimCLRProjector


class ContrastiveModel(nnx.Module):
  """The L2ViT backbone with a SimCLR projector; its ``encoder`` is what finetuning inherits."""

  def __init__(self, encoder: L2ViT, projector: SimCLRProjector):
    self.encoder = encoder
    self.projector = projector

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.projector(self.encoder.features(images))
