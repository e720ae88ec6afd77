"""The stratified split pinned to exact jets, its fingerprint, and the train-split mass statistics.

The split is drawn with ``numpy.random.Generator``: these pins fail loudly when a NumPy release changes
the stream of ``Generator.permutation`` (or ``random``), instead of every checkpoint's test split
silently becoming another set of jets.
"""

import os

import numpy as np
import pytest

from conftest import tiny_config, write_jet_file
from l2vit_jax import errors
from l2vit_jax.data import sources, sparse, split
from l2vit_jax.training import loop, recipes

# 30 jets, every third one a top jet: small enough to read the split.
SMALL_LABELS = (np.arange(30) % 3 == 0).astype(np.int32)
SMALL_SPLIT = {
  "train": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 15, 17, 18, 20, 21, 25, 26, 28, 29],
  "val": [16, 19, 24],
  "test": [0, 11, 14, 22, 23, 27],
}
# 10,000 jets, 3 of every 7 top (no random numbers in the labels themselves): the real file's sizes.
LARGE_LABELS = (np.arange(10_000) % 7 < 3).astype(np.int32)
LARGE_SPLIT_DIGESTS = {
  "train": (7000, "sha256:e72c6d66e9170a6aa14b04fc27bb994424bfef4662c781a313c42478a9c9b9e2"),
  "val": (1000, "sha256:001b3b17c1230a2f8cfcc90b6ceb3d95e6f606716f71e7f1bee38ef9f48ee9ae"),
  "test": (2000, "sha256:9282881171da8dd5460b86ea730a27eebcf82a3d09202f9cf722a406d6a7792f"),
}


def test_the_split_of_seed_42_is_pinned_to_exact_jets():
  parts = split.stratified_split(SMALL_LABELS, seed=42)
  assert {name: indices.tolist() for name, indices in parts.items()} == SMALL_SPLIT
  large = split.stratified_split(LARGE_LABELS, seed=split.SPLIT_SEED)
  assert {
    name: (len(indices), split.indices_digest(indices)) for name, indices in large.items()
  } == LARGE_SPLIT_DIGESTS


def test_label_subsets_are_pinned_to_exact_jets():
  train = np.asarray(SMALL_SPLIT["train"])
  subsets = split.nested_subsets(SMALL_LABELS, train, [4, 9], seed=3)
  assert {count: indices.tolist() for count, indices in subsets.items()} == {
    4: [18, 20, 25, 29],
    9: [1, 3, 4, 15, 18, 20, 25, 28, 29],
  }


def test_indices_digest_names_the_jets_not_their_dtype():
  indices = np.asarray(SMALL_SPLIT["test"])
  assert split.indices_digest(indices.astype(np.int32)) == split.indices_digest(indices.astype(">i8"))
  assert split.indices_digest(indices) != split.indices_digest(indices[:-1])


def test_the_fingerprint_is_the_same_for_the_hdf5_and_sparse_copies_of_a_file(tmp_path):
  path = write_jet_file(tmp_path / "labelled.h5", num=40)
  copy = str(tmp_path / "labelled.sparse")
  sparse.convert_hdf5(path, copy)
  fingerprint = sources.open_labelled(path, split_seed=42).fingerprint()
  assert sources.open_labelled(copy, split_seed=42).fingerprint() == fingerprint
  assert fingerprint["num_jets"] == 40 and fingerprint["image_size"] == 25
  assert fingerprint["split_seed"] == 42 and fingerprint["numpy"] == np.__version__
  assert (
    sources.open_labelled(path, split_seed=7).fingerprint()["indices_sha256"]["test"]
    != fingerprint["indices_sha256"]["test"]
  )


def test_the_fingerprint_changes_with_any_jets_mass():
  labels = {
    "label": SMALL_LABELS,
    "mass": np.full(30, 170.0, np.float32),
    "pt": np.full(30, 500.0, np.float32),
  }
  moved = dict(labels, mass=labels["mass"].copy())
  moved["mass"][17] = 171.0
  assert split.labels_digest(labels) != split.labels_digest(moved)


def test_training_jets_that_all_have_one_mass_are_refused_before_training(tmp_path):
  num = 40
  path = write_jet_file(
    tmp_path / "labelled.h5", num=num, overrides={"m": np.full((num, 1), 172.5, np.float32)}
  )
  workdir = str(tmp_path / "run")
  with pytest.raises(errors.DataError) as refused:
    loop.train_and_evaluate(tiny_config("finetune", path, num_epochs=1), workdir)
  assert str(refused.value).startswith(f"{path}: key 'm': all ")
  assert "have mass 172.5 GeV" in str(refused.value) and "standard deviation > 0" in str(refused.value)
  assert "\n" not in str(refused.value) and not os.path.exists(workdir)


def test_a_one_mass_train_subset_is_refused_naming_the_subset(tmp_path):
  path = write_jet_file(tmp_path / "labelled.h5", num=40)
  config = tiny_config("finetune", path, **{"data.train_subset": 1})
  with pytest.raises(errors.DataError, match=r"key 'm': all 1 training jets .*data\.train_subset"):
    recipes.labelled_splits(config)
