"""Deterministic stratified train/validation/test split and the train-split mass statistics."""

from __future__ import annotations

import numpy as np

# DESIGN.md §2: 20 % test, then 1/8 of the rest validation -> 7000 / 1000 / 2000 for 10,000 images.
TEST_FRACTION = 0.2
VALIDATION_FRACTION_OF_REST = 1 / 8
SPLIT_SEED = 42


def stratified_split(labels: np.ndarray, *, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION,
                     validation_fraction: float = VALIDATION_FRACTION_OF_REST) -> dict[str, np.ndarray]:
  """Splits example indices into sorted, disjoint ``train``/``val``/``test`` index arrays.

  Each class is shuffled with its own stream of ``seed`` and cut by the same fractions, so every split
  keeps the class balance of the whole file and the result depends only on (labels, seed, fractions).
  """
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng(seed)
  parts = {"train": [], "val": [], "test": []}
  for cls in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == cls))
    num_test = int(round(test_fraction * len(members)))
    num_val = int(round(validation_fraction * (len(members) - num_test)))
    parts["test"].append(members[:num_test])
    parts["val"].append(members[num_test:num_test + num_val])
    parts["train"].append(members[num_test + num_val:])
  return {name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def mass_statistics(masses: np.ndarray, train_indices: np.ndarray) -> tuple[float, float]:
  """Mean and standard deviation of the mass on the training split, used to standardise the target."""
  train_masses = np.asarray(masses, dtype=np.float64).reshape(-1)[train_indices]
  return float(train_masses.mean()), float(train_masses.std())
