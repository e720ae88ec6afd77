"""Readers of untrusted bytes never crash: mutated jet files and checkpoint metas load or fail in one line.

The ``.sparse`` reader (``data/sparse.py``: magic, header length, JSON header, offsets, positions), the
HDF5 validation (``data/hdf5.py``) and the checkpoint meta (``checkpoint/model_io.py``, ``integrity.py``)
read bytes that a user, a partial download or a bad disk hands them. Each test mutates a small valid
file (bit flips, truncations, forged lengths, offsets, counts, dtypes and shapes, garbage JSON) and
asserts the one invariant of ``_loads_or_refuses``: the input either loads correctly (validation passes
and every record reads) or fails with a ``errors.UserError`` whose message is one line. Any other
exception is a reader bug. No example may allocate more than ``MEMORY_LIMIT`` bytes (a forged length
must be checked against the file size before anything is allocated), hang (``HANG_SECONDS``: the process
dumps its stacks and exits, so a hang fails CI instead of stalling it), or write next to its input.

For a checkpoint, loading correctly means the restored model holds the saved arrays and the meta's
numbers are usable; XLA's allocations are not traced, so there an oversized model shows as XLA's
out-of-memory error (not a UserError) instead.

Budget: the examples are fixed (``derandomize=True``, no example database), so CI runs the same inputs
every time: about 1,500 mutated jet files in about 10 s and 56 checkpoint metas in about 15 s (a restore
takes 0.2-0.4 s), under 40 s for the file on 2 CPU cores, within the 60 s allowed for fuzzing in CI.
Every crash found is kept below as an ``@example`` or a plain test.
"""

import atexit
import contextlib
import faulthandler
import functools
import json
import os
import shutil
import tempfile
import tracemalloc

import h5py
import jax
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io
from l2vit_jax.data import hdf5, sparse

NUM_IMAGES = 6
IMAGE_SIZE = 5
MEMORY_LIMIT = 64 << 20  # bytes any example may allocate (numpy and Python); the files are ~10 kB
HANG_SECONDS = 120  # per example; they take milliseconds (a checkpoint restore: a second)


def fuzz_settings(max_examples: int):
  return settings(
    max_examples=max_examples,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


@contextlib.contextmanager
def _no_hang():
  faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()


def _listing(directory: str) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(root, name), directory)
    for root, dirs, files in os.walk(directory)
    for name in dirs + files
  )


def _loads_or_refuses(path: str, load) -> str | None:
  """Runs ``load(path)``; returns None when it loaded, the one-line message when it refused.

  Asserts the invariant every reader keeps: the only exception is a UserError with a one-line message,
  the peak allocation stays under MEMORY_LIMIT, and the input's directory holds what it held before.
  """
  directory = os.path.dirname(path)
  before = _listing(directory)
  tracemalloc.start()
  try:
    with _no_hang():
      load(path)
    message = None
  except errors.UserError as error:
    message = str(error)
    assert message and "\n" not in message, repr(message)
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  assert peak < MEMORY_LIMIT, f"allocated {peak} bytes"
  assert _listing(directory) == before
  return message


@contextlib.contextmanager
def _scratch_file(name: str, data: bytes):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
      f.write(data)
    yield path


# --- .sparse files --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _template_directory() -> str:
  directory = tempfile.mkdtemp(prefix="l2vit-fuzz-")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return directory


@functools.lru_cache(maxsize=None)
def sparse_bytes(labelled: bool) -> bytes:
  """A small valid sparse file (``sparse.convert_hdf5`` of a ``write_jet_file``), made once.

  Not a fixture: hypothesis prints every argument of a failing example, and 6 kB of bytes would bury
  the few values that matter.
  """
  directory = _template_directory()
  h5 = write_jet_file(
    os.path.join(directory, f"{labelled}.h5"), num=NUM_IMAGES, size=IMAGE_SIZE, labelled=labelled
  )
  out = os.path.join(directory, f"{labelled}{sparse.SUFFIX}")
  sparse.convert_hdf5(h5, out)
  with open(out, "rb") as f:
    return f.read()


def _load_sparse(labelled: bool):
  def load(path):
    info = sparse.validate_file(path, labelled=labelled, value_sample=NUM_IMAGES * 4)
    source = sparse.SparseSource(path, labelled=labelled)
    assert len(source) == info.num_examples
    for key in range(len(source)):
      image = source[key]["image"]
      assert image.shape == (info.image_size, info.image_size, hdf5.NUM_CHANNELS)
      assert np.isfinite(image).all() and (image >= 0).all()
    batch = sparse.ReadPaddedBatch(source, pixel_scale=2.0).map(np.arange(len(source)))
    assert batch["positions"].shape[0] == len(source)

  return load


