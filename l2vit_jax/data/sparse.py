"""A compact, lossless sparse format for jet files, and its Grain random-access source.

The real images are ~99 % zeros (docs/design.md, Data): a 500 kB float32 image holds ~1,500 non-zero pixels.
``scripts/prepare_data.py`` converts an HDF5 jet file once into a ``.sparse`` file that stores, per
image, only the flat positions (within H·W·C) and float32 values of its non-zero pixels — about 40×
smaller — and :class:`SparseSource` yields exactly the records ``hdf5.HDF5Source`` yields.

File layout (little-endian), memory-mappable without any library:

  MAGIC (16 bytes) | header length (uint64) | JSON header | arrays, each 64-byte aligned

The header records ``image_shape`` [H, W, C], ``num_examples``, ``labelled`` and, per array, its
``dtype``, ``shape`` and byte ``offset``. Arrays: ``offsets`` int64 (N+1,) — image i's non-zeros are
``positions[offsets[i]:offsets[i+1]]`` — ``positions`` (uint16 when H·W·C ≤ 65,536, else int32),
``values`` float32 and, when labelled, ``label`` int32, ``mass`` and ``pt`` float32 (N,), the values
``hdf5.read_labels`` returns. "Non-zero" means a non-zero bit pattern, so -0.0 (and anything else)
survives: the dense reconstruction is bit-exact.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import grain
import numpy as np

from l2vit_jax.data import hdf5
from l2vit_jax.errors import DataError
from l2vit_jax.runtime import console, paths

SUFFIX = ".sparse"
MAGIC = b"L2VIT-SPARSE-v1\n"
FORMAT_VERSION = 1
ALIGNMENT = 64
# Padded batches hold this multiple of non-zeros per image: one compiled step per file size class.
CAPACITY_MULTIPLE = 256
LABEL_ARRAYS = ("label", "mass", "pt")


def _fail(path: str, key: str | None, message: str) -> DataError:
  where = f"{path}: key '{key}'" if key else path
  return DataError(f"{where}: {message}")


def position_dtype(image_shape: Sequence[int]) -> np.dtype:
  return np.dtype(np.uint16) if int(np.prod(image_shape)) <= 1 << 16 else np.dtype(np.int32)


# --- writing ----------------------------------------------------------------------------------------

def _aligned(offset: int) -> int:
  return -(-offset // ALIGNMENT) * ALIGNMENT


def _sparsify(images: np.ndarray, pixel_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(n, H, W, C) float32 → per-image non-zero counts, flat positions and values (C order)."""
  flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
  image_index, position = np.nonzero(flat.view(np.uint32))
  counts = np.bincount(image_index, minlength=len(images))
  return counts, position.astype(pixel_dtype), flat[image_index, position]


def _stream_nonzeros(input_path: str, parts: dict[str, str], chunk_size: int, pixel_dtype,
                     bar: console.ProgressBar) -> np.ndarray:
  """Appends every image's non-zero positions and values to the files ``parts``, ``chunk_size``
  images at a time; returns the (N + 1,) offsets of each image's non-zeros."""
  with hdf5.open_hdf5(input_path) as f, open(parts["positions"], "wb") as positions_file, \
      open(parts["values"], "wb") as values_file:
    jet = f[hdf5.IMAGE_KEY]
    num = len(jet)
    offsets = np.zeros(num + 1, np.int64)
    for start in range(0, num, chunk_size):
      stop = min(start + chunk_size, num)
      counts, positions, values = _sparsify(jet[start:stop], pixel_dtype)
      offsets[start + 1:stop + 1] = offsets[start] + np.cumsum(counts)
      positions_file.write(positions.tobytes())
      values_file.write(values.astype("<f4").tobytes())
      bar.update(stop - start)
  return offsets


