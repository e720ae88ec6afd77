"""L2ViT in Flax NNX: attention kernels, depthwise conv, modules, modes, dtypes and one training step."""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from l2vit_jax import models
from l2vit_jax.models import l2vit

# Odd sizes like the real 125×125 / patch 5 data, shrunk: a 5×5 token grid. One block keeps XLA
# compiles short; models that share a config and mode also share nnx.jit's compiled forward.
TINY = dict(in_channels=8, img_size=25, patch_size=5, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def _tiny_model(**overrides) -> models.L2ViT:
  return models.L2ViT(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


# Test inputs come from numpy: eager jax.random calls would each compile an XLA program.
def _normal(*shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _images(batch=4, size=25, seed=1) -> jax.Array:
  # Sparse non-negative deposits, like jet images.
  rng = np.random.default_rng(seed)
  hits = rng.random((batch, size, size, 8)) < 0.1
  return jnp.asarray(np.where(hits, rng.exponential(5.0, hits.shape), 0.0), jnp.float32)


@nnx.jit
def _forward(model, images):
  return model(images)


# --- attention kernels -----------------------------------------------------------------------------


def _naive_linear_attention(q, k, v, temperature, floor):
  """O(N²) form: explicit ReLU-kernel attention matrix and clamped row sums, in float64."""
  q = np.maximum(np.asarray(q, np.float64), 0.0)
  k = np.maximum(np.asarray(k, np.float64), 0.0)
  v = np.asarray(v, np.float64)
  scores = np.einsum("bhnd,bhmd->bhnm", q, k)
  denominator = np.maximum(scores.sum(-1, keepdims=True), floor)
  return np.asarray(temperature, np.float64) * (scores @ v) / denominator, denominator


def test_linear_attention_matches_naive_quadratic_reference():
  shape = (2, 3, 25, 8)
  # Per-row scales spread q·Σk around the floor so both the clamped and the unclamped branch occur.
  q = _normal(*shape, seed=0) * np.linspace(0.05, 3.0, 25, dtype=np.float32)[:, None]
  k, v = _normal(*shape, seed=1), _normal(*shape, seed=2)
  temperature = np.array([0.3, 1.0, 2.5], np.float32).reshape(3, 1, 1)

  out = jax.jit(models.linear_attention)(q, k, v, temperature)
  expected, denominator = _naive_linear_attention(q, k, v, temperature, 100.0)

  assert (denominator == 100.0).any() and (denominator > 100.0).any()
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert out.dtype == jnp.float32


def test_linear_attention_low_precision_inputs_are_computed_in_float32():
  q, k, v = (4 * _normal(2, 2, 25, 8, seed=seed).astype(jnp.bfloat16) for seed in range(3))
  temperature = np.full((2, 1, 1), 0.5, np.float32)
  out = jax.jit(models.linear_attention)(q, k, v, temperature)
  expected, _ = _naive_linear_attention(q, k, v, temperature, 100.0)
  assert out.dtype == jnp.bfloat16
  # Only the final cast rounds: within bf16's 8-bit mantissa of the exact result.
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2**-8, atol=1e-6)


def test_softmax_attention_matches_reference():
  q, k, v = (_normal(2, 2, 9, 4, seed=seed) for seed in range(3))
  logits = np.einsum("bhnd,bhmd->bhnm", q, k) * 4**-0.5
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(jax.jit(models.softmax_attention)(q, k, v), weights @ v, atol=1e-5)


# --- depthwise convolution -------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_depthwise_implementations_agree(kernel_size):
  x = _normal(2, 5, 6, 16, seed=0)  # 7×7 taps on a 5×6 grid: padding dominates
  kernel = _normal(kernel_size, kernel_size, 1, 16, seed=1)
  bias = _normal(16, seed=2)
  conv = jax.jit(models.depthwise_conv2d, static_argnames=("implementation", "precision"))
  lax_conv = conv(x, kernel, bias, implementation="lax", precision=jax.lax.Precision.HIGHEST)
  shifted = conv(x, kernel, bias, implementation="shifted_adds")
  auto = conv(x, kernel, bias)
  assert lax_conv.shape == x.shape
  np.testing.assert_allclose(shifted, lax_conv, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(auto, lax_conv, atol=1e-5, rtol=1e-5)


def test_depthwise_rejects_bad_kernels():
  x = jnp.zeros((1, 5, 5, 4))
  with pytest.raises(ValueError, match="odd"):
    models.depthwise_conv2d(x, jnp.zeros((4, 4, 1, 4)), None)
  with pytest.raises(ValueError, match="unknown depthwise implementation"):
    models.depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), None, implementation="fft")


# --- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_attention_module_shape_and_finite(attention):
  module = l2vit.LinearAttention(32, 2, attention=attention, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda m, x: m(x))(module, _normal(3, 25, 32))
  assert out.shape == (3, 25, 32)
  assert jnp.isfinite(out).all()


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_model_forward_shapes_and_finite(attention):
  model = _tiny_model(attention=attention)
  model.eval()
  logits, mass = _forward(model, _images())
  assert logits.shape == (4, 2) and mass.shape == (4, 1)
  assert logits.dtype == jnp.float32
  assert jnp.isfinite(logits).all() and jnp.isfinite(mass).all()
  assert jax.eval_shape(model.features, _images()).shape == (4, 32)


def test_default_config_has_5111579_parameters():
  model = nnx.eval_shape(lambda: models.L2ViT(rngs=nnx.Rngs(0)))
  assert models.param_count(model) == 5_111_579
  assert model.blocks[5].attn.temperature.shape == (4, 1, 1)
  assert model.blocks[0].lcm.conv1.kernel.shape == (7, 7, 1, 256)
  assert model.pos_embed.shape == (1, 625, 256)


def test_pytorch_defaults_are_set_explicitly():
  model = _tiny_model(drop_path_rate=0.3, depth=4)
  block = model.blocks[0]
  assert block.norm1.epsilon == 1e-5 and model.norm.epsilon == 1e-5
  assert block.lcm.bn.epsilon == 1e-5 and block.lcm.bn.momentum == 0.9
  np.testing.assert_allclose([b.drop_path.rate for b in model.blocks], [0.0, 0.1, 0.2, 0.3])
  np.testing.assert_allclose(block.attn.temperature[...], 16**-0.5)
  assert not jnp.any(block.mlp.fc1.bias[...]) and not jnp.any(model.cls_head.bias[...])


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
  drop_path = l2vit.DropPath(0.5, rngs=nnx.Rngs(0))
  out = drop_path(jnp.ones((64, 5, 3)))
  per_sample = out.reshape(64, -1)
  assert set(np.unique(per_sample)) == {0.0, 2.0}
  assert (per_sample.min(1) == per_sample.max(1)).all()
  drop_path.eval()
  np.testing.assert_array_equal(drop_path(jnp.ones((4, 5, 3))), 1.0)


def test_eval_is_deterministic_and_train_is_not():
  model = _tiny_model()
  images = _images()
  model.eval()
  first, second = _forward(model, images), _forward(model, images)
  np.testing.assert_array_equal(first[0], second[0])
  assert model.blocks[0].drop_path.deterministic and model.blocks[0].lcm.bn.use_running_average
  model.train()
  assert not model.blocks[0].drop_path.deterministic
  assert not model.blocks[0].lcm.bn.use_running_average
  noisy, noisier = _forward(model, images), _forward(model, images)
  assert not np.allclose(noisy[0], noisier[0])


def test_jit_matches_eager():
  model = _tiny_model()
  model.eval()
  images = _images()
  for eager, jitted in zip(model(images), _forward(model, images)):
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_matches_float32():
  model32 = _tiny_model()
  model16 = _tiny_model(dtype=jnp.bfloat16)  # same seed: identical float32 parameters
  model32.eval()
  model16.eval()
  assert model16.blocks[0].mlp.fc1.kernel.dtype == jnp.float32
  images = _images()
  for out32, out16 in zip(_forward(model32, images), _forward(model16, images)):
    # bf16 keeps 8 mantissa bits; errors stay a few percent of the output scale.
    np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()))


