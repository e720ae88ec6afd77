"""Imports checkpoints of the PyTorch original into the NNX L2ViT and SimCLR projector.

Names map mechanically because the NNX attribute names mirror the PyTorch ones; only leaf names and
layouts change:

  PyTorch                                     NNX
  Linear weight (out, in)                     kernel (in, out)
  Conv weight (out, in/groups, kh, kw)        kernel (kh, kw, in/groups, out)  [Flax HWIO]
    ... depthwise (C, 1, k, k)                kernel (k, k, 1, C)   [layout of depthwise_conv2d]
  LayerNorm / BatchNorm weight, bias          scale, bias
  BatchNorm running_mean, running_var         mean, var   (num_batches_tracked is dropped)
  pos_embed, attn.temperature                 unchanged
  projector net.0 / net.1 / net.3             fc1 / bn / fc2

Every tensor must be accounted for: unknown, missing and mis-shaped tensors are all reported together
in one CheckpointImportError.

torch is imported lazily (only to read .pt files); ``pip install torch`` (CPU wheel) provides it.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2vit_jax.models import L2ViT
from l2vit_jax.models import SimCLRProjector
from l2vit_jax.errors import CheckpointImportError
from l2vit_jax.interop.torch_reference import require_torch

StateDict = Mapping[str, Any]

# Prefixes that wrappers add to every key (nn.DataParallel / DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HEAD_PREFIXES = ("cls_head.", "reg_head.")
_PROJECTOR_RENAMES = {"fc1": "net.0", "bn": "net.1", "fc2": "net.3"}
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


# --- reading .pt files -----------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
  """numpy scalar/array reconstructors that weights_only loading may allow (e.g. a np.float64 mean).

  Files written under numpy 1.x name them ``numpy.core.*``, under 2.x ``numpy._core.*``.
  """
  from numpy._core import multiarray  # pylint: disable=import-outside-toplevel

  dtype_classes = [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")]
  safe = [np.ndarray, np.dtype, *dtype_classes]
  for name in ("scalar", "_reconstruct"):
    function = getattr(multiarray, name)
    safe += [function, (function, f"numpy.core.multiarray.{name}")]
  return safe


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor; numpy has no bfloat16, so widen it
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype.itemsize < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _to_python(value: Any) -> Any:
  """Tensors and numpy values (in nested lists/dicts) → plain Python, so meta stays JSON-friendly."""
  if isinstance(value, Mapping):
    return {str(k): _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if hasattr(value, "detach") or isinstance(value, (np.ndarray, np.generic)):
    return _to_numpy(value).tolist()
  return value


def _to_float(value: Any) -> float | None:
  return None if value is None else float(_to_numpy(value))


def _numpy_state_dict(state_dict: StateDict) -> dict[str, np.ndarray]:
  state_dict = {str(k): _to_numpy(v) for k, v in state_dict.items()}
  for prefix in _WRAPPER_PREFIXES:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
  return state_dict


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def load_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> dict[str, Any]:
  """Reads a checkpoint written by the original with ``torch.save``.

  Recognises the finetuned dict (``model_state_dict``, ``mass_mean``, ``mass_std``, ``history``), the
  SimCLR dict (``encoder_state_dict``, ``proj_head_state_dict``) and a bare model state dict.

  Args:
    path: the .pt file.
    trust_pickle: load with ``weights_only=False``, i.e. run arbitrary pickled code. Only needed for
      files holding objects beyond tensors, containers, numbers and numpy scalars; only for files
      from a trusted source.

  Returns:
    {'kind': 'finetuned' | 'simclr' | 'state_dict', 'model_state_dict': {name: np.ndarray},
     'projector_state_dict': {name: np.ndarray} | None, 'mass_mean': float | None,
     'mass_std': float | None, 'history': plain-Python history | None}.
  """
  torch = require_torch()
  try:
    if trust_pickle:
      checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    else:
      with torch.serialization.safe_globals(_numpy_safe_globals()):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises several types; all mean "cannot read this file"
    hint = (
      ""
      if trust_pickle or not isinstance(error, pickle.UnpicklingError)
      else (
        " If the file comes from a trusted source and holds other Python objects, retry with "
        "trust_pickle=True (--trust_pickle)."
      )
    )
    raise CheckpointImportError(f"cannot load {path}: {error}.{hint}") from error

  if isinstance(checkpoint, Mapping) and "model_state_dict" in checkpoint:
    kind, model_state, projector_state = "finetuned", checkpoint["model_state_dict"], None
  elif isinstance(checkpoint, Mapping) and "encoder_state_dict" in checkpoint:
    kind, model_state = "simclr", checkpoint["encoder_state_dict"]
    projector_state = checkpoint.get("proj_head_state_dict")
  elif _is_state_dict(checkpoint):
    kind, model_state, projector_state = "state_dict", checkpoint, None
  else:
    keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise CheckpointImportError(
      f"{path}: not an L2ViT checkpoint; expected a dict with model_state_dict or "
      f"encoder_state_dict, or a bare state dict, got {keys}"
    )
  return {
    "kind": kind,
    "model_state_dict": _numpy_state_dict(model_state),
    "projector_state_dict": (None if projector_state is None else _numpy_state_dict(projector_state)),
    "mass_mean": _to_float(checkpoint.get("mass_mean")) if kind == "finetuned" else None,
    "mass_std": _to_float(checkpoint.get("mass_std")) if kind == "finetuned" else None,
    "history": _to_python(checkpoint.get("history")) if kind == "finetuned" else None,
  }


# --- architecture --------------------------------------------------------------------------------


def _shape(state_dict: StateDict, name: str) -> tuple[int, ...]:
  if name not in state_dict:
    raise CheckpointImportError(f"cannot infer the architecture: tensor {name!r} is missing")
  return tuple(state_dict[name].shape)


def infer_model_config(state_dict: StateDict) -> dict[str, Any]:
  """L2ViT constructor kwargs read off the tensor shapes of a PyTorch state dict.

  Dropout and drop-path rates leave no trace in weights; they keep the L2ViT defaults. Without a
  cls_head (a SimCLR encoder saved without heads) num_classes is 2.
  """
  state_dict = _numpy_state_dict(state_dict)
  embed_dim, in_channels, patch_size, patch_size_w = _shape(state_dict, "patch_embed.proj.weight")
  if patch_size != patch_size_w:
    raise CheckpointImportError(f"non-square patches {patch_size}×{patch_size_w} are not supported")
  tokens = _shape(state_dict, "pos_embed")[1]
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise CheckpointImportError(f"pos_embed has {tokens} tokens, not a square grid")
  block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not block_ids or block_ids != set(range(len(block_ids))):
    raise CheckpointImportError(f"expected blocks numbered 0..depth-1, found {sorted(block_ids)}")
  hidden_dim = _shape(state_dict, "blocks.0.mlp.fc1.weight")[0]
  config = dict(
    in_channels=in_channels,
    img_size=grid * patch_size,
    patch_size=patch_size,
    embed_dim=embed_dim,
    depth=len(block_ids),
    num_heads=_shape(state_dict, "blocks.0.attn.temperature")[0],
    mlp_ratio=hidden_dim / embed_dim,
    lcm_kernel=_shape(state_dict, "blocks.0.lcm.conv1.weight")[-1],
  )
  # SimCLR encoders may lack the heads; the L2ViT default then keeps the config complete.
  config["num_classes"] = _shape(state_dict, "cls_head.weight")[0] if "cls_head.weight" in state_dict else 2
  return config


def infer_projector_config(state_dict: StateDict) -> dict[str, int]:
  """SimCLRProjector kwargs (in_dim, hidden_dim, out_dim) from net.0 / net.3 weight shapes."""
  state_dict = _numpy_state_dict(state_dict)
  hidden_dim, in_dim = _shape(state_dict, "net.0.weight")
  out_dim = _shape(state_dict, "net.3.weight")[0]
  return dict(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)


# --- tensor mapping -------------------------------------------------------------------------------


def _torch_name(path: tuple[Any, ...], module_renames: Mapping[str, str]) -> str:
  *modules, leaf = (str(part) for part in path)
  return ".".join([module_renames.get(m, m) for m in modules] + [_LEAF_RENAMES.get(leaf, leaf)])


def _torch_layout_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of an NNX variable: the inverse of :func:`_to_flax_layout`."""
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if leaf == "kernel" and len(shape) == 4:
    kh, kw, in_per_group, out = shape
    return (out, in_per_group, kh, kw)
  return shape


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def _fill(
  module: nnx.Module,
  state_dict: StateDict,
  module_renames: Mapping[str, str],
  optional_prefixes: tuple[str, ...] = (),
) -> None:
  state_dict = _numpy_state_dict(state_dict)
  targets = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))):
    targets[_torch_name(path, module_renames)] = (str(path[-1]), variable)

  unknown = sorted(k for k in state_dict if k not in targets and not k.endswith(".num_batches_tracked"))
  missing = sorted(k for k in targets if k not in state_dict and not k.startswith(optional_prefixes))
  misshaped = []
  for name, (leaf, variable) in targets.items():
    if name in state_dict:
      expected = _torch_layout_shape(leaf, tuple(variable.shape))
      if tuple(state_dict[name].shape) != expected:
        misshaped.append(f"{name} {tuple(state_dict[name].shape)} (model expects {expected})")
  problems = [
    f"{label}: {', '.join(names)}"
    for label, names in (
      ("unknown tensors", unknown),
      ("missing tensors", missing),
      ("mis-shaped tensors", misshaped),
    )
    if names
  ]
  if problems:
    raise CheckpointImportError(f"state dict does not match {type(module).__name__}: " + "; ".join(problems))

  for name, (leaf, variable) in targets.items():
    if name in state_dict:
      variable[...] = jnp.asarray(_to_flax_layout(leaf, state_dict[name]), variable.dtype)


