"""Run logs: JSON lines (``WORKDIR/metrics.jsonl``), optional TensorBoard, and one-line progress.

Only process 0 writes files. TensorBoard event files are written through ``tensorboardX`` when it is
installed (``clu``/``flax.metrics.tensorboard`` would need TensorFlow) and the workdir is local.

The writer keeps the file's lines in memory and replaces the file whole, never appends: a kill
mid-write would leave an appended line cut short, which a resumed run or a plot would then have to
trust or guess about. Locally every ``write`` replaces the file (a temporary file renamed over it, so
a reader sees the old log or the new one). A Cloud Storage object appears whole anyway, but one object
may be rewritten only about once a second: on a ``gs://`` workdir the object is rewritten at most
every ``REMOTE_REWRITE_SECONDS``, at every checkpoint (``flush``) and at the end, so what a resumed
run finds covers every step up to its checkpoint. Lines that do not parse (a torn last line written
by older versions, which appended) are dropped when the writer opens the log.
"""

from __future__ import annotations

import json
import math
import time

import jax
from absl import logging

from l2vit_jax.runtime import paths

REMOTE_REWRITE_SECONDS = 10.0


def _jsonable(value):
  value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, bool)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def complete_lines(text: str, up_to_step: int | None = None) -> list[str]:
  """The lines of a JSON-lines log that hold a whole JSON object (a torn or blank line is dropped),
  and with ``up_to_step`` only those of steps up to it."""
  lines = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and (up_to_step is None or record.get("step", 0) <= up_to_step):
      lines.append(line + "\n")
  return lines


class MetricWriter:
  """Adds one JSON object per call to ``metrics.jsonl`` (resumed runs continue the same file).

  ``resume_step``: the step a run starts from. Rows past it, left by a run killed after its last
  checkpoint (or before its first), are redone, so they are dropped from the file at once.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
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
    if self.enabled and tensorboard and self._remote:
      logging.info("TensorBoard events are not written to a %s workdir (tensorboardX writes local "
                   "files); plot %s instead", workdir.split("://")[0], self.path)
    elif self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tensorboard = SummaryWriter(paths.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._lines.append(json.dumps(record) + "\n")
    self._unflushed = True
    if not self._remote or time.monotonic() - self._last_flush >= REMOTE_REWRITE_SECONDS:
      self.flush()
    if self._tensorboard is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tensorboard.add_scalar(key, value, step)

  def flush(self) -> None:
    """Replaces the file by every line written so far (locally ``write`` already did)."""
    if self.enabled and self._unflushed:
      paths.write_text(self.path, "".join(self._lines))
      self._unflushed = False
      self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._tensorboard is not None:
      self._tensorboard.close()


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
    return {"images_per_second": self.global_batch_size / max(seconds_per_step, 1e-9),
            "eta_seconds": seconds_per_step * (self.total_steps - step)}


def format_status(step: int, total_steps: int, metrics: dict) -> str:
  eta = metrics.get("eta_seconds", 0.0)
  parts = [f"step {step}/{total_steps}", f"epoch {metrics.get('epoch', 0):.2f}"]
  parts += [f"{k} {v:.4g}" for k, v in metrics.items()
            if k.startswith(("train/", "val/")) and isinstance(v, float)]
  if "learning_rate" in metrics:
    parts.append(f"lr {metrics['learning_rate']:.3g}")
  if "images_per_second" in metrics:
    parts.append(f"{metrics['images_per_second']:.1f} img/s")
  parts.append(f"ETA {int(eta) // 3600}h{int(eta) % 3600 // 60:02d}m{int(eta) % 60:02d}s")
  return " | ".join(parts)


def log_status(step: int, total_steps: int, metrics: dict) -> None:
  if jax.process_index() == 0:
    logging.info("%s", format_status(step, total_steps, metrics))
