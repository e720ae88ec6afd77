"""Jet files in either format — HDF5 (as downloaded) or the compact ``.sparse`` format — by extension.

``scripts/prepare_data.py`` converts HDF5 files into the sparse format (≈40× smaller, bit-exact); every
function here accepts either file and returns what the HDF5 version would, so callers (training
recipes, evaluation, the study) need not know which they were given. ``open_labelled`` is the one way a
labelled file is validated, read and split.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from l2vit_jax import errors
from l2vit_jax.data import hdf5, sparse, split
from l2vit_jax.runtime import paths


def is_sparse(path: str) -> bool:
  return str(path).endswith(sparse.SUFFIX)


def open_source(path: str, *, labelled: bool, indices: Sequence[int] | None = None,
                labels: dict[str, np.ndarray] | None = None) -> hdf5.HDF5Source | sparse.SparseSource:
  """Grain random-access source over ``path``: a ``.sparse`` file, or HDF5 otherwise.

  ``labels`` (from ``read_labels``) saves re-reading them when the caller already has them.
  """
  source_class = sparse.SparseSource if is_sparse(path) else hdf5.HDF5Source
  return source_class(path, labelled=labelled, indices=indices, labels=labels)


def validate_file(path: str, *, labelled: bool, image_size: int | None = None, min_examples: int = 1,
                  value_sample: int = hdf5.DEFAULT_VALUE_SAMPLE) -> hdf5.FileInfo:
  """Format-aware ``hdf5.validate_file``: the same checks and one-line DataErrors for either format."""
  if paths.is_remote(path):  # Grain workers read random records: a local file, not an object store
    raise errors.DataError(f"{path}: jet files must be on local disk (gs:// works for workdirs, init_from "
                         "and reports only); copy it first, e.g. gcloud storage cp URL /local/dir/, and "
                         "pass the local path")
  validate = sparse.validate_file if is_sparse(path) else hdf5.validate_file
  return validate(path, labelled=labelled, image_size=image_size, min_examples=min_examples,
                  value_sample=value_sample)


def read_labels(path: str) -> dict[str, np.ndarray]:
  """Format-aware ``hdf5.read_labels``: ``label`` int32, ``mass`` and ``pt`` float32."""
  return sparse.read_labels(path) if is_sparse(path) else hdf5.read_labels(path)


@dataclasses.dataclass(frozen=True)
class LabelledFile:
  """A validated labelled file, its labels (``read_labels``) and the fixed stratified split.

  ``parts`` is ``split.stratified_split`` of the labels with ``split_seed``: every user of a labelled
  file (finetuning, evaluation, probes, the study) sees the same train/val/test jets, and
  ``fingerprint`` says which ones they were.
  """
  path: str
  image_size: int
  labels: dict[str, np.ndarray]
  parts: dict[str, np.ndarray]
  split_seed: int

  @property
  def mass_key(self) -> str:
    """The file's key of the jet masses, to name in errors (``m`` in HDF5, ``mass`` in sparse files)."""
    return "mass" if is_sparse(self.path) else hdf5.LABEL_KEYS[1]

  def fingerprint(self) -> dict:
    """``split.split_fingerprint`` of this file and split: what a finetuned checkpoint records."""
    return split.split_fingerprint(self.labels, self.parts, seed=self.split_seed,
                                   image_size=self.image_size)

  def mass_statistics(self, train: np.ndarray) -> tuple[float, float]:
    """``split.mass_statistics`` of the jets ``train``, which must not all have the same mass.

    The regression target is standardised by their standard deviation: 0 would make every loss NaN
    (0/0) from the first step, so it is refused here, before anything trains.

    Raises:
      errors.DataError: one line naming the file, the mass key and the expected spread.
    """
    mean, std = split.mass_statistics(self.labels["mass"], train)
    if not std > 0:
      raise errors.DataError(
          f"{self.path}: key '{self.mass_key}': all {len(train)} training jets have mass {mean:g} GeV; "
          "expected masses with a standard deviation > 0 (the regression target is standardised by "
          "it); train on more jets (data.train_subset) or another file")
    return mean, std

  def source(self, indices: Sequence[int]) -> hdf5.HDF5Source | sparse.SparseSource:
    """A source over the jets ``indices``, reusing the labels already read."""
    return open_source(self.path, labelled=True, indices=indices, labels=self.labels)

  def check_image_size(self, model_config: dict, checkpoint: str) -> None:
    """Refuses (one line) a checkpoint whose model was built for other images than this file's."""
    if int(model_config["img_size"]) != self.image_size:
      raise errors.DataError(
          f"{self.path}: key '{hdf5.IMAGE_KEY}': images are {self.image_size}×{self.image_size}, but the "
          f"model of {checkpoint} expects {model_config['img_size']}×{model_config['img_size']}")


def open_labelled(path: str, *, split_seed: int, image_size: int | None = None,
                  min_examples: int = 1) -> LabelledFile:
  """Validates ``path`` as a labelled file (one-line ``DataError`` otherwise), reads its labels and
  splits them."""
  info = validate_file(path, labelled=True, image_size=image_size, min_examples=min_examples)
  labels = read_labels(path)
  return LabelledFile(path, info.image_size, labels,
                      split.stratified_split(labels["label"], seed=split_seed), int(split_seed))
