"""Performance work: depthwise formulations agree, the sparse format is lossless, the allocator reuses memory.

Figures are never asserted (timings depend on the machine); only correctness and the report's shape.
"""

import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import write_jet_file
from l2vit_jax.data import hdf5, pipeline, sources, sparse, synthetic
from l2vit_jax import errors
from l2vit_jax.models import depthwise, l2vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMULATIONS = depthwise.IMPLEMENTATIONS[1:]


# --- depthwise convolution formulations --------------------------------------------------------------


def _conv_outputs(implementation, x, kernel, bias, cotangent):
  def conv(x, kernel, bias):
    return depthwise.depthwise_conv2d(
      x, kernel, bias, implementation=implementation, precision=jax.lax.Precision.HIGHEST
    )

  loss = lambda x, kernel, bias: jnp.sum(conv(x, kernel, bias).astype(jnp.float32) * cotangent)
  return (jax.jit(conv)(x, kernel, bias), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, kernel, bias))


@pytest.mark.parametrize("shape,kernel_size", [((2, 5, 6, 16), 7), ((3, 9, 7, 8), 3)])
def test_depthwise_formulations_agree_forward_and_gradients(shape, kernel_size):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 1, shape[-1]))
  bias = jax.random.normal(keys[2], (shape[-1],))
  cotangent = jax.random.normal(keys[3], shape)
  reference = _conv_outputs("lax", x, kernel, bias, cotangent)
  for implementation in FORMULATIONS[1:]:
    outputs = _conv_outputs(implementation, x, kernel, bias, cotangent)
    for name, got, want in zip(("output", "d_x", "d_kernel", "d_bias"), outputs, reference):
      assert got.shape == want.shape and got.dtype == want.dtype, (implementation, name)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{implementation} {name}")


def test_lcm_forward_on_cpu_computes_each_depthwise_convolution_once():
  # Unrolled over its 49 taps, XLA:CPU fused a copy of the sum into GELU, BatchNorm and the pad (four
  # or five convolutions for the LCM's two, each showing as the first tap's window sliced out of
  # the padded input); the loop over taps leaves one loop per convolution and no such copy.
  lcm = l2vit.LocalConcentration(16, 7, rngs=nnx.Rngs(0))
  lcm.eval()
  graphdef, state = nnx.split(lcm)
  x = jax.random.normal(jax.random.key(0), (4, 36, 16))
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, (6, 6)))
  hlo = forward.lower(state, x).compile().as_text()
  assert not re.findall(r"slice\([^)]*\), slice=\{\[0:4\], \[0:6\], \[0:6\], \[0:16\]\}", hlo)
  assert len(re.findall(r"= \([^=]*\) while\(", hlo)) == 2
  reference = lcm.conv2(lcm.bn(l2vit.gelu(lcm.conv1(x.reshape(4, 6, 6, 16))))).reshape(4, 36, 16)
  np.testing.assert_allclose(forward(state, x), reference, rtol=1e-6, atol=1e-6)


def test_depthwise_custom_vjp_in_bfloat16_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 1, 8)).astype(jnp.bfloat16)
  cotangent = jnp.ones(x.shape, jnp.float32)
  fast = _conv_outputs("shifted_adds_vjp", x, kernel, None, cotangent)[:3]
  exact = _conv_outputs("lax", x.astype(jnp.float32), kernel.astype(jnp.float32), None, cotangent)[:3]
  for got, want in zip(fast, exact):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=5e-2)


def test_auto_picks_per_backend():
  assert depthwise.resolve_implementation("auto", "cpu") == "shifted_adds_vjp"
  assert depthwise.resolve_implementation("auto", "gpu") == "lax"
  assert depthwise.resolve_implementation("auto", "tpu") == "lax"
  assert depthwise.resolve_implementation("row_scan") == "row_scan"
  with pytest.raises(ValueError, match="unknown depthwise implementation"):
    depthwise.resolve_implementation("fft")


# --- compact sparse format ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sparse")
  h5_path = str(directory / "jets.h5")
  synthetic.write_synthetic_hdf5(h5_path, 24, image_size=25, seed=3)
  sparse_path = str(directory / "jets.sparse")
  summary = sparse.convert_hdf5(h5_path, sparse_path, chunk_size=5)  # chunks split the file unevenly
  return h5_path, sparse_path, summary


def _assert_same_records(a: dict, b: dict):
  assert a.keys() == b.keys()
  for key in a:
    assert type(a[key]) is type(b[key]) and np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
    assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key  # bit-exact


def test_sparse_round_trip_is_bit_exact(synthetic_files):
  h5_path, sparse_path, summary = synthetic_files
  assert summary["num_examples"] == 24 and summary["labelled"]
  dense = hdf5.HDF5Source(h5_path, labelled=True)
  compact = pickle.loads(pickle.dumps(sources.open_source(sparse_path, labelled=True)))
  assert isinstance(compact, sparse.SparseSource) and len(compact) == len(dense)
  for i in range(len(dense)):
    _assert_same_records(dense[i], compact[i])
  restricted = sources.open_source(sparse_path, labelled=False, indices=[7, 2])
  _assert_same_records(restricted[1], hdf5.HDF5Source(h5_path, labelled=False, indices=[7, 2])[1])


