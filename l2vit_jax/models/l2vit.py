"""L2ViT (linear-attention vision transformer with local concentration) in Flax NNX.

A faithful port of the PyTorch original (docs/design.md, Model). Attribute names mirror the PyTorch
``state_dict`` names (``blocks[i].attn.qkv`` ↔ ``blocks.{i}.attn.qkv.weight``) so that checkpoint
import is a mechanical renaming (see ``l2vit_jax.interop.torch_import``).

Where Flax defaults differ from PyTorch we set the PyTorch behaviour explicitly: LayerNorm and
BatchNorm eps 1e-5, BatchNorm momentum 0.9 (Flax counts momentum the other way round: PyTorch 0.1),
exact erf GELU, trunc-normal(0.02) weights and zero biases. Normalisation statistics use the two-pass
variance (``use_fast_variance=False``): patch embeddings of raw pixels (up to ≈255) have large means,
where E[x²] - E[x]² cancels catastrophically.

Images are channels-last, (batch, height, width, channels).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from l2vit_jax.models.attention import linear_attention
from l2vit_jax.models.attention import softmax_attention
from l2vit_jax.models.depthwise import depthwise_conv2d

Dtype = Any

LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9  # PyTorch momentum=0.1
ATTENTION_FNS = {"linear": linear_attention, "softmax": softmax_attention}

_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's default nn.Linear weight init (kaiming_uniform with a=√5, i.e. U(±1/√fan_in)), used where
# the original did not override it (the SimCLR projector).
_torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU in torch.nn.GELU()'s formula; Flax's default is the tanh approximation.

  jax.nn.gelu(approximate=False) computes the same function through erfc, which XLA:CPU expands into
  both of its branches (a polynomial and an exponential) and a select; erf is one polynomial.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))  # python floats keep x's dtype


def _linear(
  in_features: int, out_features: int, *, dtype: Dtype | None, rngs: nnx.Rngs, kernel_init=_trunc_normal
) -> nnx.Linear:
  return nnx.Linear(
    in_features, out_features, kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
  )


def _layer_norm(dim: int, *, dtype: Dtype | None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
  )


def _batch_norm(dim: int, *, dtype: Dtype | None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # One remaining difference, training only: Flax's running variance tracks the biased batch
  # variance, PyTorch's the unbiased one (a factor n/(n-1), n = batch·tokens, so ≈1).
  return nnx.BatchNorm(
    dim,
    momentum=BATCH_NORM_MOMENTUM,
    epsilon=BATCH_NORM_EPS,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def param_count(module: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param only; BatchNorm running stats excluded)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def interpolate_pos_embed(
  pos_embed: jax.Array, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> jax.Array:
  """Bilinearly resizes (1, gh·gw, D) position embeddings from one token grid to another.

  Matches torch ``F.interpolate(mode='bilinear', align_corners=False)``: half-pixel centres and,
  unlike ``jax.image.resize``'s default, no antialiasing when downsampling.
  """
  if tuple(source_grid) == tuple(target_grid):
    return pos_embed
  dim = pos_embed.shape[-1]
  grid = pos_embed.reshape(1, *source_grid, dim)
  grid = jax.image.resize(grid, (1, *target_grid, dim), method="bilinear", antialias=False)
  return grid.reshape(1, target_grid[0] * target_grid[1], dim)


class PatchEmbed(nnx.Module):
  """Non-overlapping patch_size² patches → embed_dim tokens (conv with stride = kernel), LayerNorm."""

  def __init__(
    self, in_channels: int, embed_dim: int, patch_size: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs
  ):
    self.proj = nnx.Conv(
      in_channels,
      embed_dim,
      (patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      kernel_init=_trunc_normal,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) → tokens (B, gh·gw, D) in row-major grid order, and the grid (gh, gw).

    The stride-p p×p 'VALID' convolution computed as one (B·gh·gw, p·p·C) × (p·p·C, D) matmul on
    the image cut into patches: the same sums (bit-identical forward on CPU), but XLA:CPU's kernel
    gradient of the strided convolution transposed the whole input first (docs/performance.md).
    """
    x, kernel, bias = nnx_dtypes.promote_dtype(
      (x, self.proj.kernel[...], self.proj.bias[...]), dtype=self.proj.dtype
    )
    patch_h, patch_w, channels, dim = kernel.shape
    batch, grid_h, grid_w = x.shape[0], x.shape[1] // patch_h, x.shape[2] // patch_w
    x = x[:, : grid_h * patch_h, : grid_w * patch_w]  # 'VALID': a partial last patch is dropped
    patches = x.reshape(batch, grid_h, patch_h, grid_w, patch_w, channels).transpose(0, 1, 3, 2, 4, 5)
    tokens = patches.reshape(batch, grid_h * grid_w, patch_h * patch_w * channels) @ kernel.reshape(-1, dim)
    with jax.named_scope("norm"):
      return self.norm(tokens + bias), (grid_h, grid_w)


