"""'Same'-padded depthwise 2-D convolution on NHWC arrays, behind one function.

The LCM's two depthwise 7×7 convolutions are the only grouped convolutions in the model, and their
best formulation depends on the backend: XLA:CPU lowers ``feature_group_count=C`` convolutions very
slowly, while GPU/TPU handle them natively. Callers only ever use :func:`depthwise_conv2d`, so faster
formulations can be added here per backend without touching the model.

Kernel layout: Flax HWIO with one input feature per group, ``(kh, kw, 1, C)`` — what
``nnx.Conv(C, C, (kh, kw), feature_group_count=C)`` stores. A PyTorch depthwise weight
``(C, 1, kh, kw)`` maps to it with ``transpose(2, 3, 1, 0)``, the same rule as any other convolution.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal['auto', 'lax', 'shifted_adds']
IMPLEMENTATIONS = ('auto', 'lax', 'shifted_adds')


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    implementation: Implementation = 'auto',
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """Depthwise cross-correlation with 'same' padding (zero-padded, stride 1), plus bias.

  Args:
    x: (batch, height, width, channels).
    kernel: (kh, kw, 1, channels), kh and kw odd so that 'same' padding is symmetric (and identical
      to PyTorch's ``padding=k // 2``).
    bias: (channels,) or None.
    implementation: 'lax' (``lax.conv_general_dilated`` with ``feature_group_count``),
      'shifted_adds' (sum over the kh·kw taps of shifted x times the tap's per-channel weights), or
      'auto': shifted adds on CPU, where grouped convolutions are slow, lax everywhere else.
    precision: matmul/conv precision for 'lax' (shifted adds are elementwise and always exact fp32
      products).

  Returns:
    (batch, height, width, channels) in the dtype of ``x``.
  """
  kh, kw, group_size, channels = kernel.shape
  if group_size != 1 or channels != x.shape[-1]:
    raise ValueError(f'depthwise kernel must be (kh, kw, 1, {x.shape[-1]}), got {kernel.shape}')
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"'same' depthwise conv needs odd kernel sizes, got {kh}×{kw}")
  if implementation == 'auto':
    implementation = 'shifted_adds' if jax.default_backend() == 'cpu' else 'lax'
  if implementation == 'lax':
    y = _lax_depthwise(x, kernel, precision)
  elif implementation == 'shifted_adds':
    y = _shifted_adds_depthwise(x, kernel)
  else:
    raise ValueError(f'unknown depthwise implementation {implementation!r}; use one of {IMPLEMENTATIONS}')
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _lax_depthwise(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      window_strides=(1, 1),
      padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1],
      precision=precision,
  )


def _shifted_adds_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw = kernel.shape[:2]
  # Accumulate in at least float32 so bf16 inputs do not lose precision over kh·kw additions, as
  # a convolution's own accumulator would not.
  accumulator_dtype = jnp.promote_types(x.dtype, jnp.float32)
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  taps = kernel[:, :, 0, :].reshape(kh * kw, -1).astype(accumulator_dtype)

  def add_tap(tap, y):
    window = jax.lax.dynamic_slice(padded, (0, tap // kw, tap % kw, 0), x.shape)
    return y + window.astype(accumulator_dtype) * taps[tap]

  # A loop rather than 49 unrolled multiply-adds: unrolled, XLA:CPU fuses them with the neighbouring
  # ops and compiling the gradient of even a 2-block model took ~50 s (vs ~1 s looped) at a runtime
  # cost of only ~10 %.
  y = jax.lax.fori_loop(0, kh * kw, add_tap, jnp.zeros(x.shape, accumulator_dtype))
  return y.astype(x.dtype)
