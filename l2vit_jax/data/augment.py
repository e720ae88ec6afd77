"""Physics-aware augmentations as Grain transforms over records with an ``image`` (H, W, C) array.

Rows are η and columns φ (DESIGN.md §2). φ is periodic, so cyclic rolls along columns are symmetries;
flips in η and φ are too. Never rotate by 90° (it swaps η and φ), crop, blur or colour-jitter.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np


def flip_and_roll(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """φ-flip and η-flip with probability 1/2 each, then a cyclic roll along φ by a uniform shift."""
  if rng.random() < 0.5:
    image = image[:, ::-1]
  if rng.random() < 0.5:
    image = image[::-1]
  return np.roll(image, int(rng.integers(image.shape[1])), axis=1)


def drop_channels(image: np.ndarray, rng: np.random.Generator, max_dropped: int = 2) -> np.ndarray:
  """Zeroes 1..max_dropped randomly chosen channels (one sub-detector missing)."""
  num_dropped = int(rng.integers(1, max_dropped + 1))
  dropped = rng.choice(image.shape[-1], size=num_dropped, replace=False)
  image = image.copy()
  image[..., dropped] = 0.0
  return image


def jitter_deposits(image: np.ndarray, rng: np.random.Generator, relative_std: float) -> np.ndarray:
  """Multiplicative Gaussian noise on non-zero pixels only: empty space stays exactly empty."""
  noise = rng.normal(1.0, relative_std, size=image.shape).astype(image.dtype)
  return np.where(image > 0, np.maximum(image * noise, 0.0), image)


@dataclasses.dataclass(frozen=True)
class PhysicsAugment(grain.transforms.RandomMap):
  """Supervised-training augmentation: flips and φ-roll (preserves total intensity exactly)."""

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    return {**record, "image": np.ascontiguousarray(flip_and_roll(record["image"], rng))}


@dataclasses.dataclass(frozen=True)
class SimCLRViews(grain.transforms.RandomMap):
  """Two independently augmented views of each image, for contrastive pretraining."""
  channel_dropout_probability: float = 0.5
  noise_relative_std: float = 0.05

  def _view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = flip_and_roll(image, rng)
    if rng.random() < self.channel_dropout_probability:
      image = drop_channels(image, rng)
    if self.noise_relative_std > 0:
      image = jitter_deposits(image, rng, self.noise_relative_std)
    return np.ascontiguousarray(image, dtype=np.float32)

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = record["image"]
    rest = {k: v for k, v in record.items() if k != "image"}
    return {**rest, "view1": self._view(image, rng), "view2": self._view(image, rng)}


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