class LinearAttention(nnx.Module):
  """Multi-head attention with L2ViT's ReLU linear kernel ('softmax' kept for ablations)."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    attention: str = "linear",
    drop_rate: float = 0.0,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    if attention not in ATTENTION_FNS:
      raise ValueError(f"unknown attention {attention!r}; use one of {sorted(ATTENTION_FNS)}")
    self.num_heads = num_heads
    self.attention = attention
    head_dim = dim // num_heads
    self.temperature = nnx.Param(jnp.full((num_heads, 1, 1), head_dim**-0.5, jnp.float32))
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.proj_drop = Dropout(drop_rate, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    # PyTorch layout of the 3·dim qkv outputs: (q|k|v, head, head_dim).
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
    out = ATTENTION_FNS[self.attention](q, k, v, self.temperature[...])
    out = self.proj(out.transpose(0, 2, 1, 3).reshape(batch, tokens, dim))
    with jax.named_scope("dropout"):
      return self.proj_drop(out)


class DepthwiseConv(nnx.Module):
  """'Same'-padded depthwise conv; kernel (k, k, 1, C) — see ``depthwise.py`` for the layout."""

  def __init__(
    self,
    channels: int,
    kernel_size: int,
    *,
    dtype: Dtype | None = None,
    depthwise_implementation: str = "auto",
    rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(
      _trunc_normal(rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32)
    )
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.dtype = dtype
    # Settable model-wide with model.set_attributes(depthwise_implementation=...).
    self.depthwise_implementation = depthwise_implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = nnx_dtypes.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    return depthwise_conv2d(x, kernel, bias, implementation=self.depthwise_implementation)


class LocalConcentration(nnx.Module):
  """LCM: depthwise k×k → GELU → BatchNorm → depthwise k×k on the token grid (local detail)."""

  def __init__(self, dim: int, kernel_size: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs):
    self.conv1 = DepthwiseConv(dim, kernel_size, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(dim, dtype=dtype, rngs=rngs)
    self.conv2 = DepthwiseConv(dim, kernel_size, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    batch, tokens, dim = x.shape
    y = x.reshape(batch, *grid, dim)
    y = gelu(self.conv1(y))
    with jax.named_scope("norm"):
      y = checkpoint_name(self.bn(y), "lcm_norm")
    return self.conv2(y).reshape(batch, tokens, dim)


class Mlp(nnx.Module):
  """Linear → GELU → dropout → Linear → dropout."""

  def __init__(
    self, dim: int, hidden_dim: int, *, drop_rate: float = 0.0, dtype: Dtype | None = None, rngs: nnx.Rngs
  ):
    self.fc1 = _linear(dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden_dim, dim, dtype=dtype, rngs=rngs)
    self.drop = Dropout(drop_rate, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = gelu(self.fc1(x))
    with jax.named_scope("dropout"):
      x = self.drop(x)
    x = self.fc2(x)
    with jax.named_scope("dropout"):
      return self.drop(x)


class Dropout(nnx.Module):
  """Element-wise dropout drawing 8 random bits per element instead of a 32-bit uniform.

  An element is kept when its byte is below ``round(256 · (1 − rate))``, so the drop probability is
  ``rate`` rounded to a multiple of 1/256 (0.1 → 0.1016), and kept elements are scaled by 256 /
  threshold, unbiased for that probability. A quarter of the random bits of ``nnx.Dropout``: on TPU
  the mask draws were a fifth of the train step's memory traffic (docs/performance.md), and on the
  CPU and GPU one threefry hash gives four masks (``random_bytes``). Eval mode (``deterministic``)
  and rate 0 are the identity, as in PyTorch: inference and the parity tests do not see the difference.
  """

  def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs):
    self.rate = rate
    self.deterministic = deterministic  # switched by model.eval()/model.train(), like nnx.Dropout's
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array) -> jax.Array:
    threshold = round(256 * (1.0 - self.rate))
    if self.deterministic or threshold >= 256:
      return x
    if threshold <= 0:
      return jnp.zeros_like(x)
    keep = random_bytes(self.rngs(), x.shape) < jnp.uint8(threshold)
    return jnp.where(keep, x * jnp.asarray(256 / threshold, x.dtype), jnp.zeros_like(x))


def random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform random uint8 array of ``shape``, four bytes cut from each random 32-bit word.

  ``jax.random.bits(key, shape, jnp.uint8)`` with threefry keys (JAX's default, with
  ``jax_threefry_partitionable``) hashes a counter per element, however narrow the dtype, so a byte
  costs as much as a word: on XLA:CPU one (16, 625, 1024) dropout, mask and apply, took 98 ms that
  way against 24 ms from a quarter as many words (docs/performance.md). Keys of the 'rbg' family (the TPU's)
  draw bytes natively, so they keep ``jax.random.bits``. Byte k of word w is element 4·w + k, in
  row-major order.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32":
    return jax.random.bits(key, shape, jnp.uint8)
  size = int(np.prod(shape))
  words = jax.random.bits(key, (-(-size // 4), 1), jnp.uint32)
  shifts = jnp.arange(0, 32, 8, dtype=jnp.uint32)
  return ((words >> shifts) & 0xFF).astype(jnp.uint8).reshape(-1)[:size].reshape(shape)


class DropPath(nnx.Module):
  """Stochastic depth: drops a whole residual branch per sample, scaling kept ones by 1/keep."""

  def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs):
    self.rate = rate
    # Named like Dropout's flag so that model.eval()/model.train() switch it too.
    self.deterministic = deterministic
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, rate: float | jax.Array | None = None) -> jax.Array:
    """``rate`` (default ``self.rate``) may be traced (blocks under ``lax.scan``): then the mask is
    always drawn, and a rate of 0 keeps every sample, scaled by 1."""
    rate = self.rate if rate is None else rate
    if self.deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
  """Pre-norm residual block: attention, local concentration (LCM), MLP."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    lcm_kernel: int = 7,
    attention: str = "linear",
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = LinearAttention(
      dim, num_heads, attention=attention, drop_rate=drop_rate, dtype=dtype, rngs=rngs
    )
    self.norm_lcm = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.lcm = LocalConcentration(dim, lcm_kernel, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate=drop_rate, dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path_rate, rngs=rngs)

  def __call__(
    self, x: jax.Array, grid: tuple[int, int], drop_path_rate: float | jax.Array | None = None
  ) -> jax.Array:
    """``drop_path_rate`` overrides this block's own rate (``scan_blocks`` passes each block's)."""
    # Named scopes label the compiled step's operations by part (tpu/accounting.py); no numerics.
    for part, norm, branch in (
      ("attention", self.norm1, self.attn),
      ("lcm", self.norm_lcm, lambda y: self.lcm(y, grid)),
      ("mlp", self.norm2, self.mlp),
    ):
      with jax.named_scope("norm"):
        y = norm(x)
      with jax.named_scope(part):
        y = branch(y)
      with jax.named_scope("drop_path"):
        x = x + self.drop_path(y, drop_path_rate)
    return x


