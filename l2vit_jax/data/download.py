"""Downloads the two real CMS jet files (docs/design.md, Data), resumably, and validates them before use.

A file is streamed into ``<dest>.part`` and renamed to ``<dest>`` (``paths.move_into_place``) only after
its size matches what the server announced, it starts with the HDF5 signature and it passes
:func:`hdf5.validate_file`, so ``<dest>`` is either absent or a usable file. An existing ``<dest>`` is
never overwritten or deleted: a valid one is skipped, an invalid one is reported (the user decides what
to do with it).

What happens to ``<dest>.part`` when something goes wrong:

* kept, to be resumed by the next run: the transfer stopped early (retries used up, Ctrl-C, HTTP error);
  it is a correct prefix of the file, and the next run asks for the rest with ``Range: bytes=N-``.
* removed: its content is known to be bad — it does not start with the HDF5 signature, it is larger than
  the file, it ends up with more bytes than announced, the server's size for the file changed between
  requests, a 206 reply starts at the wrong byte, or the complete file fails validation. None of these
  can be repaired by resuming.
* never created: an error page (HTTP error status, ``text/html``, or a first chunk that is not HDF5) is
  detected before anything is written.
* truncated and rewritten from byte 0: the server ignored ``Range`` and sent the whole file (HTTP 200).

There is no published checksum for these files; schema validation is the content check.

Usage: ``python scripts/download_data.py [--data-dir data] [--labelled-only | --unlabelled-only]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

from l2vit_jax import errors
from l2vit_jax.data import hdf5
from l2vit_jax.errors import DownloadError, one_line
from l2vit_jax.runtime import console, paths

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GIB = 1 << 30

# Statuses worth retrying: the server or a proxy is busy or briefly broken, not the request.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_USER_AGENT = "l2vit_jax-download/1.0 (python urllib)"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One of the real data files.

  ``approx_bytes`` is a lower bound (the datasets' payload, docs/design.md, Data): the exact size, including
  HDF5 metadata, is only known from the server's reply, so it is used for the report and the up-front
  disk-space check, never to judge a download.
  """
  filename: str
  url: str
  labelled: bool
  approx_bytes: int


LABELLED_FILENAME = "Dataset_Specific_labelled_full_only_for_2i.h5"
LABELLED_URL = "https://portal.nersc.gov/cfs/m4392/G25/Dataset_Specific_labelled_full_only_for_2i.h5"
UNLABELLED_FILENAME = "Dataset_Specific_Unlabelled.h5"
UNLABELLED_URL = ("https://cernbox.cern.ch/remote.php/dav/public-files/e3pqxcIznqdYyRv/"
                  "Dataset_Specific_Unlabelled.h5")

# 10,000 labelled images of 125×125×8 float32 (500,000 bytes each) plus three (N, 1) float32 label
# arrays: 4.66 GiB. 60,000 unlabelled images: 27.94 GiB.
LABELLED = RemoteFile(LABELLED_FILENAME, LABELLED_URL, labelled=True,
                      approx_bytes=10_000 * 500_000 + 3 * 10_000 * 4)
UNLABELLED = RemoteFile(UNLABELLED_FILENAME, UNLABELLED_URL, labelled=False,
                        approx_bytes=60_000 * 500_000)


def _info(message: str) -> None:
  console.write(message, sys.stdout)


def _warn(message: str) -> None:
  # console.write keeps warnings from being drawn over by the progress bar, which lives on stderr.
  console.write(f"warning: {message}", sys.stderr)


def _gib(num_bytes: int) -> str:
  return f"{num_bytes / GIB:.2f} GiB"


def _human(num_bytes: int) -> str:
  return _gib(num_bytes) if num_bytes >= GIB else f"{num_bytes / (1 << 20):.2f} MiB"


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _looks_like_html(head: bytes) -> bool:
  return head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def _not_hdf5_message(content_type: str, head: bytes) -> str:
  if "html" in content_type.lower() or _looks_like_html(head):
    return f"server returned an HTML page, not HDF5 (Content-Type {content_type or 'unset'})"
  return (f"content does not start with the HDF5 signature (Content-Type {content_type or 'unset'}, "
          f"first bytes {head[:16]!r})")


