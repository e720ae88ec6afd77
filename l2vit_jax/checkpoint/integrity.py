"""Checkpoint integrity: SHA-256 digests of every saved array, verified on every restore.

The meta of every checkpoint holds ``digests``, the SHA-256 of each array's bytes as saved
(``{"model/params/blocks/0/attn/qkv/kernel": "sha256:..."}``), and every restore recomputes them. A
damaged checkpoint (a bad disk block, a torn copy) is refused with ``CheckpointDamagedError`` naming the
arrays; a resuming run sets the step aside as ``<step>.damaged`` and falls back to an older one.

Only damage is reported as damage. The digests must cover exactly the arrays read (an array without
a digest, or a digest without its array, is damage too: an edited or truncated digest set would verify
nothing). A read that fails in the storage itself (a network error, an HTTP 503 from GCS, a permission
error: ``storage_failure``) says nothing about the checkpoint: it is retried, and if the storage keeps
failing it raises ``StorageError`` with every file left where it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from l2vit_jax.checkpoint.naming import shown_names
from l2vit_jax.errors import CheckpointDamagedError, StorageError
from l2vit_jax.runtime import paths

DIGESTS = "digests"  # the meta key holding {"item/path/of/array": "sha256:<hex>"}
DAMAGED_SUFFIX = ".damaged"  # a damaged step set aside: not an integer, so Orbax ignores it
# A read failing in the storage is tried this often, waiting RETRY_SECONDS * 2**attempt in between
# (GCS asks clients to back off exponentially; gcsfs has already retried each request by then).
READ_ATTEMPTS = 3
RETRY_SECONDS = 2.0

# Errors of the storage rather than of the bytes read. tensorstore reports the gRPC/absl status name;
# gcsfs raises HttpError (with a status code), google-auth TransportError, aiohttp ClientError.
_STORAGE_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED|"
                             r"PERMISSION_DENIED|UNAUTHENTICATED)\b")
_STORAGE_ERROR_TYPES = ("HttpError", "TransportError", "RefreshError", "ClientError", "ServerDisconnectedError",
                        "ServiceUnavailable", "TooManyRequests", "InternalServerError", "GatewayTimeout",
                        "Forbidden", "Unauthorized")
# Local file-system errors that are the file system's, not the checkpoint's (a missing or undecodable
# file is the checkpoint's; EIO from a bad block is reported, not taken for damage, so a flaky disk
# never costs a checkpoint).
_STORAGE_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                   errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE, errno.EACCES,
                   errno.EPERM, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


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


def array_digests(items: dict[str, Any]) -> dict[str, str]:
  """SHA-256 of every array of ``{item: pytree}``, named ``item/key/key/...``.

  The names follow the pytree paths, which a restore into the same structure, or without a target
  (nested dicts keyed by the same names), reproduces.
  """
  digests = {}
  for item, tree in items.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      host = _host_copy(leaf)
      if host is not None:
        name = "/".join([item] + [_key_name(entry) for entry in path])
        digests[name] = "sha256:" + hashlib.sha256(host.view(np.uint8).data).hexdigest()  # no copy
  return digests


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
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: its meta's '{DIGESTS}' is not a "
                                 "{name: digest} object")
  damaged = damaged_arrays(items, meta)
  if damaged is None:
    logging.warning("%s: checkpoint has no array digests (written before integrity checks); "
                    "loading it unverified", where)
  elif damaged:
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: {len(damaged)} array(s) differ from "
                                 f"the digests saved with them: {shown_names(damaged)}")


def one_line(error: BaseException, limit: int = 300) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def storage_failure(error: BaseException) -> BaseException | None:
  """The error in ``error``'s chain that comes from the storage (network, service, permissions, I/O),
  not from the bytes it returned; None when the chain holds none (then the checkpoint is damaged)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (ConnectionError, TimeoutError, PermissionError)):
      return error
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
      return error
    if type(error).__name__ in _STORAGE_ERROR_TYPES or _STORAGE_STATUS.search(str(error)):
      return error
    error = error.__cause__ or error.__context__
  return None


def read_retrying(where: str, read):
  """``read()``, tried up to READ_ATTEMPTS times while it fails in the storage (``storage_failure``).

  Raises:
    StorageError: the storage failed every attempt, naming ``where`` and the last cause.
    Anything else ``read`` raises, at once.
  """
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except Exception as error:  # pylint: disable=broad-except
      cause = storage_failure(error)
      if cause is None:
        raise
      if attempt + 1 == READ_ATTEMPTS:
        raise StorageError(f"{where}: the storage failed {READ_ATTEMPTS} reads of this checkpoint "
                           f"({one_line(cause)}); nothing was changed or set aside: rerun the same "
                           "command once the storage answers") from error
      logging.warning("%s: reading failed in the storage (%s); retrying", where, one_line(cause, 200))
      time.sleep(RETRY_SECONDS * 2 ** attempt)
  raise AssertionError("unreachable")


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
    restored = read_retrying(where, lambda: manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)))
  except StorageError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # tensorstore, JSON, msgpack: all unreadable
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: cannot be read "
                                 f"({one_line(error)})") from error
  restored = {name: restored[name] for name in ["meta", *items]}
  if not isinstance(restored["meta"], dict):  # valid JSON, but not the object every checkpoint saves
    raise CheckpointDamagedError(f"{where}: damaged checkpoint: its meta is a JSON "
                                 f"{type(restored['meta']).__name__}, expected an object")
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
