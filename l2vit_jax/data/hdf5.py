"""HDF5 jet files: schema validation and a lazily opened random-access source for Grain.

The schema is the one of the real CMS files (docs/design.md, Data): ``jet`` (N, H, W, 8) float32 channels-last,
and for labelled files ``Y`` (N, 1) in {0, 1}, ``m`` (N, 1) mass in GeV, ``pT`` (N, 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Sequence

import h5py
import numpy as np

from l2vit_jax.errors import DataError, one_line

NUM_CHANNELS = 8
IMAGE_KEY = "jet"
LABEL_KEYS = ("Y", "m", "pT")
# Images checked for finite, non-negative values; shapes and labels are always checked in full.
DEFAULT_VALUE_SAMPLE = 64
# The largest image side accepted (the CMS images are 125): validation and reading allocate whole
# dense images, so a side read from a damaged or forged file must not size an allocation beyond this
# (a 1024 side is 32 MiB per image).
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class FileInfo:
  path: str
  num_examples: int
  image_size: int
  labelled: bool
  bytes_read_for_values: int  # how much pixel data validation actually read


def _fail(path: str, key: str | None, message: str) -> DataError:
  where = f"{path}: key '{key}'" if key else path
  return DataError(f"{where}: {message}")


def open_hdf5(path: str) -> h5py.File:
  """Opens ``path`` read-only, turning every way of failing into a one-line DataError."""
  if not path:
    raise _fail("''", None, "no file given (empty path in the config)")
  if not os.path.exists(path):
    raise _fail(path, None, "file not found (download it with scripts/download_data.py, or make a "
                "synthetic one with scripts/make_synthetic.py)")
  if os.path.isdir(path):
    raise _fail(path, None, "is a directory, expected an HDF5 file")
  if not os.access(path, os.R_OK):
    raise _fail(path, None, "is not readable (permission denied)")
  try:
    is_hdf5 = h5py.is_hdf5(path)
  except OSError as e:
    raise _fail(path, None, f"cannot be read: {one_line(e)}") from None
  if not is_hdf5:
    raise _fail(path, None, "not an HDF5 file (no HDF5 signature; an HTML error page or a partial "
                "download?)")
  try:
    return h5py.File(path, "r")
  except OSError as e:  # truncated or otherwise corrupt files
    raise _fail(path, None, f"cannot be read as HDF5 (truncated or corrupt?): {one_line(e)}") from None


@contextlib.contextmanager
def _reporting_damage(path: str):
  """Turns h5py's errors for damaged metadata into one DataError naming the file; ours pass through.

  HDF5 reads an object's header only when it is used, so a damaged file that opens can still fail on
  any later access (a key, a shape, a dtype, the values), and h5py maps HDF5's error classes onto
  KeyError, ValueError, TypeError, RuntimeError or OSError ('gap found in early version of file
  format', 'No NumPy equivalent for TypeBitfieldID', ...). The message keeps the exception's type.
  """
  try:
    yield
  except DataError:
    raise
  except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
    raise _fail(path, None, f"cannot be read as HDF5 (damaged file?): {type(e).__name__}: "
                f"{one_line(e)}") from None


def _key_names(f: h5py.File) -> list:
  """The file's keys, sorted; a damaged link name comes back as bytes, which str keys cannot sort with."""
  return sorted(f.keys(), key=str)


def _check_image_dataset(path: str, f: h5py.File, image_size: int | None) -> tuple[int, int]:
  if IMAGE_KEY not in f:
    raise _fail(path, IMAGE_KEY, f"missing; expected dataset of shape (N, H, W, {NUM_CHANNELS}) "
                f"float32, found keys {_key_names(f)}")
  jet = f[IMAGE_KEY]
  expect = f"(N, {image_size or 'S'}, {image_size or 'S'}, {NUM_CHANNELS}) float32"
  if not isinstance(jet, h5py.Dataset) or jet.ndim != 4 or jet.shape[-1] != NUM_CHANNELS \
      or jet.shape[1] != jet.shape[2] or (image_size and jet.shape[1] != image_size):
    shape = getattr(jet, "shape", "a group")
    raise _fail(path, IMAGE_KEY, f"expected shape {expect}, found {shape}")
  if jet.dtype != np.float32:
    raise _fail(path, IMAGE_KEY, f"expected dtype float32, found {jet.dtype}")
  return jet.shape[0], jet.shape[1]


def _read_label(path: str, f: h5py.File, key: str, n: int) -> np.ndarray:
  if key not in f:
    raise _fail(path, key, f"missing; expected dataset of shape ({n}, 1), found keys {_key_names(f)}")
  ds = f[key]
  if not isinstance(ds, h5py.Dataset) or ds.shape not in ((n, 1), (n,)):
    raise _fail(path, key, f"expected shape ({n}, 1) to match '{IMAGE_KEY}', found "
                f"{getattr(ds, 'shape', 'a group')}")
  if not np.issubdtype(ds.dtype, np.floating) and not np.issubdtype(ds.dtype, np.integer):
    raise _fail(path, key, f"expected a numeric dtype, found {ds.dtype}")
  return np.asarray(ds[...], dtype=np.float64).reshape(n)


def value_sample_indices(n: int, sample: int) -> np.ndarray:
  """The images whose pixels validation reads: first, last and a fixed random choice, ``sample`` in all."""
  if sample >= n:
    return np.arange(n)
  rng = np.random.default_rng(0)
  picks = rng.choice(np.arange(1, n - 1), size=max(sample - 2, 0), replace=False)  # exactly `sample`
  return np.unique(np.concatenate([[0, n - 1], picks]))


def _reject_first(path: str, key: str, values: np.ndarray, bad: np.ndarray, expected: str) -> None:
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    raise _fail(path, key, f"expected {expected}, found {float(values[first])} at index {first}")


def check_label_values(path: str, labels: dict[str, np.ndarray]) -> None:
  """Class labels in {0, 1}, finite positive masses, finite pT, given as {key: values} in the order
  (class, mass, pT) under whatever key names the file format uses."""
  (label_key, label), (mass_key, mass), (pt_key, pt) = labels.items()
  _reject_first(path, label_key, label, ~np.isin(label, (0, 1)), "class labels in {0, 1}")
  _reject_first(path, mass_key, mass, ~(np.isfinite(mass) & (mass > 0)),
                "finite positive masses in GeV")
  _reject_first(path, pt_key, pt, ~np.isfinite(pt), "finite values")


def check_pixel_values(path: str, key: str, pixels: np.ndarray, image_index: int) -> None:
  if not np.isfinite(pixels).all():
    raise _fail(path, key, f"expected finite pixels, found NaN/Inf in image {image_index}")
  if (pixels < 0).any():
    raise _fail(path, key, f"expected pixels >= 0, found {float(pixels.min())} in image {image_index}")


def validate_file(path: str, *, labelled: bool, image_size: int | None = None, min_examples: int = 1,
                  value_sample: int = DEFAULT_VALUE_SAMPLE) -> FileInfo:
  """Checks a jet file against the schema without reading all of its pixels.

  What is read:

  * metadata only for shapes and dtypes (every dataset; a truncated file already fails to open, since
    HDF5 compares the file's size with the end address it recorded);
  * labels in full: ``Y``, ``m``, ``pT`` are 4 bytes per image each (120 kB for the 10,000-image file);
  * pixels on ``value_sample`` images only (the first, the last and a fixed random sample), checked for
    NaN/Inf and negative values: 64 × 500 kB = 32 MB for the real files, whatever their size (the
    28 GiB unlabelled file included). ``FileInfo.bytes_read_for_values`` reports the exact amount.

  Pixels outside the sample are not checked here; a NaN among them stops training at the step that
  reads it (``errors.DivergenceError``) before anything from that state is saved.

  Raises:
    DataError: with a one-line message naming the file, the key and what was expected.
  """
  with open_hdf5(path) as f, _reporting_damage(path):
    n, size = _check_image_dataset(path, f, image_size)
    if n < min_examples:
      raise _fail(path, IMAGE_KEY, f"has {n} examples, need at least {min_examples} (one batch)")
    if labelled:
      # Checked in float32, the precision read_labels hands on: a float64 mass of 1e-75 is positive,
      # and 0 once read.
      check_label_values(path, {key: _read_label(path, f, key, n).astype(np.float32) for key in LABEL_KEYS})
    indices = value_sample_indices(n, value_sample)
    jet = f[IMAGE_KEY]
    nbytes = 0
    for i in indices:
      try:
        image = jet[int(i)]
      except OSError as e:
        raise _fail(path, IMAGE_KEY, f"image {int(i)} cannot be read (truncated file, or a compression "
                    f"filter h5py lacks?): {one_line(e)}") from None
      nbytes += image.nbytes
      check_pixel_values(path, IMAGE_KEY, image, int(i))
  return FileInfo(path=path, num_examples=n, image_size=size, labelled=labelled,
                  bytes_read_for_values=nbytes)


def read_labels(path: str) -> dict[str, np.ndarray]:
  """Reads the small per-image arrays of a labelled file: ``label`` int32, ``mass`` and ``pt`` float32."""
  with open_hdf5(path) as f, _reporting_damage(path):
    n = f[IMAGE_KEY].shape[0]
    return {
        "label": _read_label(path, f, "Y", n).astype(np.int32),
        "mass": _read_label(path, f, "m", n).astype(np.float32),
        "pt": _read_label(path, f, "pT", n).astype(np.float32),
    }


class LazyJetSource:
  """Grain random-access source over a jet file, optionally restricted to ``indices``.

  Records are dicts: ``image`` (H, W, 8) float32, ``index`` (position in the file) and, when
  labelled, ``label`` int32, ``mass`` and ``pt`` float32. The file handle is opened lazily in
  whichever process reads, and dropped when pickled, because Grain's ``mp_prefetch`` workers are
  spawned and open handles cannot cross processes. Subclasses say how to open a file and read one image.
  """

  def __init__(self, path: str, *, labelled: bool, num_examples: int,
               indices: Sequence[int] | None, labels: dict[str, np.ndarray] | None):
    self.path = path
    self.labelled = labelled
    self.indices = np.arange(num_examples) if indices is None else np.asarray(indices, dtype=np.int64)
    self._labels = labels
    self._handle = None

  def _open(self):
    raise NotImplementedError

  def _read_image(self, handle, index: int) -> np.ndarray:
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    if self._handle is None:
      self._handle = self._open()
    index = int(self.indices[record_key])
    record = {"image": self._read_image(self._handle, index), "index": np.int64(index)}
    if self._labels is not None:
      record.update({k: v[index] for k, v in self._labels.items()})
    return record

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_handle"] = None
    return state

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r}, labelled={self.labelled}, n={len(self)})"


class HDF5Source(LazyJetSource):
  """``LazyJetSource`` over an HDF5 file with the real schema."""

  def __init__(self, path: str, *, labelled: bool, indices: Sequence[int] | None = None,
               labels: dict[str, np.ndarray] | None = None):
    with open_hdf5(path) as f, _reporting_damage(path):
      num_examples = f[IMAGE_KEY].shape[0]
    if labelled and labels is None:
      labels = read_labels(path)
    super().__init__(path, labelled=labelled, num_examples=num_examples, indices=indices,
                     labels=labels if labelled else None)

  def _open(self) -> h5py.File:
    return open_hdf5(self.path)

  def _read_image(self, handle: h5py.File, index: int) -> np.ndarray:
    return handle[IMAGE_KEY][index]