def test_sparse_keeps_negative_zero_and_unlabelled_files(tmp_path):
  jet = np.zeros((3, 25, 25, 8), np.float32)
  jet[0, 1, 2, 3] = -0.0
  jet[2, 24, 24, 7] = 255.0
  path = write_jet_file(tmp_path / "u.h5", num=3, labelled=False, overrides={"jet": jet})
  out = str(tmp_path / "u.sparse")
  assert not sparse.convert_hdf5(path, out)["labelled"]
  source = sources.open_source(out, labelled=False)
  for i in range(3):
    assert source[i]["image"].tobytes() == jet[i].tobytes()
  with pytest.raises(errors.DataError, match="u.sparse: key 'label': missing"):
    sources.validate_file(out, labelled=True)


def test_pipelines_yield_identical_batches_from_either_format(synthetic_files):
  h5_path, sparse_path, _ = synthetic_files
  for make in (
    lambda s: pipeline.make_train_dataset(s, batch_size=4, seed=1, augmentation="physics"),
    lambda s: pipeline.make_eval_dataset(s, batch_size=5, pixel_scale=255.0),
  ):
    from_h5 = iter(make(sources.open_source(h5_path, labelled=True, indices=np.arange(3, 20))))
    from_sparse = iter(make(sources.open_source(sparse_path, labelled=True, indices=np.arange(3, 20))))
    for _ in range(4):
      _assert_same_records(next(from_h5), next(from_sparse))


def test_sparse_validation_errors_name_file_and_key(tmp_path, synthetic_files):
  _, sparse_path, _ = synthetic_files
  info = sources.validate_file(sparse_path, labelled=True, image_size=25)
  assert (info.num_examples, info.image_size) == (24, 25)
  assert sources.read_labels(sparse_path)["label"].dtype == np.int32
  with pytest.raises(errors.DataError, match=r"jets.sparse: key 'jet': expected images \(32, 32, 8\)"):
    sources.validate_file(sparse_path, labelled=True, image_size=32)
  truncated = tmp_path / "truncated.sparse"
  truncated.write_bytes(open(sparse_path, "rb").read()[:-100])
  with pytest.raises(errors.DataError, match=r"truncated.sparse: key '\w+': extends to byte"):
    sources.validate_file(str(truncated), labelled=True)
  not_sparse = tmp_path / "x.sparse"
  not_sparse.write_bytes(b"hello")
  with pytest.raises(errors.DataError, match="x.sparse: not an l2vit_jax sparse jet file"):
    sources.open_source(str(not_sparse), labelled=False)
  bad_labels = write_jet_file(tmp_path / "bad.h5", overrides={"Y": np.full((40, 1), 2.0, np.float32)})
  with pytest.raises(errors.DataError, match="bad.h5: key 'Y'"):  # the input is validated first
    sparse.convert_hdf5(bad_labels, str(tmp_path / "bad.sparse"))
  assert not os.path.exists(tmp_path / "bad.sparse")


def test_prepare_data_script(tmp_path):
  path = write_jet_file(tmp_path / "in.h5", num=6)
  out = tmp_path / "out.sparse"
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "prepare_data.py"),
      "--input",
      path,
      "--output",
      str(out),
      "--chunk-size",
      "4",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert sources.validate_file(str(out), labelled=True).num_examples == 6
  assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


# --- the host allocator ------------------------------------------------------------------------------

_SECOND_ALLOCATION_FAULTS = """
import json, resource
from l2vit_jax.runtime import process_setup
tuned = process_setup.configure_allocator()  # before numpy starts its threads, as main.py does
import numpy as np
block = np.ones(64 << 20, np.float32)  # 256 MiB, written: every page faulted in once
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = np.ones(64 << 20, np.float32)
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.parametrize("opt_out", ["", "1"])
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again(opt_out):
  """A train step's temporaries are one multi-GB block per step; glibc by default maps it fresh each
  time, and faulting it in cost about a third of the CPU step (docs/performance.md)."""
  env = dict(
    os.environ, PYTHONPATH=REPO, L2VIT_NO_MALLOC_TUNING=opt_out, NUMPY_MADVISE_HUGEPAGE="0"
  )  # count 4 KiB pages, whatever the kernel's THP setting
  result = subprocess.run(
    [sys.executable, "-c", _SECOND_ALLOCATION_FAULTS],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  measured = json.loads(result.stdout)
  pages = (256 << 20) // 4096
  if not opt_out and not measured["tuned"]:
    pytest.skip("not Linux with glibc: mallopt is unavailable and the allocator is left alone")
  if opt_out:
    assert not measured["tuned"] and measured["faults"] > pages // 2, measured
  else:
    assert measured["faults"] < pages // 100, measured