def convert_state_dict(state_dict: StateDict, model: L2ViT, *, allow_missing_heads: bool = False) -> None:
  """Fills ``model`` in place from a PyTorch L2ViT state dict.

  Args:
    state_dict: PyTorch names → tensors or arrays.
    model: an L2ViT of the matching architecture (see :func:`infer_model_config`).
    allow_missing_heads: leave cls_head / reg_head as initialised when the checkpoint has none
      (SimCLR encoders may be saved without them).

  Raises:
    CheckpointImportError: listing all unknown, missing and mis-shaped tensors.
  """
  _fill(model, state_dict, {}, _HEAD_PREFIXES if allow_missing_heads else ())


def convert_projector_state_dict(state_dict: StateDict, projector: SimCLRProjector) -> None:
  """Fills a SimCLRProjector in place from a PyTorch ``net.{0,1,3}`` state dict."""
  _fill(projector, state_dict, _PROJECTOR_RENAMES)


def import_checkpoint(
  path: str, *, trust_pickle: bool = False
) -> tuple[L2ViT, SimCLRProjector | None, dict[str, Any]]:
  """Reads a PyTorch checkpoint and returns the NNX model, projector (SimCLR only) and metadata.

  Models come back in eval mode (call ``.train()`` to finetune). Metadata:
  {'model_config': L2ViT kwargs, 'pixel_scale': 1.0, 'mass_mean', 'mass_std', 'history',
   'source': 'torch:' + path}. ``pixel_scale`` is what images are divided by before the
  model; the original's divisor is not stored in its checkpoints, so 1.0 is assumed — set 255 if
  the weights were trained on pixels / 255.
  """
  checkpoint = load_torch_checkpoint(path, trust_pickle=trust_pickle)
  model_config = infer_model_config(checkpoint["model_state_dict"])
  model = L2ViT(**model_config, rngs=nnx.Rngs(0))
  convert_state_dict(
    checkpoint["model_state_dict"], model, allow_missing_heads=checkpoint["kind"] == "simclr"
  )
  model.eval()
  projector = None
  if checkpoint["projector_state_dict"] is not None:
    projector = SimCLRProjector(
      **infer_projector_config(checkpoint["projector_state_dict"]), rngs=nnx.Rngs(0)
    )
    convert_projector_state_dict(checkpoint["projector_state_dict"], projector)
    projector.eval()
  meta = {
    "model_config": model_config,
    "pixel_scale": 1.0,
    "mass_mean": checkpoint["mass_mean"],
    "mass_std": checkpoint["mass_std"],
    "history": checkpoint["history"],
    "source": f"torch:{path}",
  }
  return model, projector, meta
