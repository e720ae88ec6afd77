"""bfloat16 training that can be trusted: bf16 compute, float32 parameters, optimizer state and
linear-attention accumulation, and a loss curve that follows float32's.

The tolerance comes from measurement (tiny model, 300 steps, the settings below): the float32 and
bf16 curves' 25-step window means differed by 0.0057 on average over the second half (losses there
≈ 0.30–0.40), and by 0.032 when the parameters and AdamW moments were bf16 as well, so
``CURVE_TOLERANCE = 0.015`` passes the first with a 2.6× margin and fails the second by 2.1×; the
second test checks that it does fail. On CPU, XLA accumulates bf16 dots in float32 whatever the
operands, so a bf16 attention kernel left the curve unchanged here (0.0055): float32 accumulation in
the attention is checked structurally instead (its dots must be float32 at HIGHEST precision).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2vit_jax import config_lib, models
from l2vit_jax.training import objectives, optimizer, steps

CURVE_TOLERANCE = 0.015
STEPS, WINDOW, BATCH = 300, 25, 16
TINY = dict(in_channels=8, img_size=25, patch_size=5, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@functools.cache
def _separable_jets(num=256, size=25, seed=0):
  """Synthetic jets: three bright prongs for class 1, one for class 0; mass grows with the energy."""
  rng = np.random.default_rng(seed)
  images = np.zeros((num, size, size, 8), np.float32)
  labels = (np.arange(num) % 2).astype(np.int32)
  for i in range(num):
    for _ in range(3 if labels[i] else 1):
      row, col = rng.integers(3, size - 3, 2)
      images[i, row - 1 : row + 2, col - 1 : col + 2, rng.integers(0, 8)] += rng.exponential(20.0)
  mass = (50 + 0.5 * images.sum((1, 2, 3)) + rng.normal(0, 5, num)).astype(np.float32)
  return images, labels, mass


def _model(dtype):
  return models.L2ViT(**TINY, dtype=dtype, rngs=nnx.Rngs(params=0, dropout=1))


def _loss_curve(dtype, param_dtype=jnp.float32) -> np.ndarray:
  """Per-step training loss of the real train step (AdamW, clipping, dual-head loss, dropout)."""
  images, labels, mass = _separable_jets()
  config = config_lib.base_config()
  config.learning_rate = config.backbone_learning_rate = 3e-4
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedules(config, 10, STEPS))
  graphdef, params, stats, other = nnx.split(_model(dtype), nnx.Param, nnx.BatchStat, ...)
  params = jax.tree.map(lambda p: p.astype(param_dtype), params)
  opt_state = tx.init(params)
  loss = objectives.DualHeadLoss(mass_mean=float(mass.mean()), mass_std=float(mass.std()))
  step = steps.make_train_step(graphdef, loss, tx, jax.random.key(0))
  losses = []
  for i in range(STEPS):
    start = (i * BATCH) % len(images)
    batch = {
      k: jnp.asarray(v[start : start + BATCH])
      for k, v in (("image", images), ("label", labels), ("mass", mass))
    }
    params, stats, opt_state, metrics = step(params, stats, other, opt_state, jnp.int32(i), batch)
    losses.append(metrics["loss"])
  return np.asarray(jnp.stack(losses), np.float64)


def _late_window_gap(a: np.ndarray, b: np.ndarray) -> float:
  """Mean |difference| of the curves' window means over the second half of training."""
  windows = lambda c: c.reshape(-1, WINDOW).mean(axis=1)
  gaps = np.abs(windows(a) - windows(b))
  return float(gaps[len(gaps) // 2 :].mean())


@functools.cache
def _float32_curve():
  return _loss_curve(None)


def test_bf16_training_follows_the_float32_loss_curve():
  reference, mixed = _float32_curve(), _loss_curve(jnp.bfloat16)
  assert np.all(np.isfinite(mixed))
  assert reference[-WINDOW:].mean() < 0.5 * reference[:WINDOW].mean()  # it did learn
  assert _late_window_gap(reference, mixed) < CURVE_TOLERANCE


def test_the_tolerance_catches_bf16_parameters_and_optimizer_state():
  # Pure bf16 training: AdamW's small updates round away on bf16 weights (LayerNorm scales ≈ 1
  # have a bf16 spacing of 2⁻⁷, far above lr = 3e-4), so the curve falls behind.
  assert _late_window_gap(_float32_curve(), _loss_curve(jnp.bfloat16, jnp.bfloat16)) > CURVE_TOLERANCE


def _dot_dtypes(jaxpr) -> list[tuple[str, str]]:
  """(operand dtype, precision) of every dot_general in a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((str(eqn.invars[0].aval.dtype), str(eqn.params["precision"])))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found.extend(_dot_dtypes(inner))
  return found


def test_bf16_model_keeps_float32_parameters_state_and_attention():
  model = _model(jnp.bfloat16)
  params = nnx.state(model, nnx.Param)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  config = config_lib.base_config()
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedules(config, 10, 100))
  opt_state = tx.init(params)
  assert {l.dtype for l in jax.tree.leaves(opt_state) if l.ndim} == {jnp.dtype(jnp.float32)}
  images = jnp.zeros((2, 25, 25, 8), jnp.float32)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images).jaxpr
  dots = _dot_dtypes(jaxpr)
  # kᵀv, q·(kᵀv) and q·Σk per block in float32 at HIGHEST; every other matmul in bf16.
  attention = [d for d in dots if d[0] == "float32"]
  assert len(attention) == 3 * TINY["depth"] and all("HIGHEST" in p for _, p in attention), dots
  assert len(dots) > len(attention) and all(d == "bfloat16" for d, _ in dots if (d, _) not in attention)
