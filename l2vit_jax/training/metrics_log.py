"""Run logs: JSON lines (``WORKDIR/metrics.jsonl``), TensorBoard events (``WORKDIR/tensorboard/``) and
one-line progress.

Only process 0 writes files. The writer keeps the file's lines in memory and replaces the file whole,
never appends: a kill mid-write would leave an appended line cut short, which a resumed run or a plot
would then have to trust or guess about. Locally every ``write`` replaces the file (a temporary file
renamed over it, so a reader sees the old log or the new one). A Cloud Storage object appears whole
anyway, but one object may be rewritten only about once a second: on a ``gs://`` workdir the object is
rewritten at most every ``REMOTE_REWRITE_SECONDS``, at every checkpoint (``flush``) and at the end, so
what a resumed run finds covers every step up to its checkpoint. Lines that do not parse (a torn last
line written by older versions, which appended) are dropped when the writer opens the log.

TensorBoard gets the same numbers: every numeric field of every row as a scalar at the row's step, and
the resolved config once as text (``EventWriter``, on by default, ``config.tensorboard=False`` turns it
off). Each run (and each resume) writes its own event file, synchronously through tensorboardX's
record writer and protos (no TensorFlow; tensorboardX's own ``SummaryWriter`` queues events on a
thread, so its ``flush`` would not cover what a checkpoint covers). A resumed run starts its file with
TensorBoard's purge marker (a ``SessionLog.START`` at ``resume_step + 1``), so the rows the JSON log
drops on resume are hidden in TensorBoard too. On ``gs://`` the event file is written to a local
staging folder and uploaded whole (``paths.write_bytes``) whenever ``metrics.jsonl`` is rewritten:
one storage layer for everything, with the emulator in the tests and credentials on a TPU VM alike.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import numbers
import os
import re
import shutil
import struct
import sys
import tempfile
import time

import jax
import numpy as np
from absl import logging

from l2vit_jax.runtime import paths

REMOTE_REWRITE_SECONDS = 10.0
TENSORBOARD_DIR = "tensorboard"
# A local event file is flushed (and fsynced) at most this often between checkpoints, so TensorBoard
# shows a live run without a disk sync per log row.
LOCAL_EVENT_FLUSH_SECONDS = 10.0
# Part of each event file's name: unique within a process too, and zero-padded, because TensorBoard
# reads a directory's event files in name order (time in seconds, host, then this suffix): two writers
# of one process opened within a second must sort in the order they were opened (a resume's purge
# step applies only to the files before it).
_event_files = itertools.count()


def _jsonable(value):
  value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, bool)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _rows(text: str, up_to_step: int | None = None) -> tuple[list[tuple[str, dict]], int]:
  """The one reading of a JSON-lines log: (line, record) of each line that holds a whole JSON object,
  with ``up_to_step`` only those of steps up to it; and how many non-blank lines held none (a torn last
  line written by older versions, which appended)."""
  rows, torn = [], 0
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      torn += bool(line.strip())
      continue
    if not isinstance(record, dict):
      torn += 1
    elif up_to_step is None or record.get("step", 0) <= up_to_step:
      rows.append((line, record))
  return rows, torn


def complete_lines(text: str, up_to_step: int | None = None) -> list[str]:
  """The lines of a JSON-lines log that hold a whole JSON object (a torn or blank line is dropped),
  and with ``up_to_step`` only those of steps up to it."""
  return [line + "\n" for line, _ in _rows(text, up_to_step)[0]]


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a run's ``metrics.jsonl`` (local or ``gs://``), in file order; lines that are
  not JSON objects are skipped with a warning (a run killed mid-write by an older version, which
  appended, can leave a truncated last line, and that should not stop plots or comparisons)."""
  rows, torn = _rows(paths.read_text(path))
  if torn:
    logging.warning("%s: skipped %d line(s) that are not JSON objects", path, torn)
  return [record for _, record in rows]


@contextlib.contextmanager
def _torch_hidden():
  """Makes ``import torch`` fail inside the block, unless torch is imported already.

  tensorboardX's package import pulls in torch whenever it is installed (only so that its writer
  accepts torch tensors, which we never pass): 2.4 s of every run's start-up on a 2-core host, and 2 GB
  of address space. With the module entry set to None Python raises ImportError, which tensorboardX
  catches; the entry is removed afterwards, so torch imports normally later.
  """
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None
  try:
    yield
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]


