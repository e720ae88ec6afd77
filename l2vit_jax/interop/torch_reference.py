"""PyTorch L2ViT with the original's structure and ``state_dict`` names (docs/design.md, Model).

Written from the design description, not copied: it is the reference for the parity tests and the
baseline the benchmarks time. Images are NCHW here, as in the original; callers transpose.

torch is imported lazily so that this module can be imported (and the JAX package used) without it::

  from l2vit_jax.interop import torch_reference
  model = torch_reference.build_torch_l2vit(img_size=25, embed_dim=32, depth=2, num_heads=2)
  projector = torch_reference.build_torch_projector(in_dim=32, hidden_dim=32, out_dim=16)
"""

from __future__ import annotations

import functools
import types
from typing import Any

INSTALL_HINT = (
  "PyTorch is needed for this (the CPU wheel is enough): pip install torch (tested with torch==2.13.0)"
)


def require_torch() -> Any:
  """Returns the ``torch`` module or raises ImportError saying how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(INSTALL_HINT) from error
  return torch


@functools.cache
def torch_modules() -> types.SimpleNamespace:
  """The reference nn.Module classes, defined on first use (they subclass torch.nn.Module)."""
  torch = require_torch()
  nn = torch.nn
  functional = torch.nn.functional

  class PatchEmbed(nn.Module):
    def __init__(self, in_channels, embed_dim, patch_size):
      super().__init__()
      self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
      self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
      x = self.proj(x)
      grid = tuple(x.shape[2:])
      return self.norm(x.flatten(2).transpose(1, 2)), grid

  class LinearAttention(nn.Module):
    def __init__(self, dim, num_heads, drop_rate):
      super().__init__()
      self.num_heads = num_heads
      self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)
      self.proj_drop = nn.Dropout(drop_rate)

    def forward(self, x):
      batch, tokens, dim = x.shape
      qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)
      q, k = functional.relu(q), functional.relu(k)
      kv = torch.einsum("bhnd,bhne->bhde", k, v) * self.temperature
      denominator = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)).clamp(min=100.0)
      out = torch.einsum("bhnd,bhde->bhne", q, kv) / denominator.unsqueeze(-1)
      out = out.transpose(1, 2).reshape(batch, tokens, dim)
      return self.proj_drop(self.proj(out))

  class LocalConcentration(nn.Module):
    def __init__(self, dim, kernel_size):
      super().__init__()
      self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
      self.act = nn.GELU()
      self.bn = nn.BatchNorm2d(dim)
      self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x, grid):
      batch, tokens, dim = x.shape
      y = x.transpose(1, 2).reshape(batch, dim, *grid)
      y = self.conv2(self.bn(self.act(self.conv1(y))))
      return y.flatten(2).transpose(1, 2)

  class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop_rate):
      super().__init__()
      self.fc1 = nn.Linear(dim, hidden_dim)
      self.act = nn.GELU()
      self.fc2 = nn.Linear(hidden_dim, dim)
      self.drop = nn.Dropout(drop_rate)

    def forward(self, x):
      return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

  class DropPath(nn.Module):
    def __init__(self, rate):
      super().__init__()
      self.rate = rate

    def forward(self, x):
      if not self.training or self.rate == 0.0:
        return x
      keep = 1.0 - self.rate
      mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
      return x * mask / keep

  class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_rate, drop_path_rate, lcm_kernel):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim)
      self.attn = LinearAttention(dim, num_heads, drop_rate)
      self.norm_lcm = nn.LayerNorm(dim)
      self.lcm = LocalConcentration(dim, lcm_kernel)
      self.norm2 = nn.LayerNorm(dim)
      self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate)
      self.drop_path = DropPath(drop_path_rate)

    def forward(self, x, grid):
      x = x + self.drop_path(self.attn(self.norm1(x)))
      x = x + self.drop_path(self.lcm(self.norm_lcm(x), grid))
      return x + self.drop_path(self.mlp(self.norm2(x)))

  class L2ViT(nn.Module):
    """Takes NCHW images; returns (class_logits, mass)."""

    def __init__(
      self,
      in_channels=8,
      img_size=125,
      patch_size=5,
      embed_dim=256,
      depth=6,
      num_heads=4,
      mlp_ratio=4.0,
      num_classes=2,
      drop_rate=0.1,
      drop_path_rate=0.1,
      lcm_kernel=7,
    ):
      super().__init__()
      self.grid_size = (img_size // patch_size, img_size // patch_size)
      self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
      self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
      self.pos_drop = nn.Dropout(drop_rate)
      rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
      self.blocks = nn.ModuleList(
        [Block(embed_dim, num_heads, mlp_ratio, drop_rate, rate, lcm_kernel) for rate in rates]
      )
      self.norm = nn.LayerNorm(embed_dim)
      self.cls_head = nn.Linear(embed_dim, num_classes)
      self.reg_head = nn.Linear(embed_dim, 1)
      nn.init.trunc_normal_(self.pos_embed, std=0.02)
      self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
      if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
          nn.init.zeros_(module.bias)
      elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

    def features(self, x):
      x, grid = self.patch_embed(x)
      pos_embed = self.pos_embed
      if grid != self.grid_size:
        dim = pos_embed.shape[-1]
        pos_embed = pos_embed.reshape(1, *self.grid_size, dim).permute(0, 3, 1, 2)
        pos_embed = functional.interpolate(pos_embed, size=grid, mode="bilinear", align_corners=False)
        pos_embed = pos_embed.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
      x = self.pos_drop(x + pos_embed)
      for block in self.blocks:
        x = block(x, grid)
      return self.norm(x).mean(dim=1)

    def forward(self, x):
      features = self.features(x)
      return self.cls_head(features), self.reg_head(features)

  class SimCLRProjector(nn.Module):
    """net.0 Linear, net.1 BatchNorm1d, net.2 GELU, net.3 Linear; L2-normalised output."""

    def __init__(self, in_dim=256, hidden_dim=256, out_dim=128):
      super().__init__()
      self.net = nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
      )

    def forward(self, x):
      return functional.normalize(self.net(x), dim=1)

  return types.SimpleNamespace(
    PatchEmbed=PatchEmbed,
    LinearAttention=LinearAttention,
    LocalConcentration=LocalConcentration,
    Mlp=Mlp,
    DropPath=DropPath,
    Block=Block,
    L2ViT=L2ViT,
    SimCLRProjector=SimCLRProjector,
  )


def build_torch_l2vit(**kwargs) -> Any:
  """A PyTorch L2ViT (``torch.nn.Module``); kwargs as ``l2vit_jax.models.L2ViT`` minus dtype/rngs."""
  return torch_modules().L2ViT(**kwargs)


def build_torch_projector(**kwargs) -> Any:
  """A PyTorch SimCLR projector with state_dict names net.0 / net.1 / net.3."""
  return torch_modules().SimCLRProjector(**kwargs)
