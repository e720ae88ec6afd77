"""Checkpoint naming: the workdir layout and the flat array names every checkpoint uses.

Layout of a workdir (big_vision style: resuming is pointing at the same directory):

  WORKDIR/checkpoints/<step>/  latest training states (params, BatchNorm stats, optimizer state, step,
                               early-stopping state, Grain iterator), the last ``keep`` of them
  WORKDIR/best/<step>/         the model with the best validation loss so far, model only
  WORKDIR/lock                 held by the process-0 run using this workdir (``checkpoint.lock``)

Model parameters are stored as flat ``{"blocks/0/attn/qkv/kernel": array}`` dicts so checkpoints are
readable and mismatches can be reported by name. Every checkpoint carries a JSON ``meta`` item with the
model's constructor arguments, the pixel scale and the mass standardisation, so it can be restored and
evaluated without the config that produced it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from l2vit_jax.errors import CheckpointMismatchError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def flatten_names(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts → ``{"a/b/c": leaf}``, the naming used in every checkpoint."""
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(flatten_names(value, f"{prefix}{key}/"))
    return flat
  return {prefix[:-1]: tree}


def named_arrays(params: nnx.State, batch_stats: nnx.State) -> dict[str, dict[str, jax.Array]]:
  """The checkpoint layout of a model's state: ``{"params": {name: array}, "batch_stats": {...}}``."""
  return {
    "params": flatten_names(nnx.to_pure_dict(params)),
    "batch_stats": flatten_names(nnx.to_pure_dict(batch_stats)),
  }


def model_arrays(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
  return named_arrays(nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))


def describe_mismatch(expected: dict[str, Any], found: dict[str, Any], *, context: str) -> str | None:
  """One line listing missing, unexpected and mis-shaped names, or None when everything fits."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = [
    f"{k} {tuple(np.shape(found[k]))} vs model {tuple(np.shape(expected[k]))}"
    for k in sorted(set(expected) & set(found))
    if tuple(np.shape(expected[k])) != tuple(np.shape(found[k]))
  ]
  problems = [
    f"{label}: {shown_names(names)}"
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    if names
  ]
  return f"{context}: " + "; ".join(problems) if problems else None


def shown_names(names: list[str], limit: int = 8) -> str:
  """The first ``limit`` names, and how many there are when that is not all of them."""
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_model_arrays(
  model: nnx.Module,
  arrays: dict[str, dict[str, Any]],
  *,
  context: str,
  select: Callable[[str], bool] = lambda name: True,
) -> None:
  """Writes named arrays into ``model`` in place; names outside ``select`` are left untouched.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected or mis-shaped selected tensor.
  """
  for group, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    state = nnx.state(model, variable_type)
    pure = nnx.to_pure_dict(state)
    current = {k: v for k, v in flatten_names(pure).items() if select(k)}
    found = {k: v for k, v in arrays.get(group, {}).items() if select(k)}
    problem = describe_mismatch(current, found, context=f"{context} ({group})")
    if problem:
      raise CheckpointMismatchError(problem)
    for name, value in found.items():
      node = pure
      *parents, leaf = name.split("/")
      for key in parents:
        node = node[int(key) if key not in node and key.isdigit() else key]
      leaf_key = int(leaf) if leaf not in node and leaf.isdigit() else leaf
      node[leaf_key] = jax.numpy.asarray(value, dtype=np.asarray(node[leaf_key]).dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
