"""Checkpoint integrity: SHA-256 digests of every saved array, verified on every restore.

The meta of every checkpoint holds ``digests``, the SHA-256 of each array's bytes as saved
(``{"model/params/blocks/0/attn/qkv/kernel": "sha256:..."}``), and every restore recomputes them. A
damaged checkpoint (a bad disk block, a torn copy) is refused with ``CheckpointDamagedError`` naming the
arrays; a resuming run sets the step aside as ``<step>.damaged`` and falls back to an older one.

Only damage is reported as damage. The digests must cover exactly the arrays read (an array without
a digest, or a digest without its array, is damage too: an edited or truncated digest set would verify
nothing). A read that fails in the storage itself (a network error, an HTTP 503 from GCS, a permission
error: ``storage.read_failure``) says nothing about the checkpoint: it is retried, and if the storage keeps
failing it raises ``StorageError`` with every file left where it was.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from l2vit_jax.checkpoint import storage
from l2vit_jax.checkpoint.naming import shown_names
from l2vit_jax.errors import CheckpointDamagedError, StorageError
from l2vit_jax.runtime import paths

DIGESTS = "digests"  # the meta key holding {"item/path/of/array": "sha256:<hex>"}
DAMAGED_SUFFIX = ".damaged"  # a damaged step set aside: not an integer, so Orbax ignores it
# Meta keys that only versions saving digests write: a meta holding one but no digests was edited.
WRITTEN_WITH_DIGESTS = ("input_layout", "data_split")


def _key_name(entry) -> str:
  for attribute in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _host_copy(value) -> np.ndarray | None:
  """The bytes Orbax writes for ``value`` as one host array; None for Python scalars and for arrays
  split across processes (no process holds them whole; ours are replicated, so none are today)."""
  if not hasattr(value, "dtype"):
    return None
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    if not value.is_fully_replicated:
      return None
    value = value.addressable_data(0)
  return np.ascontiguousarray(np.asarray(value))


def _named_arrays(items: dict[str, Any]):
  """(``item/key/key/...``, leaf) of every array leaf (one with a dtype) of ``{item: pytree}``: the
  names digests are saved under, which a restore into the same structure, or without a target (nested
  dicts keyed by the same names), reproduces."""
  for item, tree in items.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if hasattr(leaf, "dtype"):
        yield "/".join([item] + [_key_name(entry) for entry in path]), leaf


def array_digests(items: dict[str, Any]) -> dict[str, str]:
  """SHA-256 of every array of ``{item: pytree}``, by ``_named_arrays``' names."""
  digests = {}
  for name, leaf in _named_arrays(items):
    host = _host_copy(leaf)
    if host is not None:
      digests[name] = "sha256:" + hashlib.sha256(host.view(np.uint8).data).hexdigest()  # no copy
  return digests


def structure_differences(items: dict[str, Any], meta: dict) -> list[str]:
  """Array names of ``items`` (a restore target) without a digest in ``meta``, and digest names of
  those items with no array in the target: the checkpoint holds another structure than the code now
  builds (another optimizer state after an upgrade), which no restore into it can read. Empty for a
  checkpoint without digests."""
  saved = meta.get(DIGESTS)
  if not isinstance(saved, dict):
    return []
  wanted = {name for name, _ in _named_arrays(items)}
  stored = {name for name in saved if name.split("/")[0] in items}
  return sorted(wanted ^ stored)


def with_digests(meta: dict, items: dict[str, Any]) -> dict:
  return dict(meta, **{DIGESTS: array_digests(items)})


def damaged_arrays(items: dict[str, Any], meta: dict) -> list[str] | None:
  """Names of the restored ``items``' arrays that differ from their saved digests, that have none, or
  whose digest names an array that was not restored; None when the checkpoint predates digests.

  Exactly the restored arrays must be covered: a digest set that is empty or names only some of them
  (a damaged or edited meta) would otherwise verify nothing, or only part.
  """
  saved = meta.get(DIGESTS)
  if saved is None:
    return None
  expected = {name: digest for name, digest in saved.items() if name.split("/")[0] in items}
  actual = array_digests(items)
  return sorted(name for name in expected.keys() | actual.keys() if actual.get(name) != expected.get(name))


def check_restored(where: str, items: dict[str, Any], meta: dict) -> None:
  """Raises CheckpointDamagedError naming the damaged arrays; warns once for a checkpoint without
  digests (written before they existed), which loads unverified. Digests that are not a
  ``{name: "sha256:..."}`` object (a damaged or edited meta) verify nothing: refused too."""
  saved = meta.get(DIGESTS)
  if saved is not None and not (isinstance(saved, dict) and all(isinstance(d, str) for d in saved.values())):
    raise CheckpointDamagedError(
      f"{where}: damaged checkpoint: its meta's '{DIGESTS}' is not a {{name: digest}} object"
    )
  damaged = damaged_arrays(items, meta)
  if damaged is None and any(key in meta for key in WRITTEN_WITH_DIGESTS):
    raise CheckpointDamagedError(
      f"{where}: damaged checkpoint: its meta has no '{DIGESTS}', yet it was "
      "written by a version that saves them"
    )
  if damaged is None:
    logging.warning(
      "%s: checkpoint has no array digests (written before integrity checks); loading it unverified", where
    )
  elif damaged:
    raise CheckpointDamagedError(
      f"{where}: damaged checkpoint: {len(damaged)} array(s) differ from "
      f"the digests saved with them: {shown_names(damaged)}"
    )


def restore_verified(manager: ocp.CheckpointManager, step: int, **items) -> dict:
  """``manager.restore`` of ``items`` (``meta`` is added), each array checked against its digest.

  An item may be a function of the step directory returning its restore args (read there first).

  Raises:
    CheckpointDamagedError: naming the step directory and the damaged arrays, or the read error of a
      checkpoint that cannot be read at all (a corrupted index, unparsable JSON).
  """
  where = paths.join(os.fspath(manager.directory), str(step))
  try:
    items = {name: item(where) if callable(item) else item for name, item in items.items()}
    restored = storage.read_retrying(
      where, lambda: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
    )
  except StorageError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # tensorstore, JSON, msgpack: all unreadable
    if storage.damage_evidence(error) is not None:
      raise CheckpointDamagedError(
        f"{where}: damaged checkpoint: cannot be read ({storage.one_line(error)})"
      ) from error
    raise CheckpointDamagedError(
      f"{where}: checkpoint cannot be read ({storage.one_line(error)}); no sign of damage in its files, "
      "so it is left in place (short of memory? another library version?)",
      proven=False,
    ) from error
  restored = {name: restored[name] for name in ["meta", *items]}
  if not isinstance(restored["meta"], dict):  # valid JSON, but not the object every checkpoint saves
    raise CheckpointDamagedError(
      f"{where}: damaged checkpoint: its meta is a JSON {type(restored['meta']).__name__}, expected an object"
    )
  verifiable = {name: restored[name] for name in items if name != "data"}  # Grain state: JSON, no digest
  if verifiable:
    check_restored(where, verifiable, dict(restored["meta"]))
  return restored


def set_aside(directory: str, step: int) -> str:
  """Renames ``directory/<step>`` to ``<step>.damaged`` (kept for inspection, ignored by Orbax).

  On ``gs://`` a rename is a copy and a delete of every object (etils.epath), slower but equivalent.
  """
  source = paths.join(directory, str(step))
  target, n = source + DAMAGED_SUFFIX, 1
  while paths.exists(target):  # an earlier run set this step aside too
    target, n = f"{source}{DAMAGED_SUFFIX}-{n}", n + 1
  paths.as_path(source).rename(paths.as_path(target))
  return target
