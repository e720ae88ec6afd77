"""Attention kernels over per-head arrays of shape (batch, heads, tokens, head_dim).

Pure functions, so they can be jitted, vmapped and swapped for ablations without touching the modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  temperature: jax.Array,
  *,
  denominator_floor: float = 100.0,
) -> jax.Array:
  """L2ViT's ReLU-kernel linear attention, O(N d²) instead of O(N² d).

  out_n = (relu(q_n) · T_h Σ_m relu(k_m)ᵀ v_m) / max(relu(q_n) · Σ_m relu(k_m), floor)

  Computed in float32 at HIGHEST precision whatever the input dtype: kᵀv sums N (625 at full size)
  products, which overflows or loses precision in bf16/fp16, and TF32 on GPU breaks parity with the
  float32 original. The result is cast back to the input dtype.

  Args:
    q, k, v: (batch, heads, tokens, head_dim).
    temperature: per-head scale of kᵀv, broadcastable to (heads, 1, 1); it does not scale the
      denominator (as in the original).
    denominator_floor: lower clamp on the normaliser; keeps rows whose ReLU features (nearly) vanish
      from dividing by ~0.

  Returns:
    (batch, heads, tokens, head_dim) in the dtype of ``q``.
  """
  out_dtype = q.dtype
  q = jax.nn.relu(q.astype(jnp.float32))
  k = jax.nn.relu(k.astype(jnp.float32))
  v = v.astype(jnp.float32)
  # Temperature scales kᵀv only; the denominator q · Σk is a separate matrix-vector product. (Until
  # Dec 2026 a ones column on v gave Σk as a 65th column of the same two matmuls; on TPU its
  # (…, tokens, 65) float32 intermediates cost 13 % of the finetune step's bytes accessed, for the
  # same FLOPs: docs/performance.md, "The attention's denominator as its own product".)
  kv = jnp.einsum("bhnd,bhne->bhde", k, v, precision=_HIGHEST) * jnp.asarray(temperature, jnp.float32)
  numerator = jnp.einsum("bhnd,bhde->bhne", q, kv, precision=_HIGHEST)
  denominator = jnp.einsum("bhnd,bhd->bhn", q, k.sum(axis=2), precision=_HIGHEST)[..., None]
  return (numerator / jnp.maximum(denominator, denominator_floor)).astype(out_dtype)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  temperature: jax.Array | float | None = None,
) -> jax.Array:
  """Standard softmax(q kᵀ · scale) v attention, O(N² d), for ablations against the linear kernel.

  Args:
    q, k, v: (batch, heads, tokens, head_dim).
    temperature: per-head logit scale broadcastable to (heads, 1, 1); None means head_dim**-0.5. The
      model passes its learnable temperature, whose initial value is exactly head_dim**-0.5, so the
      two attention kinds differ only in the kernel.

  Returns:
    (batch, heads, tokens, head_dim) in the dtype of ``q``; logits and softmax are float32.
  """
  out_dtype = q.dtype
  if temperature is None:
    temperature = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * jnp.asarray(temperature, jnp.float32), axis=-1)
  out = jnp.einsum("bhnm,bhmd->bhnd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
