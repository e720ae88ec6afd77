"""Workdir paths: local folders and ``gs://`` buckets through one set of helpers.

Every read and write of a workdir, an ``init_from`` checkpoint or an evaluation report goes through
``etils.epath`` (the path library Orbax uses; for ``gs://`` it runs on ``gcsfs``), so a run on a TPU VM
can use ``--workdir=gs://BUCKET/run``. Cloud Storage differs from a disk in three ways the helpers hide:

* there are no folders: ``makedirs`` does nothing there (an object's name creates its "folders");
* an object appears whole when its upload completes, so ``write_bytes`` needs no temporary name there
  (locally it writes one and renames it, so a reader never sees half a file);
* there is no ``O_EXCL``: ``create_exclusive`` asks for the upload with the precondition
  ``ifGenerationMatch=0``, which the service refuses when the object already exists. More generally
  every object has a generation (a number that changes with each write and is never reused), and
  ``read_generation`` / ``write_if_generation`` / ``remove_if_generation`` make compare-and-swap out of
  it: of two writers that both saw generation G, exactly one replaces it (``checkpoint.workdir_lock``).
"""

from __future__ import annotations

import io
import json
import os

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URLs such as ``gs://bucket/run`` (object stores), False for local paths."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``; local paths are made absolute (Orbax requires it)."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def join(path: PathLike, *parts: str) -> str:
  """``os.path.join`` that keeps ``gs://`` intact, returned as a string (config values are strings)."""
  if is_remote(path):
    return os.fspath(epath.Path(os.fspath(path)).joinpath(*parts))
  return os.path.join(path, *parts)


def makedirs(path: PathLike) -> None:
  """Creates a local folder and its parents; nothing to do on an object store."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def read_text(path: PathLike) -> str:
  """The file's text; raises FileNotFoundError when it is missing (local or remote)."""
  return as_path(path).read_text(encoding="utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
  """Replaces ``path`` with ``data`` so that readers see the old content or the new, never a part."""
  path = as_path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  temporary.write_bytes(data)
  os.replace(temporary, path)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_with(path: PathLike, writer, **kwargs) -> None:
  """Runs ``writer(file_object, **kwargs)`` into memory and writes the bytes with ``write_bytes``.

  For libraries that write to a file object (``numpy.savez``, matplotlib's ``savefig``).
  """
  buffer = io.BytesIO()
  writer(buffer, **kwargs)
  write_bytes(path, buffer.getvalue())


def create_exclusive(path: PathLike, data: bytes) -> bool:
  """Creates ``path`` holding ``data`` only if it does not exist; False if it already did.

  Atomic in both places: locally ``O_CREAT | O_EXCL``; on GCS an upload with the precondition
  ``ifGenerationMatch=0`` (of two concurrent creators exactly one succeeds).
  """
  if is_remote(path):
    return write_if_generation(path, data, 0) is not None
  try:
    fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as file:
    file.write(data)
  return True


def _gcs_object(path: PathLike):
  """(gcsfs filesystem, bucket, object name) of a ``gs://`` URL; ValueError for anything else."""
  path = os.fspath(path)
  if not path.startswith("gs://"):
    raise ValueError(f"{path}: object generations exist only on gs://")
  import fsspec  # pylint: disable=import-outside-toplevel
  filesystem, object_path = fsspec.core.url_to_fs(path)
  bucket, _, name = object_path.partition("/")
  return filesystem, bucket, name


def read_generation(path: PathLike) -> tuple[bytes, int] | None:
  """A ``gs://`` object's bytes and the generation they belong to (one request); None if missing."""
  filesystem, bucket, name = _gcs_object(path)
  try:
    headers, data = filesystem.call("GET", "b/{}/o/{}", bucket, name, alt="media")
  except FileNotFoundError:
    return None
  return data, int(headers["x-goog-generation"])


def write_if_generation(path: PathLike, data: bytes, generation: int) -> int | None:
  """Writes a ``gs://`` object only if its generation is still ``generation`` (0: only if it does not
  exist); returns the new generation, or None when the precondition failed (someone else wrote first).

  A multipart upload with ``ifGenerationMatch``, as gcsfs's own ``mode="create"`` sends it: the service
  checks the precondition and writes in one step, so of two writers that saw the same generation
  exactly one succeeds.
  """
  filesystem, bucket, name = _gcs_object(path)
  metadata = json.dumps({"name": name})
  body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{metadata}\n--==0==\n"
          "Content-Type: application/octet-stream\n\n").encode() + data + b"\n--==0==--"
  upload = filesystem.base[:-len("storage/v1/")] + "upload/storage/v1/b/{}/o"
  try:
    reply = filesystem.call("POST", upload, bucket, uploadType="multipart", ifGenerationMatch=str(generation),
                            headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body,
                            json_out=True)
  except FileExistsError:  # HTTP 412: the precondition failed
    return None
  filesystem.invalidate_cache(f"{bucket}/{name}")
  return int(reply["generation"])


def remove_if_generation(path: PathLike, generation: int) -> bool:
  """Deletes a ``gs://`` object only if its generation is still ``generation``; False otherwise."""
  filesystem, bucket, name = _gcs_object(path)
  try:
    filesystem.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):
    return False
  filesystem.invalidate_cache(f"{bucket}/{name}")
  return True


def remove(path: PathLike) -> None:
  """Deletes a file or object; a missing one is not an error."""
  try:
    as_path(path).unlink()
  except FileNotFoundError:
    pass


def process_alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this host: decides if the writer of a lock or a temporary
  file is gone (its leftovers may then be taken over or removed)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True