def _header_end(data: bytes) -> int:
  return len(sparse.MAGIC) + 8 + int(np.frombuffer(data[len(sparse.MAGIC) : len(sparse.MAGIC) + 8], "<u8")[0])


def _with_header(data: bytes, header, length: int | None = None) -> bytes:
  """``data`` with its JSON header replaced by ``header`` (any JSON value) and, when given, a forged
  header length; the arrays stay at their bytes (a longer header overwrites the start of the first)."""
  encoded = json.dumps(header).encode()
  start = len(sparse.MAGIC)
  length = len(encoded) if length is None else length
  prefix = data[:start] + np.uint64(length % (1 << 64)).astype("<u8").tobytes() + encoded
  return prefix + data[len(prefix) :]


def _header(data: bytes) -> dict:
  return json.loads(data[len(sparse.MAGIC) + 8 : _header_end(data)])


JSON_SCALARS = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(-(1 << 70), 1 << 70),
  st.sampled_from(
    [
      0,
      1,
      -1,
      2,
      7,
      8,
      63,
      64,
      65,
      255,
      256,
      1 << 16,
      (1 << 31) - 1,
      1 << 31,
      1 << 32,
      (1 << 62),
      (1 << 63) - 1,
      1 << 63,
      1 << 64,
      10**30,
    ]
  ),
  st.floats(allow_nan=False, allow_infinity=False),
  st.text(max_size=6),
  st.sampled_from(
    [
      "<f4",
      "<i8",
      "<u2",
      "<i4",
      "|u1",
      "<f8",
      ">f4",
      ">i8",
      "|b1",
      "O",
      "|S3",
      "<c8",
      "V8",
      "<M8[s]",
      "<U2",
      "bogus",
      "",
    ]
  ),
)
JSON_VALUES = st.recursive(
  JSON_SCALARS,
  lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
  ),
  max_leaves=8,
)
ARRAY_NAMES = ("offsets", "positions", "values", *sparse.LABEL_ARRAYS)
HEADER_FIELDS = ("version", "num_examples", "image_shape", "labelled", "arrays", "format")


@st.composite
def forged_headers(draw):
  """(path into the header, new value or the marker 'delete'): one field forged."""
  if draw(st.booleans()):
    where = (draw(st.sampled_from(HEADER_FIELDS)),)
  else:
    where = (
      "arrays",
      draw(st.sampled_from(ARRAY_NAMES)),
      draw(st.sampled_from(("offset", "shape", "dtype", None))),
    )
  value = draw(
    st.one_of(JSON_VALUES, st.just("delete"), st.lists(st.integers(-3, 1 << 40), min_size=0, max_size=4))
  )
  return where, value


def _forge(header: dict, where: tuple, value) -> dict:
  node = header
  for key in where[:-1]:
    if not isinstance(node, dict) or key not in node:
      return header
    node = node[key]
  if where[-1] is None or not isinstance(node, dict):
    return header
  if value == "delete":
    node.pop(where[-1], None)
  else:
    node[where[-1]] = value
  return header


# Up to four (relative position, bit, inside the metadata/header?) flips of a file's bytes.
BIT_FLIPS = st.lists(
  st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7), st.booleans()), min_size=1, max_size=4
)


@fuzz_settings(300)
@given(labelled=st.booleans(), flips=BIT_FLIPS)
def test_sparse_files_with_flipped_bits_load_or_fail_in_one_line(labelled, flips):
  data = bytearray(sparse_bytes(labelled))
  header_end = _header_end(bytes(data))
  for where, bit, in_header in flips:  # half in the magic, length and header: most bytes are padding
    position = int(where * (header_end if in_header else len(data)))
    data[position] ^= 1 << bit
  with _scratch_file("flipped.sparse", bytes(data)) as path:
    _loads_or_refuses(path, _load_sparse(labelled))


def _data_end(data: bytes) -> int:
  """Where the last array of a sparse file ends (the writer pads the file to 64 bytes past it)."""
  return max(
    spec["offset"] + int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
    for spec in _header(data)["arrays"].values()
  )