def convert_hdf5(input_path: str, output_path: str, *, labelled: bool | None = None,
                 chunk_size: int = 256, progress: Callable[[int, int], None] | None = None) -> dict:
  """Converts an HDF5 jet file into the sparse format, ``chunk_size`` images at a time.

  The input is validated first (``hdf5.validate_file``). Memory stays near ``chunk_size`` dense images
  plus their non-zeros: positions and values stream into temporary files next to the output. The file is
  written under a hidden temporary name and renamed into place only when complete (``paths.replacing``;
  the positions and values files are temporaries of ``OUTPUT.positions`` and ``OUTPUT.values``, removed
  when done and swept with the output's after a kill).

  Args:
    labelled: whether to carry ``Y``/``m``/``pT``; None means "if the file has them".
    progress: called with (images converted, total) after every chunk; without one, a progress bar
      shows on a terminal and one line logs the rate at the end (``console.ProgressBar``).

  Returns:
    A summary: examples, labelled, non-zero count, input and output sizes in bytes.
  """
  with hdf5.open_hdf5(input_path) as f:
    if labelled is None:
      labelled = all(key in f for key in hdf5.LABEL_KEYS)
  info = hdf5.validate_file(input_path, labelled=labelled)
  labels = hdf5.read_labels(input_path) if labelled else {}
  num = info.num_examples
  image_shape = (info.image_size, info.image_size, hdf5.NUM_CHANNELS)
  pixel_dtype = position_dtype(image_shape)
  report = None if progress is None else lambda done: progress(done, num)
  parts = {name: paths.temporary_name(f"{output_path}.{name}") for name in ("positions", "values")}
  try:
    with console.ProgressBar(num, os.path.basename(output_path), "jet", report=report) as bar, \
        paths.replacing(output_path) as temporary:
      offsets = _stream_nonzeros(input_path, parts, chunk_size, pixel_dtype, bar)
      nonzeros = int(offsets[-1])
      arrays = {"offsets": (offsets.dtype, (num + 1,)), "positions": (pixel_dtype, (nonzeros,)),
                "values": (np.dtype(np.float32), (nonzeros,))}
      arrays.update({name: (labels[name].dtype, (num,)) for name in LABEL_ARRAYS if labelled})
      header = {"format": "l2vit_jax.sparse", "version": FORMAT_VERSION, "num_examples": num,
                "image_shape": list(image_shape), "labelled": labelled,
                "source": os.path.basename(input_path), "arrays": {}}
      # The header's length depends on the offsets it records; lay arrays out after a generous bound.
      header_room = _aligned(len(MAGIC) + 8 + 4096 + 256 * len(arrays))
      position = header_room
      for name, (dtype, shape) in arrays.items():
        header["arrays"][name] = {"dtype": np.dtype(dtype).newbyteorder("<").str, "shape": list(shape),
                                  "offset": position}
        position = _aligned(position + int(np.prod(shape)) * np.dtype(dtype).itemsize)
      encoded = json.dumps(header).encode()
      if len(MAGIC) + 8 + len(encoded) > header_room:
        raise RuntimeError("sparse header does not fit its reserved room")  # cannot happen
      with open(temporary, "wb") as out:
        out.write(MAGIC + np.uint64(len(encoded)).astype("<u8").tobytes() + encoded)
        for name, spec in header["arrays"].items():
          out.seek(spec["offset"])
          if name in parts:
            with open(parts[name], "rb") as part:
              while block := part.read(1 << 24):
                out.write(block)
          else:
            source = offsets if name == "offsets" else labels[name]
            out.write(np.ascontiguousarray(source).astype(spec["dtype"]).tobytes())
        out.truncate(position)
  finally:
    for part in parts.values():
      if os.path.exists(part):
        os.remove(part)
  return {"num_examples": num, "labelled": labelled, "nonzeros": nonzeros,
          "input_bytes": os.path.getsize(input_path), "output_bytes": os.path.getsize(output_path)}


# --- reading ----------------------------------------------------------------------------------------

# The dtype the writer records for each array ('positions': ``position_dtype`` of the image shape).
ARRAY_DTYPES = {"offsets": "<i8", "values": "<f4", "label": "<i4", "mass": "<f4", "pt": "<f4"}


