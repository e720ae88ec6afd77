"""Grain input pipelines: per-process shards, seeded shuffling, augmentation, batching.

Training pipelines repeat forever and drop the last partial batch; the train loop counts steps and
derives epochs from ``steps_per_epoch``. Evaluation pipelines visit every example exactly once: the
dataset is padded to a whole number of global batches with copies flagged ``mask=0``, so every process
yields the same number of batches (needed for multi-host collectives) and padding never counts.
"""

from __future__ import annotations

import math
from typing import Sequence

import grain
import numpy as np
from absl import flags

from l2vit_jax.data import augment

AUGMENTATIONS = ("none", "physics", "simclr")
# Grain's default read-ahead is 500 elements on 16 threads; our elements are whole batches of 500 kB
# images (64 MB for a SimCLR batch), so the default would buffer tens of GiB. Read a few batches ahead.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


def _process_shard(dataset: grain.MapDataset, process_index: int, process_count: int,
                   equal_lengths: bool) -> grain.MapDataset:
  """Process ``i`` of ``n`` reads records i, i+n, i+2n, ... ; optionally trimmed to equal length."""
  shard = dataset[process_index::process_count]
  if equal_lengths:
    shard = shard[:len(dataset) // process_count]
  return shard


def _maybe_prefetch(dataset: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  if worker_count <= 0:
    return dataset
  # Grain's workers read absl flags; outside an absl app they must be marked parsed first.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  return max(num_examples // global_batch_size, 1)


def make_train_dataset(source: Sequence[dict], *, batch_size: int, seed: int, augmentation: str,
                       pixel_scale: float = 1.0, process_index: int = 0, process_count: int = 1,
                       worker_count: int = 0, simclr_views: augment.SimCLRViews | None = None,
                       ) -> grain.IterDataset:
  """Endless shuffled, augmented batches of ``batch_size`` (per process) from this process's shard.

  Args:
    augmentation: 'none', 'physics' (flips and φ-roll) or 'simclr' (two views per image).
  """
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
  dataset = _process_shard(grain.MapDataset.source(source), process_index, process_count,
                           equal_lengths=True)
  if len(dataset) < batch_size:
    raise ValueError(f"{len(dataset)} training examples per process is fewer than one batch of "
                     f"{batch_size}")
  # Shuffle, then repeat: each epoch gets its own permutation, and random_map seeds come from the
  # global record position, so every epoch sees fresh augmentations too.
  dataset = dataset.shuffle(seed=seed).repeat(None)
  if augmentation == "physics":
    dataset = dataset.random_map(augment.PhysicsAugment(), seed=seed + 1)
  elif augmentation == "simclr":
    dataset = dataset.random_map(simclr_views or augment.SimCLRViews(), seed=seed + 1)
  dataset = dataset.map(augment.ScalePixels(pixel_scale)).batch(batch_size, drop_remainder=True)
  return _maybe_prefetch(dataset.to_iter_dataset(READ_OPTIONS), worker_count)


class _PaddedSource:
  """Extends a source to ``length`` records by repeating its last one with ``mask=0``."""

  def __init__(self, source: Sequence[dict], length: int):
    self.source = source
    self.length = length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    real = index < len(self.source)
    record = self.source[index if real else len(self.source) - 1]
    return {**record, "mask": np.float32(real)}


def make_eval_dataset(source: Sequence[dict], *, batch_size: int, pixel_scale: float = 1.0,
                      process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                      ) -> grain.IterDataset:
  """One ordered pass over ``source`` in batches of ``batch_size`` per process, padded and masked."""
  global_batch = batch_size * process_count
  padded_length = math.ceil(len(source) / global_batch) * global_batch
  dataset = grain.MapDataset.source(_PaddedSource(source, padded_length))
  dataset = _process_shard(dataset, process_index, process_count, equal_lengths=False)
  dataset = dataset.map(augment.ScalePixels(pixel_scale)).batch(batch_size, drop_remainder=False)
  return _maybe_prefetch(dataset.to_iter_dataset(READ_OPTIONS), worker_count)
