"""Deterministic stratified train/validation/test split, its fingerprint, and the train-split mass
statistics.

The split is a function of (labels, seed) through ``numpy.random.Generator``; ``split_fingerprint``
records which jets each split held, so a checkpoint can say which jets its model trained on and a later
evaluation can tell whether its own split is that one (another seed, another file, or a NumPy whose
``Generator.permutation`` changed would each re-split silently otherwise).
"""

from __future__ import annotations

import hashlib

import numpy as np

# docs/design.md, Data: 20 % test, then 1/8 of the rest validation -> 7000 / 1000 / 2000 for 10,000 images.
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


SPLIT_NAMES = ("train", "val", "test")


def indices_digest(indices: np.ndarray) -> str:
  """``sha256:<hex>`` of ``indices`` as little-endian int64: the same jets give the same digest
  whatever the dtype or byte order they were held in."""
  return "sha256:" + hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def labels_digest(labels: dict[str, np.ndarray]) -> str:
  """``sha256:<hex>`` of a labelled file's per-jet arrays as ``read_labels`` returns them: ``label``
  (little-endian int32), then ``mass`` and ``pt`` (little-endian float32), in that order."""
  digest = hashlib.sha256()
  for name, dtype in (("label", "<i4"), ("mass", "<f4"), ("pt", "<f4")):
    digest.update(np.asarray(labels[name], dtype=dtype).reshape(-1).tobytes())
  return "sha256:" + digest.hexdigest()


def split_fingerprint(labels: dict[str, np.ndarray], parts: dict[str, np.ndarray], *, seed: int,
                      image_size: int) -> dict:
  """What a checkpoint records of the labelled file and the split its model was trained with.

  Covers the file's number of jets, its image size and ``labels_digest`` (the class, mass and pT of
  every jet: 12 bytes a jet, 120 kB for the 10,000-jet file, already read to split it), not its pixels
  or its bytes: hashing the 4.66 GiB of images would take longer than evaluating, and the same jets as
  ``.h5`` or as ``.sparse`` (``scripts/prepare_data.py``) must give the same fingerprint. Two files with
  the same labels, masses and pT of every jet in the same order are taken for the same file.
  ``indices`` holds ``indices_digest`` of the whole ``train``/``val``/``test`` split of ``seed`` (not a
  ``data.train_subset``, which is a prefix of the train split recorded beside it in the meta), and
  ``numpy`` the version that drew it, to name in the error when only NumPy differs. Plain JSON.
  """
  return {"num_jets": int(np.asarray(labels["label"]).size), "image_size": int(image_size),
          "labels_sha256": labels_digest(labels), "split_seed": int(seed), "numpy": np.__version__,
          "indices_sha256": {name: indices_digest(parts[name]) for name in SPLIT_NAMES}}


def mass_statistics(masses: np.ndarray, train_indices: np.ndarray) -> tuple[float, float]:
  """Mean and standard deviation of the mass on the training split, used to standardise the target."""
  train_masses = np.asarray(masses, dtype=np.float64).reshape(-1)[train_indices]
  return float(train_masses.mean()), float(train_masses.std())


def destandardise_mass(mass_z: np.ndarray, mass_mean: float, mass_std: float) -> np.ndarray:
  """Masses in GeV from the standardised masses the network regresses: the inverse of the
  standardisation with the train split's ``mass_statistics`` stored in every finetuned checkpoint."""
  return np.asarray(mass_z) * mass_std + mass_mean


def resolve_label_counts(label_counts, num_train: int) -> list[int]:
  """Label counts as numbers of jets: values ≤ 1 are fractions of the train split, larger ones counts.

  Returns the distinct counts in increasing order (0.01 of 7000 → 70; 1.0 → 7000; 250 → 250).
  """
  counts = set()
  for value in label_counts:
    value = float(value)
    if value <= 0:
      raise ValueError(f"label counts must be positive, got {value}")
    counts.add(int(round(value * num_train)) if value <= 1.0 else int(value))
  return sorted(counts)


def stratified_order(labels: np.ndarray, train_indices: np.ndarray, *, seed: int) -> np.ndarray:
  """A seeded ordering of ``train_indices`` whose every prefix keeps the class balance (±1 per class).

  Each class is shuffled with ``seed``; its i-th member gets the key (i + ½) / class size (plus a random
  tie-break), and the whole split is sorted by key, so the classes interleave in proportion.
  """
  train_indices = np.asarray(train_indices, dtype=np.int64)
  train_labels = np.asarray(labels).reshape(-1)[train_indices]
  rng = np.random.default_rng(seed)
  members, keys = [], []
  for cls in np.unique(train_labels):
    shuffled = rng.permutation(train_indices[train_labels == cls])
    members.append(shuffled)
    keys.append((np.arange(len(shuffled)) + 0.5) / len(shuffled))
  members, keys = np.concatenate(members), np.concatenate(keys)
  tie_break = rng.random(len(keys))
  return members[np.lexsort((tie_break, keys))]


def nested_subsets(labels: np.ndarray, train_indices: np.ndarray, counts, *, seed: int
                   ) -> dict[int, np.ndarray]:
  """Stratified, nested labelled subsets of the train split: count → sorted indices.

  Every subset is a prefix of one ``stratified_order``, so each smaller subset lies inside every larger
  one and keeps the class balance; the result depends only on (labels, train_indices, counts, seed).
  ``counts`` are numbers of jets (see ``resolve_label_counts`` for fractions).

  Raises:
    ValueError: a count is not in [1, len(train_indices)].
  """
  order = stratified_order(labels, train_indices, seed=seed)
  subsets = {}
  for count in counts:
    count = int(count)
    if not 1 <= count <= len(order):
      raise ValueError(f"label count {count}: expected 1..{len(order)} (the train split's size)")
    subsets[count] = np.sort(order[:count])
  return subsets
