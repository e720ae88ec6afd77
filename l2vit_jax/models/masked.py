"""Masked-image pretraining model: the L2ViT encoder, a learned mask token and a linear decoder.

Unlike the original's MAE (which dropped masked tokens and therefore had to skip the LCM), masked
patches are replaced by a learned token in place, SimMIM-style: the 25×25 grid stays whole and the
LCM's depthwise convolutions are trained too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from l2vit_jax.models.l2vit import L2ViT


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) → (B, N, p·p·C) in the token order of the patch embedding (row-major grid)."""
  b, h, w, c = images.shape
  gh, gw = h // patch_size, w // patch_size
  patches = images[:, : gh * patch_size, : gw * patch_size].reshape(b, gh, patch_size, gw, patch_size, c)
  return patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch_size * patch_size * c)


def random_token_mask(key: jax.Array, batch: int, num_tokens: int, ratio: float) -> jax.Array:
  """Boolean (batch, num_tokens) masks with exactly round(ratio · num_tokens) tokens set per row."""
  num_masked = int(round(ratio * num_tokens))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, num_tokens)), axis=-1), axis=-1)
  return ranks < num_masked


class MaskedImageModel(nnx.Module):
  """``model(images, token_mask)`` → reconstructed patches (B, N, p·p·C), for every token.

  ``masking`` is a 'dropout'-tagged RNG stream, so the train loop's per-step reseeding also makes
  the masks a function of (seed, step) and resumed runs draw the same masks.
  """

  def __init__(self, encoder: L2ViT, *, rngs: nnx.Rngs):
    self.encoder = encoder
    self.patch_size = encoder.patch_embed.proj.kernel_size[0]
    in_channels = encoder.patch_embed.proj.in_features
    dim = encoder.pos_embed.shape[-1]
    self.mask_token = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (dim,)))
    self.decoder = nnx.Linear(dim, self.patch_size**2 * in_channels, rngs=rngs)
    self.masking = nnx.Rngs(dropout=rngs.dropout())

  def __call__(self, images: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    tokens = self.encoder.tokens(images, token_mask=token_mask, mask_token=self.mask_token[...])
    return self.decoder(tokens).astype(jnp.float32)