def test_position_embedding_is_interpolated_for_other_image_sizes():
  # 15×15 images: a 3×3 token grid, position embeddings downsampled from 5×5 (tests/
  # test_torch_parity.py checks an upsampled, non-square grid against the PyTorch model).
  model = _tiny_model()
  model.eval()
  logits, mass = _forward(model, _images(size=15))
  assert logits.shape == (4, 2) and jnp.isfinite(logits).all() and jnp.isfinite(mass).all()


@pytest.mark.parametrize("target_grid", [(7, 6), (3, 2), (5, 5)])
def test_position_interpolation_matches_torch_bilinear(target_grid):
  torch = pytest.importorskip("torch", reason="torch not installed: pip install torch")
  pos_embed = np.random.default_rng(0).normal(size=(1, 25, 4)).astype(np.float32)
  resized = models.interpolate_pos_embed(jnp.asarray(pos_embed), (5, 5), target_grid)
  grid = torch.from_numpy(pos_embed).reshape(1, 5, 5, 4).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(grid, size=target_grid, mode="bilinear", align_corners=False)
  expected = expected.permute(0, 2, 3, 1).reshape(1, -1, 4).numpy()
  np.testing.assert_allclose(resized, expected, atol=1e-6)


def test_simclr_projector_output_is_unit_norm():
  projector = models.SimCLRProjector(32, 32, 16, rngs=nnx.Rngs(0))
  z = nnx.jit(lambda m, x: m(x))(projector, _normal(5, 32))
  assert z.shape == (5, 16)
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)