@fuzz_settings(60)
@given(labelled=st.booleans(), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_sparse_files_fail_in_one_line_unless_only_padding_was_cut(labelled, keep):
  data = sparse_bytes(labelled)
  kept = int(keep * len(data))
  with _scratch_file("truncated.sparse", data[:kept]) as path:
    refused = _loads_or_refuses(path, _load_sparse(labelled))
  assert (refused is not None) == (kept < _data_end(data)), refused


# Crashes of the reader before its header checks, one example each (found by this test and by forging
# every field with the values of JSON_SCALARS in turn):
@example(labelled=True, forged=[(("arrays", "offsets", "dtype"), "O")], length=None)  # segfault: a
#   memory-mapped object array dereferences the file's bytes as pointers
@example(labelled=False, forged=[(("image_shape",), [100000, 100000, 8])], length=None)  # MemoryError:
#   a 298 GiB dense image allocated from the forged shape (2000 × 2000: 244 MiB, over MEMORY_LIMIT)
@example(labelled=True, forged=[(("arrays", "positions", "shape"), [1 << 62, 1 << 62])], length=None)
#   ValueError "array is too big" from np.memmap (the size check multiplied the shape in int64)
@example(labelled=True, forged=[(("arrays", "offsets", "offset"), -1)], length=None)  # OverflowError
@example(labelled=True, forged=[(("arrays", "positions", "dtype"), "|S3")], length=None)  # UFuncTypeError
@example(labelled=True, forged=[(("arrays", "label", "dtype"), "|S3")], length=None)  # ValueError
@example(labelled=True, forged=[(("arrays", "values", "shape"), "x")], length=None)  # UFuncTypeError
@example(labelled=True, forged=[(("arrays", "offsets", "dtype"), [1, 2])], length=None)  # TypeError
@example(labelled=False, forged=[(("arrays",), None)], length=None)  # AttributeError
@example(labelled=False, forged=[(("arrays", "values", "shape"), "delete")], length=None)  # KeyError
@example(labelled=False, forged=[(("num_examples",), "x")], length=None)  # ValueError from int()
@example(labelled=True, forged=[(("labelled",), "delete")], length=None)  # KeyError
@example(labelled=False, forged=[(("image_shape",), [-5, -5, 8])], length=None)  # ValueError (reshape)
@fuzz_settings(400)
@given(
  labelled=st.booleans(),
  forged=st.lists(forged_headers(), min_size=1, max_size=3),
  length=st.one_of(st.none(), st.integers(0, 1 << 64), st.sampled_from([0, 1, 1 << 63, (1 << 64) - 1])),
)
def test_sparse_files_with_forged_headers_load_or_fail_in_one_line(labelled, forged, length):
  data = sparse_bytes(labelled)
  header = _header(data)
  for where, value in forged:
    header = _forge(header, where, value)
  with _scratch_file("forged.sparse", _with_header(data, header, length)) as path:
    _loads_or_refuses(path, _load_sparse(labelled))


@fuzz_settings(200)
@given(
  labelled=st.booleans(),
  name=st.sampled_from(ARRAY_NAMES),
  index=st.integers(0, 1 << 20),
  value=st.one_of(
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.sampled_from([-1, 0, 1, 24, 25, 199, 200, 201, 1 << 16, (1 << 16) - 1, 1 << 40]),
  ),
)
def test_sparse_files_with_forged_offsets_positions_and_labels_load_or_fail_in_one_line(
  labelled, name, index, value
):
  data = bytearray(sparse_bytes(labelled))
  spec = _header(bytes(data))["arrays"].get(name)
  if spec is None:
    return
  dtype = np.dtype(spec["dtype"])
  count = int(np.prod(spec["shape"]))
  if count == 0:
    return
  start = spec["offset"] + (index % count) * dtype.itemsize
  info = np.iinfo(dtype) if dtype.kind in "iu" else None
  forged = np.array(value if info is None else min(max(value, info.min), info.max)).astype(dtype)
  data[start : start + dtype.itemsize] = forged.tobytes()
  with _scratch_file("forged.sparse", bytes(data)) as path:
    _loads_or_refuses(path, _load_sparse(labelled))


def test_a_sparse_header_nested_deeper_than_python_recurses_fails_in_one_line():
  data = sparse_bytes(False)
  nested = b"[" * 100_000  # json.loads raises RecursionError, not ValueError
  forged = data[: len(sparse.MAGIC)] + np.uint64(len(nested)).astype("<u8").tobytes() + nested
  with _scratch_file("nested.sparse", forged + data[len(forged) :]) as path:
    assert "unreadable header" in _loads_or_refuses(path, _load_sparse(False))


def test_the_unmutated_sparse_files_load():
  for labelled in (True, False):
    with _scratch_file("valid.sparse", sparse_bytes(labelled)) as path:
      assert _loads_or_refuses(path, _load_sparse(labelled)) is None


# --- HDF5 jet files ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def hdf5_bytes(labelled: bool) -> bytes:
  """A small valid HDF5 jet file (``write_jet_file``), made once."""
  path = write_jet_file(
    os.path.join(_template_directory(), f"{labelled}-template.h5"),
    num=NUM_IMAGES,
    size=IMAGE_SIZE,
    labelled=labelled,
  )
  with open(path, "rb") as f:
    return f.read()


def _hdf5_metadata_end(data: bytes) -> int:
  """Where the first dataset's values start: the superblock and object headers lie before it."""
  with _scratch_file("template.h5", data) as path, h5py.File(path, "r") as f:
    return min(f[key].id.get_offset() for key in f)


def _load_hdf5(labelled: bool):
  def load(path):
    info = hdf5.validate_file(path, labelled=labelled, value_sample=NUM_IMAGES * 4)
    source = hdf5.HDF5Source(path, labelled=labelled)
    assert len(source) == info.num_examples
    for key in range(len(source)):
      record = source[key]
      assert record["image"].shape == (info.image_size, info.image_size, hdf5.NUM_CHANNELS)
      assert np.isfinite(record["image"]).all() and (record["image"] >= 0).all()
      if labelled:
        assert record["label"] in (0, 1) and record["mass"] > 0

  return load


def _hdf5_flip(byte: int, bit: int) -> list:
  """The ``flips`` of one bit of the labelled template's metadata (its first 2048 bytes)."""
  return [(byte / 2048, bit, True)]


# Crashes of the validation before it reported h5py's errors, found by flipping bits 0, 3 and 7 of every
# metadata byte in turn (byte positions of the h5py 3.16 / HDF5 1.14 layout that constraints.txt pins):
@example(labelled=True, flips=_hdf5_flip(25, 3))  # KeyError 'Unable to synchronously open object'
@example(labelled=True, flips=_hdf5_flip(688, 3))  # RuntimeError '... check link existence (... free list)'
@example(labelled=True, flips=_hdf5_flip(921, 7))  # ValueError 'Insufficient precision in available types'
@example(labelled=True, flips=_hdf5_flip(720, 7))  # TypeError: a link name read as bytes, sorted with str
@example(labelled=True, flips=_hdf5_flip(1078, 0))  # RuntimeError 'Link iteration failed'
@example(labelled=True, flips=_hdf5_flip(142, 3))  # RuntimeError 'Unable to get group info'
@example(labelled=True, flips=_hdf5_flip(1761, 0))  # loaded masses of 0: 'm' read as float64 (1e-75)
@fuzz_settings(300)
@given(labelled=st.booleans(), flips=BIT_FLIPS)
def test_hdf5_files_with_flipped_bits_load_or_fail_in_one_line(labelled, flips):
  data = bytearray(hdf5_bytes(labelled))
  metadata_end = _hdf5_metadata_end(bytes(data))
  for where, bit, in_metadata in flips:
    data[int(where * (metadata_end if in_metadata else len(data)))] ^= 1 << bit
  with _scratch_file("flipped.h5", bytes(data)) as path:
    _loads_or_refuses(path, _load_hdf5(labelled))


@fuzz_settings(60)
@given(labelled=st.booleans(), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_hdf5_files_fail_in_one_line(labelled, keep):
  data = hdf5_bytes(labelled)
  with _scratch_file("truncated.h5", data[: int(keep * len(data))]) as path:
    assert _loads_or_refuses(path, _load_hdf5(labelled)) is not None


DTYPES = st.sampled_from(
  [
    np.float32,
    np.float64,
    np.float16,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
    np.complex64,
    "S4",
    ">f4",
    [("a", "<f4"), ("b", "<i4")],
  ]
)


@st.composite
def swapped_datasets(draw):
  """{key: array} replacing one or more datasets of a valid file with another dtype and/or shape."""
  swapped = {}
  for key in draw(st.lists(st.sampled_from(["jet", "Y", "m", "pT"]), min_size=1, max_size=2, unique=True)):
    n = draw(st.sampled_from([NUM_IMAGES, 0, 1, NUM_IMAGES + 1]))
    if key == "jet":
      side = draw(st.sampled_from([IMAGE_SIZE, 1, 4]))
      shape = draw(
        st.sampled_from(
          [
            (n, side, side, 8),
            (n, side, side + 1, 8),
            (n, side, side, 3),
            (n, side, side),
            (n, side, side, 8, 1),
            (n,),
            (),
          ]
        )
      )
    else:
      shape = draw(st.sampled_from([(n, 1), (n,), (n, 2), (n, 1, 1), ()]))
    values = draw(st.sampled_from([0.0, 1.0, 2.0, -1.0, np.nan, np.inf, 1e30]))
    dtype = np.dtype(draw(DTYPES))
    array = np.zeros(shape, dtype)
    if dtype.names is None and dtype.kind in "fc":
      array[...] = values
    swapped[key] = array
  return swapped


@fuzz_settings(150)
@given(labelled=st.booleans(), swapped=swapped_datasets())
def test_hdf5_files_with_swapped_dtypes_and_shapes_load_or_fail_in_one_line(labelled, swapped):
  with tempfile.TemporaryDirectory() as directory:
    path = write_jet_file(
      os.path.join(directory, "swapped.h5"),
      num=NUM_IMAGES,
      size=IMAGE_SIZE,
      labelled=labelled,
      overrides=swapped,
    )
    _loads_or_refuses(path, _load_hdf5(labelled))


def test_hdf5_labels_are_validated_at_the_float32_precision_they_are_read_with(tmp_path):
  """A float64 mass of 1e-75 is positive but reads as 0.0, and a pT of 1e300 as inf: both refused."""
  for key, value in (("m", 1e-75), ("pT", 1e300)):
    path = write_jet_file(
      tmp_path / f"{key}.h5",
      num=NUM_IMAGES,
      size=IMAGE_SIZE,
      overrides={key: np.full((NUM_IMAGES, 1), value, np.float64)},
    )
    assert f"key '{key}': expected finite" in _loads_or_refuses(path, _load_hdf5(True))


def test_the_unmutated_hdf5_files_load():
  for labelled in (True, False):
    with _scratch_file("valid.h5", hdf5_bytes(labelled)) as path:
      assert _loads_or_refuses(path, _load_hdf5(labelled)) is None


# --- checkpoint meta --------------------------------------------------------------------------------

MODEL_CONFIG = {
  "attention": "linear",
  "depth": 1,
  "drop_path_rate": 0.0,
  "drop_rate": 0.0,
  "dtype": "float32",
  "embed_dim": 32,
  "img_size": 25,
  "in_channels": 8,
  "lcm_kernel": 7,
  "mlp_ratio": 2.0,
  "num_classes": 2,
  "num_heads": 2,
  "patch_size": 5,
}
META_FILE = os.path.join("best", "0", "meta", "metadata")  # Orbax's JsonSave of the ``meta`` item


@functools.lru_cache(maxsize=None)
def checkpoint_template() -> tuple[str, dict]:
  """A model-only checkpoint of a tiny L2ViT (``model_io.save_model_checkpoint``), made once, and its
  arrays (what a correct load must give back)."""
  from l2vit_jax.checkpoint import naming  # pylint: disable=import-outside-toplevel
  from l2vit_jax.models import build  # pylint: disable=import-outside-toplevel

  model = build.build_l2vit(MODEL_CONFIG)
  directory = os.path.join(_template_directory(), "checkpoint")
  model_io.save_model_checkpoint(
    directory,
    model,
    {
      "task": "finetune",
      "model_config": MODEL_CONFIG,
      "pixel_scale": 2.0,
      "mass_mean": 150.0,
      "mass_std": 40.0,
    },
  )
  return directory, jax.tree.map(np.asarray, naming.model_arrays(model))


@contextlib.contextmanager
def _checkpoint_with_meta(data: bytes):
  """A copy of the template checkpoint whose meta file holds ``data``."""
  with tempfile.TemporaryDirectory() as scratch:
    workdir = os.path.join(scratch, "run")
    shutil.copytree(checkpoint_template()[0], workdir)
    with open(os.path.join(workdir, META_FILE), "wb") as f:
      f.write(data)
    yield workdir


def _template_meta() -> dict:
  with open(os.path.join(checkpoint_template()[0], META_FILE), "rb") as f:
    return json.load(f)


def _load_checkpoint(workdir):
  """What evaluation, export and the probes read: the whole model, the meta alone, the backbone."""
  from l2vit_jax.checkpoint import naming  # pylint: disable=import-outside-toplevel

  model, meta = model_io.restore_model_checkpoint(workdir)
  expected = checkpoint_template()[1]
  restored = naming.model_arrays(model)
  for group, arrays in expected.items():
    for name, value in arrays.items():
      np.testing.assert_array_equal(np.asarray(restored[group][name]), value, err_msg=name)
  for key in ("pixel_scale", "mass_mean", "mass_std"):
    if key in meta and (meta[key] is not None or key == "pixel_scale"):
      assert isinstance(meta[key], (int, float)) and np.isfinite(meta[key]), (key, meta[key])
  assert model_io.read_model_meta(workdir) == meta
  model_io.restore_backbone(workdir)


META_KEYS = ("task", "model_config", "pixel_scale", "mass_mean", "mass_std", "digests")
SIZES = st.sampled_from([0, -1, 1, 2, 3, 31, 33, 64, 1 << 20, 1 << 40, 10**12, 2.5, True, None, "32"])


DIGEST_NAMES = (
  "model/params/pos_embed",
  "model/params/cls_head/kernel",
  "model/batch_stats/blocks/0/lcm/bn/var",
)
FORGERIES = st.one_of(
  st.tuples(st.just(()), st.sampled_from(META_KEYS)),
  st.tuples(st.just(("model_config",)), st.sampled_from([*MODEL_CONFIG, "unknown_argument"])),
  st.tuples(st.just(("digests",)), st.sampled_from(DIGEST_NAMES)),
)


def _forged_meta(forgeries) -> dict | object:
  """The template's meta with each (parent keys, key, value) applied; ``value`` 'delete' removes the
  key, and parent keys () with key None replace the whole meta by ``value``."""
  meta = _template_meta()
  for (parents, key), value in forgeries:
    if not parents and key is None:
      meta = value
      continue
    node = meta
    for parent in parents:
      node = node.get(parent) if isinstance(node, dict) else None
    if isinstance(node, dict):
      if value == "delete":
        node.pop(key, None)
      else:
        node[key] = value
  return meta


# Crashes of the restore before its meta checks, one example each (found by this test):
@example(forgeries=[(((), None), [1, 2])])  # TypeError from dict(meta): a JSON list as the meta
@example(forgeries=[(((), "digests"), 0)])  # AttributeError: 'int' object has no attribute 'items'
@example(forgeries=[(((), "model_config"), "delete")])  # KeyError 'model_config'
@example(forgeries=[(((), "model_config"), "0")])  # ValueError from L2ViT(**"0")
@example(forgeries=[((("model_config",), "unknown_argument"), None)])  # TypeError: unexpected argument
@example(forgeries=[((("model_config",), "patch_size"), None)])  # TypeError in the constructor
@example(forgeries=[((("model_config",), "attention"), None)])  # ValueError: unknown attention
@example(forgeries=[((("model_config",), "depth"), 10**12)])  # MemoryError: 7.28 TiB for np.linspace(depth)
@example(forgeries=[((("model_config",), "num_classes"), 10**12)])  # JaxRuntimeError: out of memory, 4 TB
#   for the class head (XLA's allocator, which tracemalloc does not see)
@example(forgeries=[(((), "pixel_scale"), None)])  # loaded, but predict would divide by None
@example(forgeries=[(((), "mass_std"), "40")])  # loaded, but predict would multiply by a string
@fuzz_settings(30)
@given(
  forgeries=st.lists(
    st.tuples(FORGERIES, st.one_of(JSON_VALUES, SIZES, st.just("delete"))), min_size=1, max_size=3
  )
  | st.lists(st.tuples(st.just(((), None)), JSON_VALUES), min_size=1, max_size=1)
)
def test_checkpoints_with_forged_metas_load_or_fail_in_one_line(forgeries):
  with _checkpoint_with_meta(json.dumps(_forged_meta(forgeries)).encode()) as workdir:
    _loads_or_refuses(workdir, _load_checkpoint)


@fuzz_settings(15)
@given(
  flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3),
  keep=st.one_of(st.none(), st.floats(0, 1)),
)
def test_checkpoints_with_damaged_meta_bytes_load_or_fail_in_one_line(flips, keep):
  data = bytearray(json.dumps(_template_meta()).encode())
  for where, bit in flips:
    data[int(where * len(data))] ^= 1 << bit
  with _checkpoint_with_meta(bytes(data[: None if keep is None else int(keep * len(data))])) as workdir:
    _loads_or_refuses(workdir, _load_checkpoint)


def test_the_unmutated_checkpoint_loads():
  with _checkpoint_with_meta(json.dumps(_template_meta()).encode()) as workdir:
    assert _loads_or_refuses(workdir, _load_checkpoint) is None
