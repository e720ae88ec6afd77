"""Exported models (``interop/export.py``, ``scripts/export.py``) predict what ``evaluate.predict`` does.

One tiny finetuned checkpoint (25×25 images, depth 1, dim 32; every weight and BatchNorm statistic
random, so that no output is a trivial constant) is exported once to both formats. The jax.export
artifact is reloaded with ``jax.export.deserialize`` and the ONNX file run with onnxruntime, each at two
batch sizes, and both must give the class-1 probabilities and the masses in GeV of ``evaluate.predict``
on the same jets to 1e-4 (masses: 1e-4 of the mass standard deviation, the scale the network regresses
in; a mass of ~150 GeV carries float32 rounding of ~1e-5 GeV already).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import write_jet_file
from l2vit_jax.checkpoint import model_io
from l2vit_jax.data import hdf5
from l2vit_jax.evaluation import evaluate
from l2vit_jax.interop import export
from l2vit_jax.models import build
from l2vit_jax.runtime import sharding

onnxruntime = pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e '.[export]'")
pytest.importorskip("jax2onnx", reason="needs the export extra: pip install -e '.[export]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
META = {
  "task": "finetune",
  "model_config": MODEL_CONFIG,
  "pixel_scale": 4.0,
  "mass_mean": 150.0,
  "mass_std": 40.0,
}
NUM_JETS = 13  # two batch sizes below: all 13 (not a multiple of the prediction batch) and 5
TOLERANCE = 1e-4


def _randomise(model: nnx.Module) -> None:
  """Random parameters (0.3 around their initial values) and BatchNorm statistics (variances stay > 0)."""
  rng = np.random.default_rng(0)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype), params))
  stats = nnx.state(model, nnx.BatchStat)
  nnx.update(model, jax.tree.map(lambda x: x + rng.uniform(0, 0.5, x.shape).astype(x.dtype), stats))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(checkpoint workdir, export directory, sidecar, jet file, our predictions on its jets)."""
  root = tmp_path_factory.mktemp("export")
  workdir = str(root / "finetuned")
  model = build.build_l2vit(MODEL_CONFIG)
  _randomise(model)
  model_io.save_model_checkpoint(workdir, model, META)
  jets = write_jet_file(root / "jets.h5", num=NUM_JETS, size=25)
  restored, meta = model_io.restore_model_checkpoint(workdir)
  ours = evaluate.predict(
    restored, hdf5.HDF5Source(jets, labelled=False), meta, batch_size=8, mesh=sharding.make_mesh()
  )
  output = str(root / "export")
  sidecar = export.export_checkpoint(workdir, output)
  return workdir, output, sidecar, jets, ours


def _images(jets: str) -> np.ndarray:
  with hdf5.open_hdf5(jets) as f:
    return f[hdf5.IMAGE_KEY][...]


def _assert_equals_ours(prob, mass, ours, n):
  np.testing.assert_allclose(np.asarray(prob), ours["prob"][:n], rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(
    np.asarray(mass), ours["mass_pred"][:n], rtol=0, atol=TOLERANCE * META["mass_std"]
  )


def test_our_predictions_are_not_trivial(exported):
  ours = exported[4]
  assert np.ptp(ours["prob"]) > 0.01 and np.ptp(ours["mass_pred"]) > 1.0  # so the comparisons can fail


def test_the_jax_export_artifact_predicts_like_us_at_two_batch_sizes(exported):
  _, output, _, jets, ours = exported
  with open(os.path.join(output, export.JAX_FILE), "rb") as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  assert restored.platforms == export.JAX_PLATFORMS
  assert not isinstance(restored.in_avals[0].shape[0], int)  # the symbolic batch dimension
  images = _images(jets)
  for n in (NUM_JETS, 5):
    prob, mass = restored.call(images[:n])
    assert prob.shape == mass.shape == (n,) and prob.dtype == mass.dtype == np.float32
    _assert_equals_ours(prob, mass, ours, n)


def test_the_onnx_model_predicts_like_us_at_two_batch_sizes(exported):
  _, output, sidecar, jets, ours = exported
  session = onnxruntime.InferenceSession(
    os.path.join(output, export.ONNX_FILE), providers=["CPUExecutionProvider"]
  )
  (given,) = session.get_inputs()
  assert given.name == export.INPUT_NAME and given.shape == ["batch", 25, 25, 8]
  assert given.type == "tensor(float)"
  assert [o.name for o in session.get_outputs()] == list(export.OUTPUT_NAMES)
  images = _images(jets)
  for n in (NUM_JETS, 5):
    prob, mass = session.run(list(export.OUTPUT_NAMES), {export.INPUT_NAME: images[:n]})
    assert prob.shape == mass.shape == (n,) and prob.dtype == mass.dtype == np.float32
    _assert_equals_ours(prob, mass, ours, n)
  assert sidecar["files"]["onnx"]["max_abs_difference_to_jax"] <= TOLERANCE


def test_the_exported_depthwise_convolutions_are_onnx_grouped_convolutions(exported):
  import onnx  # pylint: disable=import-outside-toplevel

  graph = onnx.load(os.path.join(exported[1], export.ONNX_FILE)).graph
  groups = [a.i for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "group"]
  assert groups == [MODEL_CONFIG["embed_dim"]] * 2  # the LCM's two depthwise convolutions


def test_the_sidecar_records_the_meta_the_files_and_the_io(exported):
  workdir, output, sidecar, _, _ = exported
  with open(os.path.join(output, export.SIDECAR_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(sidecar))
  assert {k: sidecar[k] for k in ("pixel_scale", "mass_mean", "mass_std", "model_config")} == {
    k: META[k] for k in ("pixel_scale", "mass_mean", "mass_std", "model_config")
  }
  assert sidecar["checkpoint"] == workdir
  assert (
    sorted(sidecar["files"]) == ["jax", "onnx"] and sidecar["files"]["onnx"]["opset"] == export.ONNX_OPSET
  )
  assert sidecar["input"]["shape"] == ["batch", 25, 25, 8]
  assert [o["name"] for o in sidecar["outputs"]] == list(export.OUTPUT_NAMES)
  assert sorted(os.listdir(output)) == sorted([export.JAX_FILE, export.ONNX_FILE, export.SIDECAR_FILE])


def test_a_pretraining_checkpoint_is_refused_in_one_line(tmp_path):
  workdir = str(tmp_path / "simclr-like")
  model_io.save_model_checkpoint(
    workdir, build.build_l2vit(MODEL_CONFIG), dict(META, task="simclr", mass_mean=None, mass_std=None)
  )
  with pytest.raises(export.ExportError, match="not a finetuned checkpoint") as refused:
    export.export_checkpoint(workdir, str(tmp_path / "out"))
  assert "\n" not in str(refused.value)
  assert not os.path.exists(tmp_path / "out")


def test_without_the_converter_the_jax_artifact_is_still_written_and_the_error_is_one_line(
  exported, tmp_path, monkeypatch
):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` raises ImportError
  output = tmp_path / "out"
  with pytest.raises(export.ExportError, match=r"needs jax2onnx .*\[export\]") as refused:
    export.export_checkpoint(exported[0], str(output))
  assert "\n" not in str(refused.value)
  assert sorted(os.listdir(output)) == sorted([export.JAX_FILE, export.SIDECAR_FILE])
  assert list(json.loads((output / export.SIDECAR_FILE).read_text())["files"]) == ["jax"]


def test_the_export_script_reports_a_missing_checkpoint_in_one_line(tmp_path):
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "export.py"), f"--workdir={tmp_path / 'nothing'}"],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "no Orbax checkpoint found" in lines[0]
  assert result.stdout == ""
