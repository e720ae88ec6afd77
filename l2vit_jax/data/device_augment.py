"""Densify and augment sparse batches on the accelerator, inside the jitted train step.

The host ships each batch as padded non-zero ``positions``/``values`` (``sparse.ReadPaddedBatch``, ≈4 %
of the dense bytes) plus the augmentation parameters ``augment.BatchAugment`` drew for it. Flips, the
φ roll and channel dropout only move or zero pixels, so they are applied to the positions, not to
whole images; noise factors come from ``augment.noise_table`` at hashed indices and multiply the
values; one scatter per image then writes the result into zeros. Every operation is exact (integer
arithmetic, a table lookup, one float32 multiply per pixel, comparisons), so the images equal
``augment.apply_dense``'s bit for bit. Pixel scaling stays on the
host (``sparse.ReadPaddedBatch``): XLA compiles ``x / broadcast(s)`` as ``x * (1 / s)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from l2vit_jax.data import augment, sparse
from l2vit_jax import errors

SPARSE_KEYS = ("positions", "values")
SETTINGS = ("auto", "on", "off")


def enabled(setting: str, source) -> bool:
  """Whether ``config.data.device_augmentation`` (auto | on | off) applies to the training ``source``.

  'auto' means on exactly for ``.sparse`` files: HDF5 files that were not converted keep the dense
  host path, which makes the same images.
  """
  setting = str(setting).lower()
  if setting not in SETTINGS:
    raise ValueError(f"config.data.device_augmentation={setting!r}: expected one of {list(SETTINGS)}")
  is_sparse = isinstance(source, sparse.SparseSource)
  if setting == "on" and not is_sparse:
    raise errors.DataError(f"{getattr(source, 'path', source)}: config.data.device_augmentation='on' needs "
                         f"a {sparse.SUFFIX} training file; convert it with scripts/prepare_data.py, or "
                         "use 'auto'")
  return setting != "off" and is_sparse


def batch_keys(task_keys: tuple[str, ...], augmentation: str,
               transform: augment.BatchAugment | None = None) -> tuple[str, ...]:
  """What a sparse batch ships for a task whose step reads ``task_keys``: the sparse pixels, the
  parameters of each view, and the task's other (label-like) keys."""
  views = augment.VIEWS[augmentation]
  transform = transform or augment.TRANSFORMS[augmentation]
  params = transform.param_names() if transform else ()
  others = tuple(k for k in task_keys if k not in views)
  return SPARSE_KEYS + tuple(f"{view}:{name}" for view in views for name in params) + others


def densify_view(positions: jax.Array, values: jax.Array, params: dict[str, jax.Array],
                 image_shape: tuple[int, int, int], noise_relative_std: float = 0.0) -> jax.Array:
  """(B, K) padded positions and values plus one view's parameters → (B, H, W, C) float32 images.

  Missing parameters mean "not applied" (no noise, all channels kept, no flips or roll).
  """
  height, width, channels = image_shape
  size = height * width * channels
  valid = positions < size  # padding sits at position H·W·C
  if "noise_seed" in params:  # entries are in canonical order: the rank is the column
    ranks = jnp.arange(positions.shape[1], dtype=jnp.uint32)[None, :]
    indices = augment.noise_indices(params["noise_seed"][:, None], ranks, xp=jnp)
    values = augment.jitter(values, jnp.asarray(augment.noise_table(noise_relative_std))[indices], xp=jnp)
  channel = positions % channels
  if "keep_channels" in params:
    values = jnp.where(jnp.take_along_axis(params["keep_channels"], channel, axis=1), values, 0.0)
  eta, phi = positions // (width * channels), positions // channels % width
  if "shift" in params:
    phi = jnp.where(params["flip_phi"][:, None], width - 1 - phi, phi)
    eta = jnp.where(params["flip_eta"][:, None], height - 1 - eta, eta)
    phi = (phi + params["shift"][:, None]) % width
  targets = jnp.where(valid, (eta * width + phi) * channels + channel, size)
  # vmap keeps the batch axis a batch dimension of the scatter, which XLA partitions along 'data'.
  scatter = lambda target, value: jnp.zeros(size, jnp.float32).at[target].set(value, mode="drop")
  return jax.vmap(scatter)(targets, values).reshape(-1, height, width, channels)


def prepare_batch(augmentation: str, image_shape: tuple[int, int, int],
                  transform: augment.BatchAugment | None = None) -> Callable[[dict], dict]:
  """The batch-preparation hook of ``training.steps.make_train_step``: a sparse batch → the dense batch the
  loss reads (``image``, or ``view1``/``view2``; other keys unchanged). ``transform`` is the one the
  pipeline drew the parameters with (default: ``augment.TRANSFORMS[augmentation]``)."""
  views = augment.VIEWS[augmentation]
  transform = transform or augment.TRANSFORMS[augmentation]
  noise_relative_std = transform.noise_relative_std if transform else 0.0
  image_shape = tuple(int(n) for n in image_shape)

  def prepare(batch: dict) -> dict:
    dense = {k: v for k, v in batch.items() if k not in SPARSE_KEYS and ":" not in k}
    for view in views:
      params = {key.split(":", 1)[1]: value for key, value in batch.items() if key.startswith(view + ":")}
      dense[view] = densify_view(batch["positions"], batch["values"], params, image_shape,
                                 noise_relative_std)
    return dense

  return prepare