# Rematerialisation policies a scanned block may use, by name: '' saves every intermediate the
# backward pass needs; the others are jax.checkpoint policies. 'lcm_norm_saveable' recomputes the
# block except the LCM's BatchNorm output (``checkpoint_name`` 'lcm_norm'): the backward pass then
# reads it where the recomputed copy was fused into the depthwise kernel gradient, a fusion the TPU
# compiler generated three times; a fifth less compile time, more HBM traffic (docs/performance.md).
REMAT_POLICIES = {
  "": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "lcm_norm_saveable": jax.checkpoint_policies.save_only_these_names("lcm_norm"),
}
# config.remat_policy's default (config_lib): the least HBM traffic per step (docs/performance.md).
DEFAULT_REMAT_POLICY = "nothing_saveable"


def scan_blocks(
  blocks: list[Block], x: jax.Array, grid: tuple[int, int], *, remat_policy: str = ""
) -> jax.Array:
  """Runs ``blocks`` in order as one ``lax.scan`` over their stacked state, so XLA compiles one block.

  The same function as calling the blocks one after another (tests/test_models.py): each block's own
  parameters, BatchNorm statistics and dropout streams go through the loop as a slice of the stacked
  state and come back updated; its drop-path rate, the one static attribute in which the blocks
  differ, travels as data. The parameters stay stored per block (``blocks/{i}/...``), so checkpoints
  and PyTorch imports are untouched; stacking copies them once per step (5 M numbers, nothing next
  to the activations). ``remat_policy`` (``REMAT_POLICIES``) wraps the body in ``jax.checkpoint``:
  a scan keeps every residual of every iteration that the backward pass reads, where an unrolled
  graph lets XLA recompute cheap ones; 'dots_saveable' keeps the matmul outputs and recomputes the
  element-wise rest, 'nothing_saveable' recomputes the whole block (docs/performance.md: compile time,
  memory traffic and peak memory of each choice).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {remat_policy!r}; use one of {list(REMAT_POLICIES)}")
  graphdef = nnx.graphdef(blocks[0])
  states = [nnx.state(block) for block in blocks]
  if any(jax.tree.structure(state) != jax.tree.structure(states[0]) for state in states[1:]):
    raise ValueError("scan_blocks needs blocks of one structure; these differ")
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  rates = jnp.asarray([block.drop_path.rate for block in blocks], jnp.float32)

  def body(x, state_and_rate):
    state, rate = state_and_rate
    block = nnx.merge(graphdef, state)
    x = block(x, grid, drop_path_rate=rate)
    return x, nnx.state(block)

  if remat_policy:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  x, new_states = jax.lax.scan(body, x, (stacked, rates))
  for index, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda leaf, index=index: leaf[index], new_states))
  return x


class L2ViT(nnx.Module):
  """L2ViT with a classification head and a (standardised) jet-mass regression head.

  ``model(x)`` maps images (B, H, W, in_channels) to ``(class_logits (B, num_classes), mass (B, 1))``,
  both float32. ``dtype`` (e.g. jnp.bfloat16) sets the compute dtype; parameters stay float32 and the
  linear attention always runs in float32 at HIGHEST precision.

  How the blocks are compiled is not part of the model's function and not stored with checkpoints:
  ``scan_blocks`` (default False: one block after another) and ``remat_policy`` are attributes, set
  with ``model.set_attributes(scan_blocks=True, remat_policy='nothing_saveable')`` before the graph
  is split (``training.steps.configure_block_loop`` does it per platform).
  """

  def __init__(
    self,
    in_channels: int = 8,
    img_size: int = 125,
    patch_size: int = 5,
    embed_dim: int = 256,
    depth: int = 6,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    num_classes: int = 2,
    drop_rate: float = 0.1,
    drop_path_rate: float = 0.1,
    lcm_kernel: int = 7,
    attention: str = "linear",
    dtype: Dtype | None = None,
    *,
    rngs: nnx.Rngs,
  ):
    self.grid_size = (img_size // patch_size, img_size // patch_size)
    self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size, dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(
      _trunc_normal(rngs.params(), (1, self.grid_size[0] * self.grid_size[1], embed_dim), jnp.float32)
    )
    self.pos_drop = Dropout(drop_rate, rngs=rngs)
    # Stochastic depth grows linearly with depth: 0 for the first block, drop_path_rate for the last.
    drop_path_rates = np.linspace(0.0, drop_path_rate, depth)
    self.blocks = nnx.List(
      [
        Block(
          embed_dim,
          num_heads,
          mlp_ratio=mlp_ratio,
          drop_rate=drop_rate,
          drop_path_rate=float(rate),
          lcm_kernel=lcm_kernel,
          attention=attention,
          dtype=dtype,
          rngs=rngs,
        )
        for rate in drop_path_rates
      ]
    )
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.cls_head = _linear(embed_dim, num_classes, dtype=dtype, rngs=rngs)
    self.reg_head = _linear(embed_dim, 1, dtype=dtype, rngs=rngs)
    self.scan_blocks = False
    self.remat_policy = ""

  def tokens(
    self, x: jax.Array, *, token_mask: jax.Array | None = None, mask_token: jax.Array | None = None
  ) -> jax.Array:
    """Backbone output tokens (B, N, embed_dim) after the final LayerNorm.

    Where ``token_mask`` (B, N) is set, the patch token is replaced by ``mask_token`` (embed_dim,)
    before the position embedding: masked-image pretraining keeps the whole token grid, so the LCM
    still convolves a complete 2-D map.
    """
    with jax.named_scope("patch_embed"):
      x, grid = self.patch_embed(x)
      if token_mask is not None:
        x = jnp.where(token_mask[..., None], mask_token.astype(x.dtype), x)
      pos_embed = interpolate_pos_embed(self.pos_embed[...], self.grid_size, grid)
      x = x + pos_embed.astype(x.dtype)
    with jax.named_scope("dropout"):
      x = self.pos_drop(x)
    if self.scan_blocks and len(self.blocks) > 1:
      with jax.named_scope("blocks"):
        x = scan_blocks(list(self.blocks), x, grid, remat_policy=self.remat_policy)
    else:
      for index, block in enumerate(self.blocks):
        with jax.named_scope(f"block{index}"):
          x = block(x, grid)
    with jax.named_scope("norm"):
      return self.norm(x)

  def features(self, x: jax.Array) -> jax.Array:
    """Pooled backbone output (B, embed_dim): final LayerNorm, then mean over tokens."""
    return self.tokens(x).mean(axis=1)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.features(x)
    # Heads may compute in bf16; losses and metrics want float32.
    with jax.named_scope("head"):
      return (self.cls_head(features).astype(jnp.float32), self.reg_head(features).astype(jnp.float32))


class SimCLRProjector(nnx.Module):
  """SimCLR projection head: Linear → BatchNorm1d → GELU → Linear, output L2-normalised.

  Names mirror the PyTorch ``nn.Sequential`` as fc1 = net.0, bn = net.1, fc2 = net.3. Linear weights
  use PyTorch's default init, as the original did not override it here.
  """

  def __init__(
    self,
    in_dim: int = 256,
    hidden_dim: int = 256,
    out_dim: int = 128,
    *,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    self.fc1 = _linear(in_dim, hidden_dim, dtype=dtype, rngs=rngs, kernel_init=_torch_default_kernel_init)
    self.bn = _batch_norm(hidden_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden_dim, out_dim, dtype=dtype, rngs=rngs, kernel_init=_torch_default_kernel_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    z = self.fc2(gelu(self.bn(self.fc1(x)))).astype(jnp.float32)
    # Like torch F.normalize(z, dim=1): z / max(‖z‖, 1e-12).
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