def _is_count(value) -> bool:
  """A non-negative JSON integer (JSON true/false decode to bool, a subclass of int: not counts)."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value, limit: int = 120) -> str:
  """A header value for an error message: JSON, so on one line whatever strings it holds."""
  return json.dumps(value)[:limit]


def _check_header_fields(path: str, header: dict, size: int) -> None:
  """Every header field a reader uses has its type, and every array lies inside the file.

  Checked before anything is allocated or memory-mapped, so a damaged or forged header (a bit flip, a
  hand edit) is one DataError rather than a KeyError, a numpy TypeError or an allocation sized by a
  forged count: ``image_shape`` is three integers in 1..``hdf5.MAX_IMAGE_SIZE`` (a dense image is
  allocated from it), ``num_examples`` a count, ``labelled`` a bool, and ``arrays`` holds exactly the
  arrays of the format, each 1-D with the dtype the writer records and a byte range (computed in
  Python integers, so a forged shape cannot overflow it) that ends inside the file.
  """
  shape = header.get("image_shape")
  if not (isinstance(shape, list) and len(shape) == 3
          and all(_is_count(side) and 0 < side <= hdf5.MAX_IMAGE_SIZE for side in shape)):
    raise _fail(path, hdf5.IMAGE_KEY, f"expected image_shape [S, S, {hdf5.NUM_CHANNELS}] with "
                f"0 < S <= {hdf5.MAX_IMAGE_SIZE}, found {_shown(shape)}")
  if not _is_count(header.get("num_examples")) or not isinstance(header.get("labelled"), bool):
    raise _fail(path, None, "expected a count num_examples and a bool labelled in the header, found "
                f"{_shown(header.get('num_examples'), 40)} and {_shown(header.get('labelled'), 40)}")
  arrays = header.get("arrays")
  names = {"offsets", "positions", "values", *(LABEL_ARRAYS if header["labelled"] else ())}
  if not isinstance(arrays, dict) or set(arrays) != names:
    found = sorted(arrays) if isinstance(arrays, dict) else arrays
    raise _fail(path, None, f"expected arrays {sorted(names)} in the header, found {_shown(found)}")
  dtypes = dict(ARRAY_DTYPES, positions=position_dtype(shape).newbyteorder("<").str)
  for name, spec in arrays.items():
    if not (isinstance(spec, dict) and _is_count(spec.get("offset")) and spec.get("dtype") == dtypes[name]
            and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 1
            and _is_count(spec["shape"][0])):
      raise _fail(path, name, f"expected {{\"dtype\": \"{dtypes[name]}\", \"shape\": [count], "
                  f"\"offset\": byte}}, found {_shown(spec)}")
    end = spec["offset"] + spec["shape"][0] * np.dtype(dtypes[name]).itemsize
    if end > size:
      raise _fail(path, name, f"extends to byte {end} but the file has {size} bytes (truncated?)")


def read_header(path: str) -> dict:
  """The JSON header, after checking the magic, the header's fields and that every array lies inside
  the file (``_check_header_fields``): what the readers below rely on without checking again."""
  if not os.path.exists(path):
    raise _fail(path, None, "file not found (make it with scripts/prepare_data.py --input FILE.h5 "
                f"--output FILE{SUFFIX})")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
      raise _fail(path, None, f"not an l2vit_jax sparse jet file (expected magic {MAGIC!r})")
    length = int(np.frombuffer(f.read(8), "<u8")[0]) if size >= len(MAGIC) + 8 else -1
    try:  # the length is checked against the file's size before that many bytes are read
      header = json.loads(f.read(length)) if 0 < length <= size else None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than Python recurses
      header = None
  if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
    raise _fail(path, None, f"unreadable header or unsupported version (expected {FORMAT_VERSION}); "
                "re-create it with scripts/prepare_data.py")
  _check_header_fields(path, header, size)
  return header


def open_arrays(path: str, header: dict | None = None) -> dict[str, np.ndarray]:
  """Read-only memory maps of every array of the file."""
  header = header or read_header(path)
  return {name: np.memmap(path, dtype=spec["dtype"], mode="r", offset=spec["offset"],
                          shape=tuple(spec["shape"]))
          for name, spec in header["arrays"].items()}


def dense_image(arrays: dict[str, np.ndarray], index: int, image_shape: Sequence[int]) -> np.ndarray:
  """Image ``index`` as a dense float32 (H, W, C) array, bit-identical to the HDF5 original."""
  start, stop = arrays["offsets"][index], arrays["offsets"][index + 1]
  image = np.zeros(int(np.prod(image_shape)), np.float32)
  image[arrays["positions"][start:stop]] = arrays["values"][start:stop]
  return image.reshape(image_shape)


def read_labels(path: str) -> dict[str, np.ndarray]:
  """``label`` int32, ``mass`` and ``pt`` float32 — the same arrays as ``hdf5.read_labels``."""
  header = read_header(path)
  if not header["labelled"]:
    raise _fail(path, "label", "missing: this sparse file was converted from an unlabelled file")
  arrays = open_arrays(path, header)
  return {name: np.array(arrays[name]) for name in LABEL_ARRAYS}


def validate_file(path: str, *, labelled: bool, image_size: int | None = None, min_examples: int = 1,
                  value_sample: int = hdf5.DEFAULT_VALUE_SAMPLE) -> hdf5.FileInfo:
  """The checks of ``hdf5.validate_file`` on a sparse file, with the same one-line errors.

  Structure (offsets, array sizes) and labels are checked in full; positions and pixel values on
  ``value_sample`` images.
  """
  header = read_header(path)
  shape = header.get("image_shape")
  if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == shape[1]
          and shape[2] == hdf5.NUM_CHANNELS and (not image_size or shape[0] == image_size)):
    raise _fail(path, hdf5.IMAGE_KEY, f"expected images ({image_size or 'S'}, {image_size or 'S'}, "
                f"{hdf5.NUM_CHANNELS}), found {shape}")
  n = int(header["num_examples"])
  if n < min_examples:
    raise _fail(path, hdf5.IMAGE_KEY, f"has {n} examples, need at least {min_examples} (one batch)")
  expected = {"offsets": (n + 1,), **({name: (n,) for name in LABEL_ARRAYS} if labelled else {})}
  for name, array_shape in expected.items():
    if name not in header["arrays"]:
      reason = " (converted from an unlabelled file?)" if name in LABEL_ARRAYS else ""
      raise _fail(path, name, f"missing{reason}; found arrays {sorted(header['arrays'])}")
    if tuple(header["arrays"][name]["shape"]) != array_shape:
      raise _fail(path, name, f"expected shape {array_shape}, found {header['arrays'][name]['shape']}")
  arrays = open_arrays(path, header)
  offsets = np.asarray(arrays["offsets"])
  if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(arrays["values"]) \
      or len(arrays["positions"]) != len(arrays["values"]):
    raise _fail(path, "offsets", f"expected non-decreasing offsets from 0 to {len(arrays['values'])} "
                "(the number of stored values)")
  if labelled:
    hdf5.check_label_values(path, {name: np.asarray(arrays[name]) for name in LABEL_ARRAYS})
  pixels = int(np.prod(shape))
  nbytes = 0
  for i in hdf5.value_sample_indices(n, value_sample):
    start, stop = int(offsets[i]), int(offsets[i + 1])
    positions, values = arrays["positions"][start:stop], arrays["values"][start:stop]
    nbytes += positions.nbytes + values.nbytes
    if len(positions) and (int(positions.max()) >= pixels or np.any(np.diff(positions.astype(np.int64)) <= 0)):
      raise _fail(path, "positions", f"image {int(i)}: expected increasing pixel positions below {pixels}")
    hdf5.check_pixel_values(path, "values", values, int(i))
  return hdf5.FileInfo(path=path, num_examples=n, image_size=int(shape[0]), labelled=labelled,
                       bytes_read_for_values=nbytes)


class SparseSource(hdf5.LazyJetSource):
  """``hdf5.LazyJetSource`` over a sparse jet file: the records of ``hdf5.HDF5Source``, bit-identical.

  The memory maps are opened lazily in whichever process reads and dropped when pickled.
  """

  def __init__(self, path: str, *, labelled: bool, indices: Sequence[int] | None = None,
               labels: dict[str, np.ndarray] | None = None):
    header = read_header(path)
    self.image_shape = tuple(header["image_shape"])
    if labelled and labels is None:
      labels = read_labels(path)
    super().__init__(path, labelled=labelled, num_examples=int(header["num_examples"]),
                     indices=indices, labels=labels if labelled else None)

  def _open(self) -> dict[str, np.ndarray]:
    return open_arrays(self.path)

  def _read_image(self, arrays: dict[str, np.ndarray], index: int) -> np.ndarray:
    return dense_image(arrays, index, self.image_shape)

  def capacity(self) -> int:
    """Non-zeros per image of a padded batch: the file's maximum, rounded up to CAPACITY_MULTIPLE.

    The whole file's maximum (not this subset's), so every split and subset compiles the same shapes.
    """
    counts = np.diff(np.asarray(open_arrays(self.path)["offsets"]))
    largest = int(counts.max()) if len(counts) else 0
    return max(-(-largest // CAPACITY_MULTIPLE), 1) * CAPACITY_MULTIPLE

  def read_padded(self, record_keys: np.ndarray, capacity: int) -> dict[str, np.ndarray]:
    """The records at ``record_keys`` in padded sparse form, without densifying anything.

    ``positions`` (B, capacity) int32 flat positions within H·W·C, padded with H·W·C (outside every
    image, so a scatter with mode='drop' ignores them); ``values`` (B, capacity) float32 padded with 0;
    ``count`` (B,) int32; ``image_shape`` (3,); ``index`` and the labels as a dense batch has them.
    """
    if self._handle is None:
      self._handle = self._open()
    arrays, indices = self._handle, self.indices[np.asarray(record_keys, dtype=np.int64)]
    starts, stops = arrays["offsets"][indices], arrays["offsets"][indices + 1]
    positions = np.full((len(indices), capacity), np.prod(self.image_shape), np.int32)
    values = np.zeros((len(indices), capacity), np.float32)
    for row, (start, stop) in enumerate(zip(starts, stops)):  # contiguous copies, one per image
      positions[row, :stop - start] = arrays["positions"][start:stop]
      values[row, :stop - start] = arrays["values"][start:stop]
    batch = {"positions": positions, "values": values, "count": (stops - starts).astype(np.int32),
             "image_shape": np.asarray(self.image_shape), "index": indices.astype(np.int64)}
    if self._labels is not None:
      batch.update({k: v[indices] for k, v in self._labels.items()})
    return batch


class ReadPaddedBatch(grain.transforms.Map):
  """Grain map from a batch of record keys (positions in ``source``) to ``SparseSource.read_padded``,
  values divided by ``pixel_scale`` exactly as ``augment.ScalePixels`` divides dense images.

  Scaling happens here, on the host, because XLA compiles a division by a broadcast divisor into a
  multiplication by its reciprocal, which rounds differently. A value that scaling turns into ±0 in
  bits (an underflow) is dropped, so the entries are exactly the non-zero pixels of the scaled image.
  """

  def __init__(self, source: SparseSource, pixel_scale: float = 1.0):
    self.source = source
    self.capacity = source.capacity()
    self.pixel_scale = float(pixel_scale)

  def map(self, record_keys: np.ndarray) -> dict[str, np.ndarray]:
    batch = self.source.read_padded(record_keys, self.capacity)
    if self.pixel_scale == 1.0:
      return batch
    values = batch["values"] / np.float32(self.pixel_scale)
    kept = values.view(np.uint32) != 0  # padding (0) is never kept
    positions, counts = batch["positions"], batch["count"]
    for row in np.flatnonzero(kept.sum(axis=1) < counts):  # after an underflow only: compact the row
      count = int(kept[row].sum())
      positions[row, :count], values[row, :count] = positions[row, kept[row]], values[row, kept[row]]
      positions[row, count:], values[row, count:] = np.prod(self.source.image_shape), 0.0
      counts[row] = count
    return {**batch, "positions": positions, "values": values, "count": counts}
