"""Physics-aware augmentations of whole batches, as Grain transforms, for host or device application.

Rows are η and columns φ (docs/design.md, Data). φ is periodic, so cyclic rolls along columns are symmetries;
flips in η and φ are too. Never rotate by 90° (it swaps η and φ), crop, blur or colour-jitter.

Augmentation is split in two so that it can run on the accelerator: ``draw_view_params`` draws the
parameters of a batch (flip bits, φ shift, kept channels, a noise seed per image) with vectorised
numpy, seeded by Grain from (``pipeline.augmentation_seed``, batch index), a seed of each process's
own; ``apply_dense`` applies them to dense host images, and ``device_augment.densify_view`` applies
the same parameters to the sparse form of the same batch inside the jitted step, bit-identically.

Noise factors are not drawn on the host (≈ 13 µs per image and view for 1,560 normals, over the
host budget of the device path): the factor of a non-zero pixel is looked up in a table of Gaussian
quantiles at an index hashed, with integer operations only, from the image's noise seed and the
pixel's rank in the canonical non-zero order (row-major over η, φ, channel: the ``.sparse`` order).
numpy and XLA then agree on every bit, and the device makes the factors itself.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import grain
import numpy as np

# The image-like fields each augmentation produces from a batch's ``image``.
VIEWS = {"none": ("image",), "physics": ("image",), "simclr": ("view1", "view2")}
NOISE_TABLE_BITS = 16


@functools.lru_cache(maxsize=8)
def noise_table(relative_std: float) -> np.ndarray:
  """Float32 factors 1 + std·z for z at the 2^16 quantiles (k + 1/2) / 2^16 of N(0, 1).

  A table lookup is a Gaussian to 1/65,536 in probability (|z| ≤ 4.2): adjacent factors near 1 differ
  by ≈ 2·10⁻⁶ at std 0.05, close to float32's own resolution there.
  """
  size = 1 << NOISE_TABLE_BITS
  inverse_cdf = statistics.NormalDist().inv_cdf
  quantiles = np.array([inverse_cdf((k + 0.5) / size) for k in range(size)], np.float32)
  table = np.float32(1) + np.float32(relative_std) * quantiles
  table.flags.writeable = False
  return table


def noise_indices(seeds, ranks, xp=np):
  """Table index of each pixel: the murmur3 finaliser of (image seed, pixel rank), both uint32.

  Integer multiplies, xors and shifts only, written once for numpy and ``jax.numpy`` (``xp``), so the
  host and the device compute the same indices.
  """
  x = seeds ^ (ranks.astype(xp.uint32) * xp.uint32(0x9E3779B9))
  x = (x ^ (x >> 16)) * xp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * xp.uint32(0xC2B2AE35)
  return (x ^ (x >> 16)) >> (32 - NOISE_TABLE_BITS)


def jitter(values, factors, xp=np):
  """Multiplicative noise on positive pixels, clipped at 0; anything else (0, -0.0) is left alone.

  For numpy and ``jax.numpy`` (``xp``) alike. ``where`` rather than ``maximum``: a -0.0 product must
  become +0.0 on every backend.
  """
  product = values * factors
  return xp.where(values > 0, xp.where(product > 0, product, xp.float32(0)), values)


def draw_view_params(rng: np.random.Generator, batch: int, image_shape, *,
                     channel_dropout_probability: float = 0.0, max_dropped: int = 2,
                     noise_relative_std: float = 0.0) -> dict[str, np.ndarray]:
  """One view's augmentation of a batch of ``batch`` images of ``image_shape`` (H, W, C).

  φ-flip and η-flip with probability 1/2 each, then a cyclic roll along φ by a uniform shift; with
  ``channel_dropout_probability``, 1..max_dropped distinct channels zeroed (a sub-detector missing);
  with ``noise_relative_std``, a factor N(1, std) per non-zero pixel (empty space stays exactly empty),
  from ``noise_table`` at ``noise_indices(noise_seed, rank)``.

  Returns ``flip_phi``, ``flip_eta`` (B,) bool, ``shift`` (B,) int32, ``keep_channels`` (B, C) bool and,
  with noise, ``noise_seed`` (B,) uint32.
  """
  _, width, channels = image_shape
  params = {"flip_phi": rng.random(batch) < 0.5, "flip_eta": rng.random(batch) < 0.5,
            "shift": rng.integers(width, size=batch).astype(np.int32),
            "keep_channels": np.ones((batch, channels), bool)}
  if channel_dropout_probability > 0:
    drops = rng.random(batch) < channel_dropout_probability
    num_dropped = rng.integers(1, max_dropped + 1, size=batch)
    # A uniformly random order of the channels per image; the first num_dropped of it are dropped.
    rank = np.argsort(np.argsort(rng.random((batch, channels)), axis=1), axis=1)
    params["keep_channels"] = ~(drops[:, None] & (rank < num_dropped[:, None]))
  if noise_relative_std > 0:
    params["noise_seed"] = rng.integers(1 << 32, size=batch, dtype=np.uint32)
  return params


def apply_dense(images: np.ndarray, params: dict[str, np.ndarray], noise_relative_std: float = 0.0
                ) -> np.ndarray:
  """``draw_view_params``'s augmentation applied to dense (B, H, W, C) float32 images."""
  batch, height, width, channels = images.shape
  images = np.array(images, dtype=np.float32).reshape(batch, -1)
  if "noise_seed" in params:
    rows, positions = np.nonzero(images.view(np.uint32))  # canonical order, image after image
    counts = np.bincount(rows, minlength=batch)
    ranks = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    factors = noise_table(noise_relative_std)[noise_indices(params["noise_seed"][rows], ranks)]
    images[rows, positions] = jitter(images[rows, positions], factors)
  images = images.reshape(batch, height, width, channels)
  out = np.empty_like(images)
  for b, shift in enumerate(params["shift"]):  # strided copies, near memcpy speed
    image = images[b, ::-1] if params["flip_eta"][b] else images[b]
    image = image[:, ::-1] if params["flip_phi"][b] else image
    out[b, :, shift:], out[b, :, :shift] = image[:, :width - shift], image[:, width - shift:]
    out[b, ..., ~params["keep_channels"][b]] = 0.0
  return out


