"""Grain input pipelines: per-process shards, seeded shuffling, augmentation, batching.

Training pipelines repeat forever and drop the last partial batch; the train loop counts steps and
derives epochs from ``steps_per_epoch``. Evaluation pipelines visit every example exactly once: the
dataset is padded to a whole number of global batches with copies flagged ``mask=0``, so every process
yields the same number of batches (needed for multi-host collectives) and padding never counts.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import grain
import numpy as np
from absl import flags

from l2vit_jax.data import augment, sparse

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


# An odd multiplier: process indices map to distinct seeds, also for neighbouring base seeds.
_PROCESS_SEED_STRIDE = 0x9E3779B9


def augmentation_seed(seed: int, process_index: int = 0) -> int:
  """The ``random_map`` seed of process ``process_index``'s augmentations: distinct for every process of
  a run (Grain seeds a Philox generator from it, so distinct seeds give independent streams), and
  ``seed + 1`` for process 0, whose single-process runs draw what they always drew."""
  return seed + 1 + process_index * _PROCESS_SEED_STRIDE  # no modulo: Philox takes any size


class ShuffledKeyBatches:
  """Grain source whose element j is the j-th training batch of record keys (B,) int64, endlessly.

  Process ``i`` of ``n`` owns records i, i+n, i+2n, ... (trimmed to equal shard lengths); each epoch
  is its own seeded permutation of the shard. Batches are cut from the concatenated epochs, so one
  may span two. Whole batches of keys at a time: Grain's per-record ``shuffle`` costs ≈ 24 µs per
  record on a 2-core CPU, more than the whole host budget of the sparse device path.
  """

  def __init__(self, num_records: int, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.keys = np.arange(process_index, num_records, process_count)[:num_records // process_count]
    self.batch_size, self.seed = batch_size, seed
    self._permutations: dict[int, np.ndarray] = {}  # the epochs in use, computed once each

  def __len__(self) -> int:
    return sys.maxsize // self.batch_size  # endless, as far as anyone will train

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) > 2:
        self._permutations.clear()
      self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))
    return self._permutations[epoch]

  def __getitem__(self, index: int) -> np.ndarray:
    positions = int(index) * self.batch_size + np.arange(self.batch_size)
    epochs, within = np.divmod(positions, len(self.keys))
    shuffled = np.concatenate([self._permutation(int(e))[within[epochs == e]] for e in np.unique(epochs)])
    return self.keys[shuffled]


class _ReadRecords(grain.transforms.Map):
  """A batch of record keys → the records of ``source``, stacked per field (a dense batch)."""

  def __init__(self, source: Sequence[dict]):
    self.source = source

  def map(self, keys: np.ndarray) -> dict[str, np.ndarray]:
    records = [self.source[int(key)] for key in keys]
    return {field: np.stack([record[field] for record in records]) for field in records[0]}


def make_train_dataset(source: Sequence[dict], *, batch_size: int, seed: int, augmentation: str,
                       pixel_scale: float = 1.0, process_index: int = 0, process_count: int = 1,
                       worker_count: int = 0, simclr_views: augment.SimCLRViews | None = None,
                       device_augmentation: bool = False) -> grain.IterDataset:
  """Endless shuffled, augmented batches of ``batch_size`` (per process) from this process's shard.

  Both paths cut the same batches of record keys (``ShuffledKeyBatches``) and draw the same
  augmentation parameters: Grain seeds each batch's ``random_map`` from (``augmentation_seed``, batch
  index), so batches, augmentations and a restored iterator do not depend on which path or how many
  workers. The seed folds in ``process_index``: every process draws its own augmentations (batch j of
  each process would otherwise get the same flips, shifts, dropped channels and noise) and redraws
  the same ones when it resumes.

  Args:
    augmentation: 'none', 'physics' (flips and φ-roll) or 'simclr' (two views per image).
    device_augmentation: ship batches in padded sparse form (``sparse.ReadPaddedBatch``) with the
      augmentation parameters; ``device_augment.prepare_batch`` makes the images inside the jitted
      step, bit-identical to this function's dense batches. Needs a ``sparse.SparseSource``.
  """
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
  if device_augmentation and not isinstance(source, sparse.SparseSource):
    raise ValueError(f"device augmentation reads {sparse.SUFFIX} files; got {source!r}")
  if len(source) // process_count < batch_size:
    raise ValueError(f"{len(source) // process_count} training examples per process is fewer than one "
                     f"batch of {batch_size}")
  dataset = grain.MapDataset.source(ShuffledKeyBatches(len(source), batch_size, seed, process_index,
                                                       process_count))
  # Pixels are scaled before augmenting (the noise multiplies scaled values) so that the sparse path
  # can scale on the host, where division is exact, and augment on the device.
  if device_augmentation:
    dataset = dataset.map(sparse.ReadPaddedBatch(source, pixel_scale))
  else:
    dataset = dataset.map(_ReadRecords(source)).map(augment.ScalePixels(pixel_scale))
  transform = simclr_views if augmentation == "simclr" and simclr_views else augment.TRANSFORMS[augmentation]
  if transform is not None:
    dataset = dataset.random_map(transform, seed=augmentation_seed(seed, process_index))
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
