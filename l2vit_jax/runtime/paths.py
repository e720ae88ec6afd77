"""Workdir paths: local folders and ``gs://`` buckets through one set of helpers.

Every read and write of a workdir, an ``init_from`` checkpoint or an evaluation report goes through
``etils.epath`` (the path library Orbax uses; for ``gs://`` it runs on ``gcsfs``), so a run on a TPU VM
can use ``--workdir=gs://BUCKET/run``. Cloud Storage differs from a disk in three ways the helpers hide:

* there are no folders: ``makedirs`` does nothing there (an object's name creates its "folders");
* an object appears whole when its upload completes, so ``write_bytes`` needs no temporary name there
  (locally it writes one and renames it, so a reader never sees half a file: see below);
* there is no ``O_EXCL``: ``create_exclusive`` asks for the upload with the precondition
  ``ifGenerationMatch=0``, which the service refuses when the object already exists. More generally
  every object has a generation (a number that changes with each write and is never reused), and
  ``read_generation`` / ``write_if_generation`` / ``remove_if_generation`` make compare-and-swap out of
  it: of two writers that both saw generation G, exactly one replaces it (``checkpoint.workdir_lock``).

Replacing a local file. Every file the package writes whole (reports, JSON results, exported models,
jet files and their chunks, ``.sparse`` files) is written under one kind of temporary name and renamed
over its final name only when complete (``replacing``; ``write_bytes`` for data in memory), so a
reader, or a rerun after a kill, sees the old file or the new one, never a part. The temporary of
``DIR/NAME`` is ``DIR/.NAME.PID@HOST.TOKEN.partial`` (``temporary_name``): hidden, in the same directory
(so the rename is atomic: one filesystem), unique per writer, and naming the process and host that own
it. A writer that fails removes its temporary; one that is killed cannot, so each write of ``NAME``
first deletes the temporaries of ``NAME`` (and of helper files ``NAME.*``) whose process on this host
is gone (``remove_stale_temporaries``); another host's cannot be judged and are left. Nothing reads a
temporary; ``is_temporary`` recognises one (``scripts/chaos_run.py`` lists the ones kills left behind).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import socket
from typing import Iterator

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
  with replacing(path) as temporary:
    with open(temporary, "wb") as file:
      file.write(data)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, data) -> None:
  """Replaces ``path`` with ``data`` as indented, strict JSON (no NaN or infinities: other readers
  refuse them, so callers map them to null first) and a final newline."""
  write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_with(path: PathLike, writer, **kwargs) -> None:
  """Runs ``writer(file_object, **kwargs)`` into memory and writes the bytes with ``write_bytes``.

  For libraries that write to a file object (``numpy.savez``, matplotlib's ``savefig``).
  """
  buffer = io.BytesIO()
  writer(buffer, **kwargs)
  write_bytes(path, buffer.getvalue())


# --- temporaries of local files being replaced (module docstring) ---------------------------------------

TEMPORARY_SUFFIX = ".partial"
# .NAME.PID@HOST.TOKEN.partial, as temporary_name writes it (a host name has no "@" and no "/").
_TEMPORARY = re.compile(
  r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.[0-9a-f]+" + re.escape(TEMPORARY_SUFFIX) + "$"
)


def temporary_name(
  path: PathLike, *, pid: int | None = None, host: str | None = None, token: str | None = None
) -> str:
  """The hidden temporary of the local file ``path``: ``DIR/.NAME.PID@HOST.TOKEN.partial`` (this
  process, this host and a random token unless given: the tests forge other writers' temporaries)."""
  directory, name = os.path.split(os.path.abspath(path))
  pid = os.getpid() if pid is None else pid
  host = _machine_tag() if host is None else host
  token = secrets.token_hex(4) if token is None else token
  return os.path.join(directory, f".{name}.{pid}@{host}.{token}{TEMPORARY_SUFFIX}")


def is_temporary(name: str) -> bool:
  """Whether the file name ``name`` (no directory) is a temporary of ``temporary_name``."""
  return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(path: PathLike) -> list[str]:
  """Deletes the temporaries of the local file ``path``, and of its helper files ``path.*``, whose
  writer was a process of this machine (host name, boot and PID namespace: ``_machine_tag``) that is
  gone; returns their paths.

  A killed writer leaves its temporary behind (at full size a jet file's is hundreds of MB, one per
  kill). Another host's temporaries (a shared filesystem) are left: whether their process lives cannot
  be checked from here.
  """
  directory, name = os.path.split(os.path.abspath(path))
  host = _machine_tag()  # another container with our host name has another PID namespace: not judged
  stale = []
  for entry in os.listdir(directory) if os.path.isdir(directory) else ():
    match = _TEMPORARY.match(entry)
    if (
      match
      and (match["name"] == name or match["name"].startswith(name + "."))
      and match["host"] == host
      and not process_alive(int(match["pid"]))
    ):
      stale.append(os.path.join(directory, entry))
  for temporary in stale:
    try:
      os.remove(temporary)
    except FileNotFoundError:  # another writer removed it first
      pass
  return stale


def move_into_place(source: PathLike, path: PathLike) -> None:
  """Renames the complete local file ``source`` over ``path`` in one step (same filesystem): a reader
  sees the old ``path`` or the new one. The one rename of the package's writers."""
  os.replace(source, path)


@contextlib.contextmanager
def replacing(path: PathLike, *, sweep: bool = True) -> Iterator[str]:
  """Yields the temporary to write the local file ``path`` into; renames it over ``path`` when the
  block ends normally and removes it when the block raises, so ``path`` is the old file or the
  complete new one. Stale temporaries of ``path`` are removed first unless ``sweep`` is False (a
  caller that cleared the whole directory already).

  Nested blocks replace their files innermost first, and an exception (a failed rename included)
  removes every temporary not yet renamed::

    with paths.replacing(main) as main_temporary, paths.replacing(sidecar) as sidecar_temporary:
      ...  # write both; the sidecar is renamed into place first, ``main`` last
  """
  if sweep:
    remove_stale_temporaries(path)
  temporary = temporary_name(path)
  try:
    yield temporary
    move_into_place(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


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
  body = (
    (
      f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{metadata}\n--==0==\n"
      "Content-Type: application/octet-stream\n\n"
    ).encode()
    + data
    + b"\n--==0==--"
  )
  upload = filesystem.base[: -len("storage/v1/")] + "upload/storage/v1/b/{}/o"
  try:
    reply = filesystem.call(
      "POST",
      upload,
      bucket,
      uploadType="multipart",
      ifGenerationMatch=str(generation),
      headers={"Content-Type": 'multipart/related; boundary="==0=="'},
      data=body,
      json_out=True,
    )
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


def _read_first_line(path: str) -> str | None:
  try:
    with open(path) as file:
      return file.readline().strip() or None
  except OSError:
    return None


def machine_identity() -> dict:
  """This process's host name, the kernel's boot id and its PID namespace: two processes (lock
  holders, writers of temporaries) can judge each other's PIDs only when all three agree (same kernel,
  same boot, same namespace)."""
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = None
  return {
    "host": socket.gethostname(),
    "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
    "pid_namespace": namespace,
  }


def _machine_tag() -> str:
  """The host name, with a short hash of the boot id and PID namespace where the system has them: what
  a temporary's name records of its writer's machine, so that only a writer whose PID means the same
  here is judged gone by it."""
  identity = machine_identity()
  if identity["boot_id"] is None and identity["pid_namespace"] is None:
    return identity["host"]
  tag = hashlib.sha256(f"{identity['boot_id']}|{identity['pid_namespace']}".encode()).hexdigest()[:8]
  return f"{identity['host']}~{tag}"


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