class EventWriter:
  """One TensorBoard event file in ``directory`` (local or ``gs://``), written synchronously.

  Invariants: what ``flush`` returns from is on disk (fsynced) or, on ``gs://``, uploaded whole; a file
  name is unique to this writer (time, host and pid), so runs and resumes never write into one file.
  ``purge_step``: TensorBoard hides events of earlier files at steps >= it (a resumed run's redone rows).
  """

  def __init__(self, directory: str, *, purge_step: int | None = None):
    with _torch_hidden():
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=import-outside-toplevel
      from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    self._event_pb2 = event_pb2
    self.directory = directory
    self._remote = paths.is_remote(directory)
    self._local = tempfile.mkdtemp(prefix="l2vit-tensorboard-") if self._remote else directory
    paths.makedirs(self._local)
    self._events = EventsWriter(
      os.path.join(self._local, "events"), filename_suffix=f".{os.getpid()}.{next(_event_files):06d}"
    )
    self.path = paths.join(directory, os.path.basename(self._events._file_name))  # pylint: disable=protected-access
    self._last_flush = time.monotonic()
    self._closed = False
    if purge_step is not None:
      self._write(purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def _write(self, step: int, **fields) -> None:
    self._events.write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), **fields))

  def scalars(self, step: int, values: dict) -> None:
    """Every real number of ``values`` (not bools; NaN and infinities as they are) as a scalar named by its key, at ``step``."""
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=import-outside-toplevel

    summary = Summary(
      value=[
        Summary.Value(tag=key, simple_value=float(value))
        for key, value in values.items()
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
      ]
    )
    if summary.value:
      self._write(step, summary=summary)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    """Markdown text (TensorBoard's text plugin)."""
    from tensorboardX import summary as tbx_summary  # pylint: disable=import-outside-toplevel

    self._write(step, summary=tbx_summary.text(tag, text))

  def png(self, tag: str, data: bytes, step: int = 0) -> None:
    """A PNG file's bytes as an image, as they are (no decoding and re-encoding)."""
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=import-outside-toplevel

    width, height, channels = png_size(data)
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
    self._write(step, summary=Summary(value=[Summary.Value(tag=tag, image=image)]))

  def flush(self) -> None:
    """Makes every event written so far durable: fsynced locally, uploaded whole on ``gs://``."""
    if self._closed:
      return
    self._events.flush()
    self._last_flush = time.monotonic()
    if self._remote:
      with open(os.path.join(self._local, os.path.basename(self.path)), "rb") as file:
        paths.write_bytes(self.path, file.read())

  def maybe_flush(self) -> None:
    """``flush`` when the last one is ``LOCAL_EVENT_FLUSH_SECONDS`` old (local files only)."""
    if not self._remote and time.monotonic() - self._last_flush >= LOCAL_EVENT_FLUSH_SECONDS:
      self.flush()

  def close(self, *, flush: bool = True) -> None:
    """Closes the file; ``flush=False`` uploads nothing more to ``gs://`` (locally, events still
    buffered reach this writer's own file, which no other run writes)."""
    if self._closed:
      return
    if flush:
      self.flush()
    self._events.close()
    self._closed = True
    if self._remote:
      shutil.rmtree(self._local, ignore_errors=True)


def png_size(data: bytes) -> tuple[int, int, int]:
  """(width, height, channels) from a PNG's header; ValueError if ``data`` is not a PNG."""
  if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
    raise ValueError("not a PNG file")
  width, height = struct.unpack(">II", data[16:24])
  channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(data[25], 4)  # PNG colour type → channels
  return width, height, channels


def open_event_writer(directory: str, *, purge_step: int | None = None) -> EventWriter | None:
  """An ``EventWriter``, or None with a warning when tensorboardX is not installed (a broken install:
  it is a requirement; the run itself must not fail for want of its plots)."""
  try:
    return EventWriter(directory, purge_step=purge_step)
  except ImportError as error:
    logging.warning(
      "No TensorBoard events (%s): pip install tensorboardX, or set --config.tensorboard=False", error
    )
    return None


def config_markdown(config_json: str) -> str:
  """The config's JSON as a Markdown code block (TensorBoard's text plugin renders Markdown)."""
  return "\n".join("    " + line for line in config_json.splitlines())


# A Markdown image or link to a relative PNG: ![caption](ft/roc.png) or [caption](roc.png).
_PNG_LINK = re.compile(r"\]\(([^()\s:]+\.png)\)")


