"""Training objectives: SimCLR's NT-Xent, masked-image reconstruction and the dual-head (class + mass)
supervised loss.

Each objective is a plain function ``loss(model, batch) -> (scalar, metrics)`` over a global batch;
under ``jax.jit`` with sharded inputs the similarity matrix and BatchNorm statistics span the whole
global batch, so results do not depend on how many devices share it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from l2vit_jax import models


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """Normalised-temperature cross entropy (SimCLR) for L2-normalised embeddings of two views.

  Each of the 2B embeddings must pick its partner view among the other 2B-1.
  """
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  n = z1.shape[0]
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  partners = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, partners).mean()


@dataclasses.dataclass(frozen=True)
class SimCLRLoss:
  temperature: float

  def __call__(self, model: models.ContrastiveModel, batch: dict) -> tuple[jax.Array, dict]:
    # One forward over both views: BatchNorm sees all 2B images, as one would with a single GPU batch.
    n = batch["view1"].shape[0]
    z = model(jnp.concatenate([batch["view1"], batch["view2"]], axis=0))
    loss = nt_xent(z[:n], z[n:], self.temperature)
    return loss, {"contrastive_loss": loss}


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class DualHeadLoss:
  """Cross entropy on the class plus SmoothL1 (β = 1) on the standardised mass, as the original."""

  mass_mean: float
  mass_std: float
  classification_weight: float = 1.0
  regression_weight: float = 1.0

  def predictions(self, model: models.L2ViT, batch: dict) -> dict:
    logits, mass_z = model(batch["image"])
    return {"logits": logits.astype(jnp.float32), "mass_z": mass_z[:, 0].astype(jnp.float32)}

  def __call__(self, model: models.L2ViT, batch: dict) -> tuple[jax.Array, dict]:
    out = self.predictions(model, batch)
    mask = batch.get("mask", jnp.ones_like(batch["mass"], dtype=jnp.float32))
    target_z = (batch["mass"] - self.mass_mean) / self.mass_std
    classification = masked_mean(
      optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]), mask
    )
    regression = masked_mean(optax.huber_loss(out["mass_z"], target_z, delta=1.0), mask)
    loss = self.classification_weight * classification + self.regression_weight * regression
    correct = (jnp.argmax(out["logits"], axis=-1) == batch["label"]).astype(jnp.float32)
    mass_gev = out["mass_z"] * self.mass_std + self.mass_mean
    return loss, {
      "classification_loss": classification,
      "regression_loss": regression,
      "accuracy": masked_mean(correct, mask),
      "mass_mae": masked_mean(jnp.abs(mass_gev - batch["mass"]), mask),
    }


@dataclasses.dataclass(frozen=True)
class MaskedReconstructionLoss:
  """Reconstruction pretraining that is not dominated by predicting empty pixels.

  mode 'mask': a ``mask_ratio`` of patch tokens is replaced by the mask token and only those patches
  are scored; mode 'denoise': multiplicative noise on non-zero pixels, every patch scored against the
  clean image. Targets are ``log1p(pixels)`` by default (deposits span 4 decades) and non-zero target
  pixels weigh ``nonzero_weight`` times more than zeros, so ~99 % empty space cannot dominate.
  """

  mode: str = "mask"
  mask_ratio: float = 0.6
  nonzero_weight: float = 10.0
  noise_relative_std: float = 0.2
  target_transform: str = "log1p"

  def __post_init__(self):
    if self.mode not in ("mask", "denoise"):
      raise ValueError(f"mae.mode must be 'mask' or 'denoise', got {self.mode!r}")
    if self.target_transform not in ("log1p", "none"):
      raise ValueError(f"mae.target_transform must be 'log1p' or 'none', got {self.target_transform!r}")

  def __call__(self, model: models.MaskedImageModel, batch: dict) -> tuple[jax.Array, dict]:
    images = batch["image"]
    patch = model.patch_size
    num_tokens = (images.shape[1] // patch) * (images.shape[2] // patch)
    key = model.masking.dropout()
    if self.mode == "mask":
      token_mask = models.random_token_mask(key, images.shape[0], num_tokens, self.mask_ratio)
      scored, inputs = token_mask, images
    else:
      noise = 1.0 + self.noise_relative_std * jax.random.normal(key, images.shape, images.dtype)
      inputs = jnp.where(images > 0, jnp.maximum(images * noise, 0.0), images)
      token_mask, scored = None, jnp.ones((images.shape[0], num_tokens), bool)
    target = models.patchify(images.astype(jnp.float32), patch)
    if self.target_transform == "log1p":
      target = jnp.log1p(target)
    prediction = model(inputs, token_mask)
    example_weight = batch.get("mask", jnp.ones(images.shape[:1], jnp.float32))
    occupied = target > 0
    weight = jnp.where(occupied, self.nonzero_weight, 1.0) * scored[..., None] * example_weight[:, None, None]
    squared_error = jnp.square(prediction - target)
    loss = jnp.sum(weight * squared_error) / jnp.maximum(jnp.sum(weight), 1e-9)
    scored_pixels = weight > 0
    occupied_error = masked_mean(squared_error, scored_pixels & occupied)
    empty_error = masked_mean(squared_error, scored_pixels & ~occupied)
    return loss, {
      "reconstruction_loss": loss,
      "occupied_pixel_mse": occupied_error,
      "empty_pixel_mse": empty_error,
    }