def test_training_steps_have_finite_gradients_and_lower_the_loss():
  # No dropout, so that the loss on the fixed batch moves only with the parameters.
  model = _tiny_model(drop_rate=0.0, drop_path_rate=0.0)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.01), wrt=nnx.Param)
  images = _images(batch=8)
  labels = jnp.arange(8) % 2
  mass = jnp.linspace(-1.0, 1.0, 8)[:, None]

  def loss_fn(model):
    logits, predicted_mass = model(images)
    classification = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return classification + optax.huber_loss(predicted_mass, mass).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    leaves = jax.tree.leaves(grads)
    all_finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in leaves]))
    any_nonzero = jnp.any(jnp.stack([jnp.any(g != 0) for g in leaves]))
    return loss, all_finite, any_nonzero

  initial, all_finite, any_nonzero = train_step(model, optimizer)
  assert all_finite and any_nonzero
  for _ in range(4):
    final, all_finite, _ = train_step(model, optimizer)
    assert all_finite
  assert final < initial


def test_torch_is_optional(monkeypatch):
  from l2vit_jax.interop import torch_reference  # pylint: disable=import-outside-toplevel
  from l2vit_jax.interop import torch_import  # pylint: disable=import-outside-toplevel

  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  importlib.reload(torch_reference)  # the module itself imports without torch
  with pytest.raises(ImportError, match="pip install torch"):
    torch_reference.build_torch_l2vit()
  with pytest.raises(ImportError, match="pip install torch"):
    torch_import.load_torch_checkpoint("model.pt")


def test_dropout_keeps_a_multiple_of_one_256th_scaled_to_stay_unbiased_and_is_the_identity_in_eval():
  dropout = l2vit.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((200, 1000))
  y = dropout(x)
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 230 / 256) < 0.003  # round(256 · 0.9) = 230 of 256 byte values
  np.testing.assert_allclose(np.asarray(y)[kept], 256 / 230, rtol=1e-6)
  assert not np.array_equal(np.asarray(dropout(x)), np.asarray(y))  # a fresh mask per call
  dropout.deterministic = True
  assert dropout(x) is x
  assert float(l2vit.Dropout(1.0, rngs=nnx.Rngs(dropout=0))(x).sum()) == 0.0