def write_report_images(report_dir: str) -> int:
  """Adds every PNG that ``REPORT_DIR/report.md`` links to as a TensorBoard image in
  ``REPORT_DIR/tensorboard/`` (tag: the PNG's path in the report without ``.png``, e.g.
  ``ft/confusion_matrix``), so TensorBoard pointed at a run's folder shows its evaluation too.

  Process 0 only; returns the number of images written (0 without ``report.md`` or tensorboardX).
  """
  report = paths.join(report_dir, "report.md")
  if jax.process_index() != 0 or not paths.exists(report):
    return 0
  linked = list(dict.fromkeys(_PNG_LINK.findall(paths.read_text(report))))
  figures = [(name, paths.join(report_dir, *name.split("/"))) for name in linked]
  figures = [(name, path) for name, path in figures if paths.exists(path)]
  if not figures:
    return 0
  writer = open_event_writer(paths.join(report_dir, TENSORBOARD_DIR))
  if writer is None:
    return 0
  try:
    for name, path in figures:
      writer.png(name[: -len(".png")], paths.as_path(path).read_bytes())
  finally:
    writer.close()
  logging.info("TensorBoard: %d report figure(s) in %s", len(figures), writer.directory)
  return len(figures)


class MetricWriter:
  """Adds one JSON object per call to ``metrics.jsonl`` (resumed runs continue the same file), and the
  same numbers as TensorBoard scalars in ``WORKDIR/tensorboard/`` (``tensorboard``).

  ``resume_step``: the step a run starts from. Rows past it, left by a run killed after its last
  checkpoint (or before its first), are redone, so they are dropped from the file at once (and hidden
  in TensorBoard by the new event file's purge marker). ``config_json``: written once as text.
  """

  def __init__(
    self,
    workdir: str,
    *,
    tensorboard: bool = True,
    resume_step: int | None = None,
    config_json: str | None = None,
  ):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self._remote = paths.is_remote(workdir)
    self._lines: list[str] = []  # the whole file, rewritten by flush
    self._unflushed = False
    self._last_flush = time.monotonic()
    if self.enabled and paths.exists(self.path):
      text = paths.read_text(self.path)
      self._lines = complete_lines(text, up_to_step=resume_step)
      if "".join(self._lines) != text:
        paths.write_text(self.path, "".join(self._lines))
    self._tensorboard = None
    if self.enabled and tensorboard:
      self._tensorboard = open_event_writer(
        paths.join(workdir, TENSORBOARD_DIR), purge_step=None if resume_step is None else resume_step + 1
      )
      if self._tensorboard is not None and config_json:
        self._tensorboard.text("config", config_markdown(config_json), step=resume_step or 0)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._lines.append(json.dumps(record) + "\n")
    self._unflushed = True
    if self._tensorboard is not None:
      self._tensorboard.scalars(step, metrics)
    if not self._remote:
      self._write_lines()
      if self._tensorboard is not None:
        self._tensorboard.maybe_flush()
    elif time.monotonic() - self._last_flush >= REMOTE_REWRITE_SECONDS:
      self.flush()

  def _write_lines(self) -> None:
    if self.enabled and self._unflushed:
      paths.write_text(self.path, "".join(self._lines))
      self._unflushed = False
      self._last_flush = time.monotonic()

  def flush(self) -> None:
    """Makes every row written so far durable: the JSON log replaced whole (locally ``write`` already
    did), the TensorBoard events fsynced or uploaded. Called at every checkpoint."""
    self._write_lines()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self, *, flush: bool = True) -> None:
    """Flushes and closes; ``flush=False`` (a run that lost its workdir lock) writes nothing more to
    the workdir: rows not yet written (on ``gs://`` the log is rewritten in batches) are dropped."""
    if flush:
      self.flush()
    if self._tensorboard is not None:
      self._tensorboard.close(flush=flush)


class Progress:
  """Images/s and ETA between log steps, measured on the host around blocking metric reads."""

  def __init__(self, total_steps: int, start_step: int, global_batch_size: int):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return {
      "images_per_second": self.global_batch_size / max(seconds_per_step, 1e-9),
      "eta_seconds": seconds_per_step * (self.total_steps - step),
    }


def format_status(step: int, total_steps: int, metrics: dict) -> str:
  eta = metrics.get("eta_seconds", 0.0)
  parts = [f"step {step}/{total_steps}", f"epoch {metrics.get('epoch', 0):.2f}"]
  parts += [
    f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("train/", "val/")) and isinstance(v, float)
  ]
  if "learning_rate" in metrics:
    parts.append(f"lr {metrics['learning_rate']:.3g}")
  if "images_per_second" in metrics:
    parts.append(f"{metrics['images_per_second']:.1f} img/s")
  parts.append(f"ETA {int(eta) // 3600}h{int(eta) % 3600 // 60:02d}m{int(eta) % 60:02d}s")
  return " | ".join(parts)


def log_status(step: int, total_steps: int, metrics: dict) -> None:
  if jax.process_index() == 0:
    logging.info("%s", format_status(step, total_steps, metrics))