def _read_head(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(len(HDF5_SIGNATURE))


def _check_disk_space(directory: str, needed: int, what: str) -> None:
  free = shutil.disk_usage(directory).free
  if needed > free:
    raise DownloadError(f"{what}: not enough disk space: need {_gib(needed)} more, only {_gib(free)} "
                        f"free in {os.path.abspath(directory)}")


def _header_int(value: str | None) -> int | None:
  if value is None or not value.strip().isdigit():
    return None
  return int(value)


def download_file(url: str, dest: str, *, labelled: bool, chunk_size: int = 1 << 20,
                  timeout: float = 60.0, max_retries: int = 5, progress: bool = True,
                  retry_wait: float = 2.0) -> str:
  """Downloads ``url`` to ``dest`` resumably, and validates it as a (labelled) jet file before use.

  Args:
    url: HTTP(S) URL of the HDF5 file.
    dest: final path; ``dest + '.part'`` holds the transfer in progress.
    labelled: validate with the labelled schema (``jet``, ``Y``, ``m``, ``pT``) or images only.
    chunk_size: bytes per read.
    timeout: seconds for connecting and for each socket read; a stalled server counts as a dropped
      connection.
    max_retries: retries allowed in a row without any progress (dropped connections, timeouts, 5xx).
      The count restarts whenever an attempt receives data, so a long download over a flaky link
      keeps going as long as it moves forward.
    progress: show a byte progress bar on stderr when it is a terminal (``console.ProgressBar``, drawn
      from the first byte received, so failures before any data leave stderr clean).
    retry_wait: seconds before the first retry; later retries wait longer (linearly, at most 30 s).

  Returns:
    ``dest``.

  Raises:
    DownloadError: one line naming the URL or file and what was wrong. ``dest`` is then untouched.
  """
  if os.path.exists(dest):
    try:
      info = hdf5.validate_file(dest, labelled=labelled)
    except errors.DataError as e:
      # Not ours to delete: it may be a copy the user made on purpose. Say how to get a fresh one.
      raise DownloadError(f"{dest} already exists but is not a valid jet file ({one_line(e)}); move it "
                          "aside or delete it to download again") from None
    _info(f"{dest} already present and valid ({info.num_examples} examples), skipping download")
    return dest

  part = dest + ".part"
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  if os.path.exists(part) and not HDF5_SIGNATURE.startswith(_read_head(part)):
    # h5py writes the signature at byte 0, so this part can't be a prefix of the file: resuming is useless.
    _warn(f"{part} does not start with the HDF5 signature; discarding it")
    _remove(part)

  total: int | None = None  # the file's full size, once a reply has told us
  failures = 0  # failed attempts since the part file last grew past its largest size so far
  best = os.path.getsize(part) if os.path.exists(part) else 0
  bar = console.ProgressBar(None, os.path.basename(dest), "B", enabled=progress, binary_units=True)

  def retry_or_fail(reason: str) -> None:
    nonlocal failures
    failures += 1
    if failures > max_retries:
      have = os.path.getsize(part) if os.path.exists(part) else 0
      kept = f"; kept {part} ({have} bytes): run again to resume" if have else ""
      raise DownloadError(f"{url}: {reason}; gave up after {max_retries} "
                          f"{'retry' if max_retries == 1 else 'retries'} without progress{kept}")
    wait = min(retry_wait * failures, 30.0)
    _warn(f"{url}: {reason}; retry {failures}/{max_retries} in {wait:.0f} s")
    time.sleep(wait)

  # Bounded: every pass either grows the part file past its high-water mark `best` (at most `total`
  # times, one byte each) or counts towards `max_retries`.
  with bar:
    while True:
      offset = os.path.getsize(part) if os.path.exists(part) else 0
      if total is not None and offset == total:
        break
      reason, total = _attempt(url, dest, part, offset, total, chunk_size, timeout, bar)
      size = os.path.getsize(part) if os.path.exists(part) else 0
      grew = size > best
      best = max(best, size)
      if reason is None:  # the reply ended cleanly
        if total is None or size >= total:
          break  # complete (or, with no size announced, all there is); size > total is caught below
        if grew:
          continue  # the server sent a shorter range than asked for: ask for the rest, no back-off
        reason = f"reply ended early: got {size} bytes, expected {total}"
      if grew:
        failures = 0
      retry_or_fail(reason)

  size = os.path.getsize(part) if os.path.exists(part) else 0
  if total is not None and size != total:
    # Only reachable with more bytes than announced: the server's sizes are inconsistent, so the part
    # file is not trustworthy.
    _remove(part)
    raise DownloadError(f"{url}: got {size} bytes, expected {total}; removed {part}")
  with open(part, "rb") as f:
    head = f.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:  # only a complete file can show this (short parts are checked as they come)
      _remove(part)
      raise DownloadError(f"{url}: content does not start with the HDF5 signature (first bytes {head!r}); "
                          f"removed {part}")
    os.fsync(f.fileno())  # the rename below must not expose a file whose data is still in the page cache
  try:
    info = hdf5.validate_file(part, labelled=labelled)
  except errors.DataError as e:
    _remove(part)  # complete and the right size, so resuming cannot fix it
    raise DownloadError(f"{url}: downloaded file is not a valid jet file: {one_line(e)}; "
                        f"removed {part}") from None
  paths.move_into_place(part, dest)
  _info(f"saved {dest} ({_human(size)}, {info.num_examples} examples)")
  return dest


def _attempt(url: str, dest: str, part: str, offset: int, total: int | None, chunk_size: int,
             timeout: float, bar: console.ProgressBar) -> tuple[str | None, int | None]:
  """One request, resuming at ``offset``; appends what arrives to ``part``.

  Returns ``(reason, total)``: ``reason`` is None when the reply ended cleanly, else why a new request
  (resuming from the part file's new size) may help; ``total`` is the file's size if known. The part file
  always holds a correct prefix of the file (possibly empty) afterwards. Raises DownloadError for anything
  a retry cannot fix.
  """
  headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
  if offset:
    headers["Range"] = f"bytes={offset}-"
  request = urllib.request.Request(url, headers=headers)
  try:
    response = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    status = f"HTTP {e.code} {one_line(e.reason)}"
    e.close()
    if e.code == 416 and offset:
      # Our part is at or past the end of the file. "bytes */N" tells us the size.
      match = _UNSATISFIED_RANGE.match(e.headers.get("Content-Range", "") if e.headers else "")
      size = int(match.group(1)) if match else None
      if size is not None and size == offset and total in (None, size):
        return None, size  # a previous run had already received the whole file
      _remove(part)
      return f"{status} for bytes={offset}- (server size {size}); discarded {part} to start over", None
    if e.code in _RETRYABLE_STATUS:
      return status, total
    raise DownloadError(f"{url}: {status}") from None
  except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout, bad status line
    return f"request failed: {one_line(getattr(e, 'reason', e))}", total

  with response:
    status = response.status
    content_type = response.headers.get("Content-Type", "")
    length = _header_int(response.headers.get("Content-Length"))
    if status == 206 and offset:
      match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
      if not match or int(match.group(1)) != offset:
        _remove(part)  # we can't tell where these bytes go; start over without Range
        return (f"HTTP 206 with Content-Range {response.headers.get('Content-Range')!r} does not start at "
                f"byte {offset}; discarded {part} to start over", None)
      reply_total = None if match.group(3) == "*" else int(match.group(3))
      mode = "ab"
    elif status == 200:
      if offset:
        _warn(f"{url}: server ignored the Range request; restarting from byte 0")
        offset = 0
      reply_total = length
      mode = "wb"  # truncates: a 200 is always the whole file
    else:
      raise DownloadError(f"{url}: unexpected HTTP {status} {one_line(response.reason)}"
                          f"{' to a Range request' if offset else ''}")

    if "html" in content_type.lower():
      raise DownloadError(f"{url}: {_not_hdf5_message(content_type, b'')}")
    if total is not None and reply_total is not None and reply_total != total:
      _remove(part)  # the file changed on the server between requests: our prefix is of another file
      return (f"server now reports {reply_total} bytes instead of {total} (file changed?); discarded "
              f"{part} to start over", None)
    total = reply_total if reply_total is not None else total
    if total is not None:
      _check_disk_space(os.path.dirname(os.path.abspath(dest)), total - offset, dest)
      if offset > total:
        _remove(part)
        return f"{part} is larger than the file ({offset} > {total}); discarded it", None
    # How many bytes this reply should carry; None when neither header says (then EOF ends it).
    expected = length if length is not None else (None if total is None else total - offset)

    if offset == 0 and expected == 0:
      raise DownloadError(f"{url}: server sent an empty file")
    bar.restart(total, offset)
    received = 0
    f = None
    try:
      while expected is None or received < expected:
        want = chunk_size if expected is None else min(chunk_size, expected - received)
        try:
          chunk = response.read(want)
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
          return (f"connection dropped ({type(e).__name__}: {one_line(e) or 'no detail'}): got "
                  f"{offset + received} bytes, expected {total if total is not None else 'more'}", total)
        if not chunk:
          if expected is None:
            return None, total  # no size announced: a clean close is the end of the file
          return (f"connection closed early: got {offset + received} bytes, expected {offset + expected}",
                  total)
        if f is None:
          if offset == 0 and not chunk.startswith(HDF5_SIGNATURE[:len(chunk)]):
            # Caught on the first chunk, so an error page is never written to disk.
            raise DownloadError(f"{url}: {_not_hdf5_message(content_type, chunk)}")
          try:
            f = open(part, mode)
          except OSError as e:
            raise DownloadError(f"{part}: cannot write: {one_line(e)}") from None
        try:
          f.write(chunk)
        except OSError as e:
          raise DownloadError(f"{part}: cannot write: {one_line(e)}") from None
        received += len(chunk)
        bar.update(len(chunk))
    finally:
      if f is not None:
        f.close()
    return None, total


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Download the CMS end-to-end jet HDF5 files (resumable; validated before use).")
  parser.add_argument("--data-dir", default="data", help="directory for the .h5 files (default: data)")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--labelled-only", action="store_true", help=f"only {LABELLED_FILENAME}")
  which.add_argument("--unlabelled-only", action="store_true", help=f"only {UNLABELLED_FILENAME}")
  parser.add_argument("--labelled-url", default=LABELLED_URL, help="override the labelled file's URL")
  parser.add_argument("--unlabelled-url", default=UNLABELLED_URL, help="override the unlabelled file's URL")
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per connect/read (default 60)")
  parser.add_argument("--retries", type=int, default=5,
                      help="retries in a row without progress before giving up (default 5)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status (0 on success)."""
  args = _parse_args(argv)
  originals = []
  if not args.unlabelled_only:
    originals.append(LABELLED)
  if not args.labelled_only:
    originals.append(UNLABELLED)
  urls = {LABELLED.filename: args.labelled_url, UNLABELLED.filename: args.unlabelled_url}
  jobs = [dataclasses.replace(f, url=urls[f.filename]) for f in originals]

  needed = 0
  for job, original in zip(jobs, originals):
    dest = os.path.join(args.data_dir, job.filename)
    default_url = job.url == original.url
    size = f"about {_gib(job.approx_bytes)}" if default_url else "size from server"
    state = " (already present)" if os.path.exists(dest) else ""
    _info(f"{job.filename}: {size}, {'labelled' if job.labelled else 'unlabelled'}{state}, from {job.url}")
    if default_url and not os.path.exists(dest):
      part = dest + ".part"
      needed += max(job.approx_bytes - (os.path.getsize(part) if os.path.exists(part) else 0), 0)

  try:
    os.makedirs(args.data_dir, exist_ok=True)
    # Only the real files' sizes are known before asking; for others download_file checks once the
    # server has said how big the file is.
    if needed:
      _check_disk_space(args.data_dir, needed, f"{args.data_dir}: the selected data files")
    for job in jobs:
      download_file(job.url, os.path.join(args.data_dir, job.filename), labelled=job.labelled,
                    timeout=args.timeout, max_retries=args.retries, progress=not args.no_progress)
  except (DownloadError, OSError) as e:  # OSError: e.g. the data directory cannot be created
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("error: interrupted; run the same command again to resume", file=sys.stderr)
    return 130
  return 0
