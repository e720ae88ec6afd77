"""PyTorch original → NNX: checkpoint import and numerical parity with the PyTorch reference model."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch: pip install torch")

from conftest import randomise_torch_module  # pylint: disable=wrong-import-position
from l2vit_jax import models  # pylint: disable=wrong-import-position
from l2vit_jax.interop import torch_reference  # pylint: disable=wrong-import-position
from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.interop import torch_import  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  in_channels=8,
  img_size=25,
  patch_size=5,
  embed_dim=32,
  depth=2,
  num_heads=2,
  mlp_ratio=2.0,
  num_classes=3,
  lcm_kernel=5,
)
EXPECTED_CONFIG = dict(TINY)  # everything in TINY is readable off the tensor shapes
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  # On GPU, XLA's default float32 matmul/conv precision may use TF32 (10-bit mantissa), which alone
  # breaks 1e-4 parity; on CPU this is a no-op. The linear attention is HIGHEST regardless.
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def torch_models():
  generator = torch.Generator().manual_seed(0)
  model = randomise_torch_module(torch_reference.build_torch_l2vit(**TINY), generator)
  projector = randomise_torch_module(
    torch_reference.build_torch_projector(in_dim=32, hidden_dim=32, out_dim=16), generator
  )
  return model, projector


@pytest.fixture(scope="module")
def finetuned_checkpoint(torch_models, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("torch") / "finetuned.pt")
  history = {
    name: [1.0, 0.5] for name in ("train_loss", "val_loss", "train_acc", "val_acc", "train_mae", "val_mae")
  }
  torch.save(
    {
      "model_state_dict": torch_models[0].state_dict(),
      "mass_mean": np.float64(142.46),
      "mass_std": 50.58,
      "history": history,
    },
    path,
  )
  return path


def _images(height=25, width=25, batch=3):
  generator = torch.Generator().manual_seed(1)
  hits = torch.rand(batch, 8, height, width, generator=generator) < 0.2
  return torch.where(hits, torch.rand(hits.shape, generator=generator) * 50.0, 0.0)


def _nhwc(images):
  return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _assert_model_parity(torch_model, model, images):
  with torch.no_grad():
    expected_logits, expected_mass = torch_model(images)
  logits, mass = nnx.jit(lambda m, x: m(x))(model, _nhwc(images))
  np.testing.assert_allclose(logits, expected_logits.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(mass, expected_mass.numpy(), atol=ATOL, rtol=0)


def test_finetuned_checkpoint_matches_pytorch(torch_models, finetuned_checkpoint):
  model, projector, meta = torch_import.import_checkpoint(finetuned_checkpoint)
  assert projector is None
  assert meta["model_config"] == EXPECTED_CONFIG
  assert meta["mass_mean"] == pytest.approx(142.46) and meta["mass_std"] == pytest.approx(50.58)
  assert meta["history"]["val_acc"] == [1.0, 0.5]
  assert meta["pixel_scale"] == 1.0 and meta["source"] == f"torch:{finetuned_checkpoint}"
  _assert_model_parity(torch_models[0], model, _images())


def test_interpolated_position_embeddings_match_pytorch(torch_models, finetuned_checkpoint):
  model, _, _ = torch_import.import_checkpoint(finetuned_checkpoint)
  # 35×30 pixels: a non-square 7×6 token grid, position embeddings upsampled from 5×5.
  _assert_model_parity(torch_models[0], model, _images(35, 30))


def test_simclr_checkpoint_matches_pytorch(torch_models, tmp_path):
  torch_model, torch_projector = torch_models
  path = str(tmp_path / "simclr.pt")
  torch.save(
    {"encoder_state_dict": torch_model.state_dict(), "proj_head_state_dict": torch_projector.state_dict()},
    path,
  )
  model, projector, meta = torch_import.import_checkpoint(path)
  assert meta["mass_mean"] is None and meta["history"] is None

  images = _images()
  with torch.no_grad():
    expected_features = torch_model.features(images)
    expected_projection = torch_projector(expected_features)
  features = nnx.jit(lambda m, x: m.features(x))(model, _nhwc(images))
  np.testing.assert_allclose(features, expected_features.numpy(), atol=ATOL, rtol=0)
  projection = projector(jnp.asarray(expected_features.numpy()))
  np.testing.assert_allclose(projection, expected_projection.numpy(), atol=ATOL, rtol=0)


def test_simclr_encoder_without_heads_and_bare_state_dicts_are_accepted(torch_models, tmp_path):
  state_dict = torch_models[0].state_dict()
  encoder = {k: v for k, v in state_dict.items() if not k.startswith(("cls_head", "reg_head"))}
  torch.save({"encoder_state_dict": encoder}, tmp_path / "encoder.pt")
  model, projector, _ = torch_import.import_checkpoint(str(tmp_path / "encoder.pt"))
  assert projector is None
  np.testing.assert_array_equal(model.norm.bias[...], state_dict["norm.bias"].numpy())

  torch.save(state_dict, tmp_path / "bare.pt")
  checkpoint = torch_import.load_torch_checkpoint(str(tmp_path / "bare.pt"))
  assert checkpoint["kind"] == "state_dict"
  assert torch_import.infer_model_config(checkpoint["model_state_dict"]) == EXPECTED_CONFIG


def test_unknown_missing_and_misshaped_tensors_are_refused_together(torch_models):
  state_dict = dict(torch_models[0].state_dict())
  state_dict["blocks.0.attn.extra_scale"] = torch.ones(2)
  del state_dict["norm.bias"]
  state_dict["blocks.1.lcm.conv2.weight"] = torch.ones(32, 1, 3, 3)
  model = models.L2ViT(**EXPECTED_CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(errors.CheckpointImportError) as error:
    torch_import.convert_state_dict(state_dict, model)
  message = str(error.value)
  assert "unknown tensors: blocks.0.attn.extra_scale" in message
  assert "missing tensors: norm.bias" in message
  assert (
    "mis-shaped tensors: blocks.1.lcm.conv2.weight (32, 1, 3, 3) (model expects (32, 1, 5, 5))" in message
  )


def test_projector_with_wrong_names_is_refused(torch_models):
  state_dict = {k.replace("net.3", "net.2"): v for k, v in torch_models[1].state_dict().items()}
  projector = models.SimCLRProjector(32, 32, 16, rngs=nnx.Rngs(0))
  with pytest.raises(
    errors.CheckpointImportError,
    match=r"unknown tensors: net\.2\.bias, "
    r"net\.2\.weight; missing tensors: net\.3\.bias, net\.3\.weight",
  ):
    torch_import.convert_projector_state_dict(state_dict, projector)


def _convert(checkpoint, workdir):
  return subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "convert_torch_checkpoint.py"),
      f"--input={checkpoint}",
      f"--workdir={workdir}",
    ],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def _file_bytes(directory):
  return {
    os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
    for root, _, names in os.walk(directory)
    for name in names
  }


def test_convert_script_end_to_end(torch_models, finetuned_checkpoint, tmp_path):
  from l2vit_jax.checkpoint import model_io  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "imported")
  result = _convert(finetuned_checkpoint, workdir)
  assert result.returncode == 0, result.stderr
  model, meta = model_io.restore_model_checkpoint(workdir)
  assert meta["mass_mean"] == pytest.approx(142.46)
  assert meta["model_config"] == EXPECTED_CONFIG
  _assert_model_parity(torch_models[0], model, _images())


@pytest.mark.parametrize("kept", ["best", "checkpoints"])
def test_importing_into_a_workdir_that_holds_a_model_is_refused_and_changes_nothing(
  finetuned_checkpoint, tmp_path, kept
):
  from l2vit_jax.checkpoint import model_io  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / "trained"
  model, _, meta = torch_import.import_checkpoint(finetuned_checkpoint)
  model_io.save_model_checkpoint(str(workdir), model, dict(meta, trained=True), step=7)
  if kept == "checkpoints":  # a training run's latest state only, no best/ yet
    os.rename(workdir / "best", workdir / "checkpoints")
  before = _file_bytes(workdir)
  result = _convert(finetuned_checkpoint, workdir)
  errors_seen = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode != 0 and len(errors_seen) == 1, result.stderr
  assert f"{kept}/7" in errors_seen[0] and "already holds a model" in errors_seen[0]
  assert _file_bytes(workdir) == before  # the trained step kept, no lock or import left behind
  assert model_io.read_model_meta(str(workdir))["trained"]


def test_importing_into_a_workdir_locked_by_a_live_run_is_refused(finetuned_checkpoint, tmp_path):
  from l2vit_jax.checkpoint import workdir_lock  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / "in_use"
  workdir.mkdir()
  with workdir_lock.WorkdirLock(str(workdir)):  # this test process: alive, on this host
    result = _convert(finetuned_checkpoint, workdir)
    assert sorted(os.listdir(workdir)) == ["lock"]
  errors_seen = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode != 0 and len(errors_seen) == 1, result.stderr
  assert "workdir is in use" in errors_seen[0]