@dataclasses.dataclass(frozen=True)
class BatchAugment(grain.transforms.RandomMap):
  """Augments a whole batch into ``views``: dense batches (``image``) on the host; sparse batches
  (``positions``/``values``/``count``, from ``sparse.ReadPaddedBatch``) only get the parameters,
  as ``{view}:{name}`` arrays, for ``device_augment`` to apply on the accelerator.

  Both draw the same parameters from the same ``rng`` (Grain seeds it from the batch index), so both
  paths make bit-identical images.
  """
  views: tuple[str, ...] = ("image",)
  channel_dropout_probability: float = 0.0
  max_dropped: int = 2
  noise_relative_std: float = 0.0

  def _params(self, rng: np.random.Generator, batch: int, image_shape) -> dict[str, dict]:
    return {view: draw_view_params(rng, batch, image_shape,
                                   channel_dropout_probability=self.channel_dropout_probability,
                                   max_dropped=self.max_dropped,
                                   noise_relative_std=self.noise_relative_std)
            for view in self.views}

  def param_names(self) -> tuple[str, ...]:
    """The parameters each view gets (``draw_view_params``)."""
    return ("flip_phi", "flip_eta", "shift", "keep_channels") + (
        ("noise_seed",) if self.noise_relative_std > 0 else ())

  def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
    if "positions" in batch:
      params = self._params(rng, len(batch["positions"]), tuple(batch["image_shape"]))
      return {**batch, **{f"{view}:{name}": value for view, view_params in params.items()
                          for name, value in view_params.items()}}
    images = batch["image"]
    rest = {k: v for k, v in batch.items() if k not in self.views and k != "image"}
    params = self._params(rng, len(images), images.shape[1:])
    return {**rest, **{view: apply_dense(images, p, self.noise_relative_std)
                       for view, p in params.items()}}


@dataclasses.dataclass(frozen=True)
class PhysicsAugment(BatchAugment):
  """Supervised-training augmentation: flips and φ-roll (preserves total intensity exactly)."""


@dataclasses.dataclass(frozen=True)
class SimCLRViews(BatchAugment):
  """Two independently augmented views of each image, for contrastive pretraining."""
  views: tuple[str, ...] = ("view1", "view2")
  channel_dropout_probability: float = 0.5
  noise_relative_std: float = 0.05


@dataclasses.dataclass(frozen=True)
class ScalePixels(grain.transforms.Map):
  """Divides every image-like field by the configured global pixel scale (stored with checkpoints)."""
  pixel_scale: float = 1.0

  def map(self, record: dict) -> dict:
    if self.pixel_scale == 1.0:
      return record
    scaled = {k: (v / np.float32(self.pixel_scale)).astype(np.float32)
              for k, v in record.items() if k in ("image", "view1", "view2")}
    return {**record, **scaled}


# The transforms training uses, per augmentation (``pipeline`` and ``device_augment`` agree on them).
TRANSFORMS = {"none": None, "physics": PhysicsAugment(), "simclr": SimCLRViews()}
