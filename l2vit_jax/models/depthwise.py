"""'Same'-padded depthwise 2-D convolution on NHWC arrays, behind one function.

The LCM's two depthwise 7×7 convolutions are the only grouped convolutions in the model, and their
best formulation depends on the backend: XLA:CPU lowers ``feature_group_count=C`` convolutions very
slowly (measured in docs/performance.md, "Kernels"), while GPU/TPU handle them natively. Callers only ever use :func:`depthwise_conv2d`, so formulations can be chosen per backend
without touching the model. Every formulation computes the same function (tested against each other,
forward and gradients); ``scripts/benchmark.py --only=depthwise`` times them all.

Kernel layout: Flax HWIO with one input feature per group, ``(kh, kw, 1, C)`` — what
``nnx.Conv(C, C, (kh, kw), feature_group_count=C)`` stores. A PyTorch depthwise weight
``(C, 1, kh, kw)`` maps to it with ``transpose(2, 3, 1, 0)``, the same rule as any other convolution.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal[
  "auto", "lax", "shifted_adds", "shifted_adds_vjp", "row_scan", "patches", "channel_batched"
]
# Every name accepted by ``implementation``; all but 'auto' are concrete formulations.
IMPLEMENTATIONS = (
  "auto",
  "lax",
  "shifted_adds",
  "shifted_adds_vjp",
  "row_scan",
  "patches",
  "channel_batched",
)
# What 'auto' picks per backend, from scripts/benchmark.py --only=depthwise (docs/performance.md,
# "Kernels"): on XLA:CPU the custom-VJP shifted adds are far faster than the grouped convolution,
# above all for the gradient; GPU and TPU compilers have native depthwise kernels.
AUTO_BY_BACKEND = {"cpu": "shifted_adds_vjp"}
AUTO_DEFAULT = "lax"


def resolve_implementation(implementation: str, backend: str | None = None) -> str:
  """The concrete formulation ``implementation`` stands for on ``backend`` (default: JAX's)."""
  if implementation == "auto":
    return AUTO_BY_BACKEND.get(backend or jax.default_backend(), AUTO_DEFAULT)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown depthwise implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
  return implementation


def depthwise_conv2d(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  implementation: Implementation = "auto",
  precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """Depthwise cross-correlation with 'same' padding (zero-padded, stride 1), plus bias.

  Args:
    x: (batch, height, width, channels).
    kernel: (kh, kw, 1, channels), kh and kw odd so that 'same' padding is symmetric (and identical
      to PyTorch's ``padding=k // 2``).
    bias: (channels,) or None.
    implementation: one of
      'lax': ``lax.conv_general_dilated`` with ``feature_group_count`` (native on GPU/TPU);
      'shifted_adds': a loop over the kh·kw taps adding shifted x times the tap's per-channel
        weights, differentiated by JAX;
      'shifted_adds_vjp': the same looped sum forward, with a hand-written VJP whose
        input gradient is again shifted adds (correlation with the flipped kernel) and whose kernel
        gradient accumulates per-tap products row by row in cache-sized pieces;
      'row_scan': ``lax.scan`` over kernel rows, each row's kw taps unrolled;
      'patches': ``conv_general_dilated_patches`` then a per-channel contraction (kh·kw times the
        activation memory);
      'channel_batched': channels folded into a vmapped single-channel regular convolution;
      'auto': the fastest measured on the current backend (``AUTO_BY_BACKEND``), 'lax' elsewhere.
    precision: matmul/conv precision for the convolution-based formulations ('lax', 'patches',
      'channel_batched'); the shifted-add formulations multiply elementwise, exact in float32.

  Returns:
    (batch, height, width, channels) in the dtype of ``x``.
  """
  kh, kw, group_size, channels = kernel.shape
  if group_size != 1 or channels != x.shape[-1]:
    raise ValueError(f"depthwise kernel must be (kh, kw, 1, {x.shape[-1]}), got {kernel.shape}")
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"'same' depthwise conv needs odd kernel sizes, got {kh}×{kw}")
  implementation = resolve_implementation(implementation)
  if implementation == "lax":
    y = _lax_depthwise(x, kernel, precision)
  elif implementation == "shifted_adds":
    y = _shifted_adds_depthwise(x, kernel[:, :, 0, :])
  elif implementation == "shifted_adds_vjp":
    y = _shifted_adds_vjp(x, kernel[:, :, 0, :])
  elif implementation == "row_scan":
    y = _row_scan_depthwise(x, kernel)
  elif implementation == "patches":
    y = _patches_depthwise(x, kernel, precision)
  else:
    y = _channel_batched_depthwise(x, kernel, precision)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _accumulator_dtype(dtype) -> jnp.dtype:
  # Accumulate in at least float32 so bf16 inputs do not lose precision over kh·kw additions, as
  # a convolution's own accumulator would not.
  return jnp.promote_types(dtype, jnp.float32)


def _pad_same(x: jax.Array, kh: int, kw: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


# --- 'lax' ------------------------------------------------------------------------------------------


def _lax_depthwise(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel.astype(x.dtype),
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
    precision=precision,
  )


# --- 'shifted_adds' ---------------------------------------------------------------------------------


def _shifted_adds_depthwise(x: jax.Array, taps: jax.Array) -> jax.Array:
  """Depthwise 'same' correlation of x (B, H, W, C) with taps (kh, kw, C), one tap per loop trip."""
  kh, kw = taps.shape[:2]
  accumulator_dtype = _accumulator_dtype(x.dtype)
  padded = _pad_same(x, kh, kw)
  taps = taps.reshape(kh * kw, -1).astype(accumulator_dtype)

  def add_tap(tap, y):
    window = jax.lax.dynamic_slice(padded, (0, tap // kw, tap % kw, 0), x.shape)
    return y + window.astype(accumulator_dtype) * taps[tap]

  # A loop rather than 49 unrolled multiply-adds: unrolled, XLA:CPU fuses a copy of the whole sum into
  # each consumer (the LCM computed its first convolution three times; an optimization_barrier does
  # not help, XLA:CPU drops barriers before fusing), and differentiated by JAX it took ~50 s to
  # compile the gradient of even a 2-block model (vs ~1 s looped). Its JAX gradient is slow, though:
  # the transpose of each dynamic_slice scatters into a zero array of the padded shape
  # ('shifted_adds_vjp' keeps this forward and writes its own backward).
  y = jax.lax.fori_loop(0, kh * kw, add_tap, jnp.zeros(x.shape, accumulator_dtype))
  return y.astype(x.dtype)


# --- 'shifted_adds_vjp' -----------------------------------------------------------------------------


def _unrolled_shifted_adds(x: jax.Array, taps: jax.Array) -> jax.Array:
  """Σ_ij pad(x)[:, i:i+H, j:j+W] · taps[i, j], all kh·kw terms in one elementwise fusion."""
  kh, kw = taps.shape[:2]
  height, width = x.shape[1:3]
  accumulator_dtype = _accumulator_dtype(x.dtype)
  padded = _pad_same(x, kh, kw).astype(accumulator_dtype)
  taps = taps.astype(accumulator_dtype)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = padded[:, i : i + height, j : j + width] * taps[i, j]
      y = term if y is None else y + term
  return y.astype(x.dtype)


def _kernel_gradient(x: jax.Array, dy: jax.Array, kh: int, kw: int) -> jax.Array:
  """dL/dtaps[i, j, c] = Σ_{b,h,w} pad(x)[b, h+i, w+j, c] · dy[b, h, w, c].

  A loop over the batch·height output rows; each adds, for every kernel column j, the products of
  the kh padded input rows shifted by j with the output-gradient row into a (kh, width, C)
  accumulator (kw of them, 1.3 MB in all for the seed's 25×256): elementwise and cache-resident. The
  direct form — kh·kw reductions over the whole (B, H, W) — re-reads the activations from memory kh·kw
  times and was much slower on XLA:CPU; one accumulator per tap (kh·kw of them) was as fast but
  compiled far longer.
  """
  batch, height, width, channels = x.shape
  accumulator_dtype = _accumulator_dtype(x.dtype)
  padded = _pad_same(x, kh, kw).astype(accumulator_dtype)
  dy = dy.astype(accumulator_dtype)
  padded_width = width + kw - 1

  def add_row(row, accumulators):
    b, h = row // height, row % height
    rows = jax.lax.dynamic_slice(padded, (b, h, 0, 0), (1, kh, padded_width, channels))[0]
    dy_row = jax.lax.dynamic_slice(dy, (b, h, 0, 0), (1, 1, width, channels))[0]
    return tuple(acc + rows[:, j : j + width] * dy_row for j, acc in enumerate(accumulators))

  zeros = jnp.zeros((kh, width, channels), accumulator_dtype)
  accumulators = jax.lax.fori_loop(0, batch * height, add_row, (zeros,) * kw)
  return jnp.stack([acc.sum(axis=1) for acc in accumulators], axis=1)


@jax.custom_vjp
def _shifted_adds_vjp(x: jax.Array, taps: jax.Array) -> jax.Array:
  """Depthwise 'same' correlation of x (B, H, W, C) with taps (kh, kw, C)."""
  return _shifted_adds_depthwise(x, taps)


def _shifted_adds_vjp_forward(x, taps):
  return _shifted_adds_depthwise(x, taps), (x, taps)


def _shifted_adds_vjp_backward(residuals, dy):
  x, taps = residuals
  # The transpose of a 'same' correlation (odd kernel, symmetric padding) is the 'same'
  # correlation with the kernel flipped in both spatial axes.
  dx = _unrolled_shifted_adds(dy.astype(x.dtype), taps[::-1, ::-1])
  dtaps = _kernel_gradient(x, dy, *taps.shape[:2]).astype(taps.dtype)
  return dx, dtaps


_shifted_adds_vjp.defvjp(_shifted_adds_vjp_forward, _shifted_adds_vjp_backward)


# --- 'row_scan' -------------------------------------------------------------------------------------


def _row_scan_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw = kernel.shape[:2]
  height, width = x.shape[1:3]
  accumulator_dtype = _accumulator_dtype(x.dtype)
  padded = _pad_same(x, kh, kw).astype(accumulator_dtype)
  rows_of_taps = kernel[:, :, 0, :].astype(accumulator_dtype)

  def add_kernel_row(y, inputs):
    row, taps = inputs
    window_rows = jax.lax.dynamic_slice_in_dim(padded, row, height, axis=1)
    for j in range(kw):
      y = y + window_rows[:, :, j : j + width] * taps[j]
    return y, None

  y, _ = jax.lax.scan(add_kernel_row, jnp.zeros(x.shape, accumulator_dtype), (jnp.arange(kh), rows_of_taps))
  return y.astype(x.dtype)


# --- 'patches' --------------------------------------------------------------------------------------


def _patches_depthwise(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
  kh, kw, _, channels = kernel.shape
  # Patch extraction is a convolution with one-hot filters: HIGHEST keeps it an exact copy (TF32 on
  # GPU would round the pixels).
  patches = jax.lax.conv_general_dilated_patches(
    x,
    (kh, kw),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  # Patch features are ordered (channel, kernel row, kernel column).
  patches = patches.reshape(*x.shape[:3], channels, kh * kw)
  taps = kernel[:, :, 0, :].reshape(kh * kw, channels).astype(x.dtype)
  return jnp.einsum(
    "bhwck,kc->bhwc", patches, taps, precision=precision, preferred_element_type=_accumulator_dtype(x.dtype)
  ).astype(x.dtype)


# --- 'channel_batched' ------------------------------------------------------------------------------


def _channel_batched_depthwise(
  x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike
) -> jax.Array:
  # (C, B, H, W, 1): each channel becomes an ordinary 1→1-feature convolution with its own kernel.
  channel_major = jnp.moveaxis(x, -1, 0)[..., None]
  kernels = jnp.moveaxis(kernel.astype(x.dtype), -1, 0)  # (C, kh, kw, 1)
  conv = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=precision,
  )
  y = jax.vmap(lambda xc, kc: conv(xc, kc[..., None]))(channel_major, kernels)
  return jnp.moveaxis(y[..., 0], 0, -1)