@pytest.mark.parametrize("shape", [(64, 1001), (3, 5, 7), (1,)])
def test_random_bytes_are_uniform_and_independent_across_the_four_bytes_of_a_word(shape):
  key = jax.random.key(7)
  got = np.asarray(jax.jit(l2vit.random_bytes, static_argnums=1)(key, shape))
  assert got.shape == shape and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(l2vit.random_bytes(key, shape)))  # deterministic
  if got.size < 1000:
    return
  flat = got.reshape(-1)[: got.size // 4 * 4].reshape(-1, 4).astype(np.int64)
  counts = np.bincount(got.reshape(-1), minlength=256)
  expected = got.size / 256
  assert ((counts - expected) ** 2 / expected).sum() < 256 + 5 * np.sqrt(2 * 256)  # chi-square, 255 dof
  for lane in range(1, 4):  # bytes of one word: uncorrelated, not shifted copies of each other
    assert abs(np.corrcoef(flat[:, 0], flat[:, lane])[0, 1]) < 0.02
    assert (flat[:, 0] != flat[:, lane]).mean() > 0.99
  # Another key draws other bytes; 'rbg' keys keep jax.random.bits.
  assert (np.asarray(l2vit.random_bytes(jax.random.key(8), shape)) != got).mean() > 0.99
  rbg = jax.random.key(7, impl="rbg")
  np.testing.assert_array_equal(l2vit.random_bytes(rbg, shape), jax.random.bits(rbg, shape, jnp.uint8))


# --- blocks compiled as one lax.scan -----------------------------------------------------------------


def _train_step_results(scan: bool, remat_policy: str = ""):
  """Loss, BatchNorm statistics, parameter gradients and the dropout streams' counts after one
  reseeded training forward and backward pass of a 2-block model with dropout and drop path (the
  first block's drop-path rate is 0, the second's 0.2)."""
  model = _tiny_model(depth=2, drop_rate=0.1, drop_path_rate=0.2)
  model.set_attributes(scan_blocks=scan, remat_policy=remat_policy)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = _images()

  @jax.jit
  def loss_and_grads(params, rest):
    def loss(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      nnx.reseed(model, dropout=jax.random.key(7))
      logits, mass = model(images)
      return (logits**2).sum() + mass.sum(), (nnx.state(model, nnx.BatchStat), nnx.state(model, nnx.RngCount))

    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, (batch_stats, counts)), grads = loss_and_grads(params, rest)
  return value, batch_stats, grads, counts


def test_scanned_blocks_compute_what_the_blocks_compute_one_after_another():
  """Same parameters, same dropout and drop-path keys per block, each block's own BatchNorm
  statistics written back: loss, statistics and gradients agree with the unrolled blocks (to float
  rounding; XLA fuses the two programs differently)."""
  unrolled = _train_step_results(scan=False)
  for remat_policy in ("", "nothing_saveable", "lcm_norm_saveable"):
    scanned = _train_step_results(scan=True, remat_policy=remat_policy)
    np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(scanned[1:3]), jax.tree.leaves(unrolled[1:3])):
      np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=1e-6)
  # Every block's statistics moved, and differently: each slice went back to its own block.
  means = [np.asarray(block["lcm"]["bn"]["mean"][...]) for block in unrolled[1]["blocks"].values()]
  assert all(np.abs(m).sum() > 0 for m in means) and not np.allclose(means[0], means[1])


def test_scanning_changes_neither_the_parameters_nor_the_checkpointed_state():
  model = _tiny_model(depth=3)
  before = jax.tree.map(np.asarray, nnx.state(model, (nnx.Param, nnx.BatchStat)))
  model.set_attributes(scan_blocks=True, remat_policy="dots_saveable")
  model.eval()
  images = _images()
  scanned = _forward(model, images)
  model.set_attributes(scan_blocks=False)
  unrolled = _forward(model, images)
  np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-5, atol=1e-6)
  after = jax.tree.map(np.asarray, nnx.state(model, (nnx.Param, nnx.BatchStat)))
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_a_scanned_drop_path_rate_of_zero_keeps_every_sample_unscaled():
  drop_path = l2vit.DropPath(0.3, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(drop_path(jnp.ones((64, 5)), jnp.float32(0.0)), 1.0)
  kept = np.unique(np.asarray(drop_path(jnp.ones((256, 5)), jnp.float32(0.5))))
  np.testing.assert_allclose(kept, [0.0, 2.0])


def test_the_lcm_norm_policy_keeps_only_the_lcm_batchnorm_output_for_the_backward_pass(capsys):
  block = _tiny_model(depth=1).blocks[0]
  graphdef, state = nnx.split(block)
  tokens = jnp.asarray(_normal(2, 25, TINY["embed_dim"]))

  def block_sum(state, tokens):
    return nnx.merge(graphdef, state)(tokens, (5, 5)).sum()

  saved = {}
  for policy in ("nothing_saveable", "lcm_norm_saveable"):
    remat = jax.checkpoint(block_sum, policy=l2vit.REMAT_POLICIES[policy])
    jax.ad_checkpoint.print_saved_residuals(remat, state, tokens)
    saved[policy] = capsys.readouterr().out
  # Besides the block's arguments, the one activation kept is the LCM's BatchNorm output.
  activations = {
    policy: [line for line in printed.splitlines() if "from the argument" not in line]
    for policy, printed in saved.items()
  }
  assert activations["nothing_saveable"] == []
  assert [line.split(" from ")[0] for line in activations["lcm_norm_saveable"]] == [
    f"f32[2,5,5,{TINY['embed_dim']}] named 'lcm_norm'"
  ]


def test_an_unknown_remat_policy_is_refused():
  model = _tiny_model(depth=2)
  model.set_attributes(scan_blocks=True, remat_policy="everything")
  with pytest.raises(ValueError, match="remat_policy"):
    model(_images())
