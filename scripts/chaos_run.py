"""Chaos run: the quickstart killed (SIGKILL) again and again must end with an uninterrupted run's outputs.

  python scripts/chaos_run.py --workdir=/tmp/chaos --kills=12 --seed=0 [--reference=DIR] \
      [--config=configs/quickstart.py] [--config.FIELD=VALUE ...]

1. Reference: runs ``python -m l2vit_jax.main --config=CONFIG --workdir=WORKDIR/reference OVERRIDES`` once,
   uninterrupted (or takes the finished run in ``--reference``, which must have used the same overrides),
   and notes when each progress marker appears in its log: each synthetic file being generated, each
   quickstart stage starting, each model's evaluation row, the physics baseline's observables (after
   the last row: the report). The markers cut the run into segments (data generation, pretraining,
   finetuning, scratch, evaluation...). How long each lasts is timed on a run that finds every executable
   in the compilation cache, as the reruns will (a second, throwaway run when the reference compiled).
2. Chaos: runs the same command in ``WORKDIR/chaos`` and SIGKILLs it, at least ``--kills`` times. Each kill
   aims at a segment (every segment at least once when there are enough kills, the rest drawn with
   ``--seed``): it waits for the segment's marker (or a later one: a resumed run skips what is done) and
   kills after a seeded random delay shorter than the segment lasted. A kill that overshoots its segment
   (resumed work goes faster) is followed by another aimed earlier; one aimed at data generation after
   an earlier run got past it starts from an empty workdir (complete files are never generated again).
   After each kill the same command runs again; after the last one it runs to the end.
3. Comparison with the reference, file by file: checkpoints by the steps kept and the latest one's
   restored arrays and meta (Orbax files hold timestamps), ``metrics.jsonl`` row by row without its
   wall-clock fields, ``config.json`` with the workdir path replaced, the physics baseline's observables
   cache by content (its name hashes the data file's path and mtime), TensorBoard event files not at all
   (wall-clock times); everything else — synthetic data, report.md, metrics.json, predictions.npz, the
   PNGs — byte for byte. Hidden temporaries that kills left behind are listed, not compared.

Writes ``WORKDIR/chaos_summary.json`` (each kill: aimed segment, landed segment, delay) and prints it;
exits 0 when the outputs match and every run ended as expected, 1 otherwise. JAX_PLATFORMS defaults to
cpu (where resuming is bit-exact) and all runs share one persistent compilation cache, so only the first
run compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from l2vit_jax.runtime import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Progress markers of the quickstart's log, in the order they appear: (pattern, segment name format).
MARKERS = (
  (re.compile(r"Generating \d+ synthetic (\w+) jets"), "generate {} data"),
  (re.compile(r"=== quickstart stage: (\w+) ==="), "stage {}"),
  (re.compile(r"evaluate\.py:\d+\] (\w+) \(.*\): accuracy"), "evaluated {}"),
  (re.compile(r"Computing jet (observables)"), "physics baseline {}"),
  (re.compile(r"evaluate\.py:\d+\] (physics_bdt): accuracy"), "evaluated {}"),  # then the report
)
# metrics.jsonl fields measured with a clock: they differ between any two runs.
WALL_CLOCK_FIELDS = ("images_per_second", "eta_seconds")
# absl's log prefix: I1123 20:38:19.718932 (a run crossing midnight would confuse the durations).
ABSL_TIME = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")
# The last segment (the report) ends with the run's last timestamped line; the kill may come this much later.
LAST_SEGMENT_SECONDS = 0.05
POLL_SECONDS = 0.002
# Further tries at a segment that a kill overshot (each with a quarter of the previous delay).
RETRIES = 3


@dataclasses.dataclass
class Progress:
  """The markers seen so far in one run's log."""

  log_path: str
  seen: list = dataclasses.field(default_factory=list)
  _offset: int = 0
  _pending: str = ""

  def poll(self) -> None:
    with open(self.log_path, encoding="utf-8", errors="replace") as log:
      log.seek(self._offset)
      text = log.read()
      self._offset = log.tell()
    *lines, self._pending = (self._pending + text).split("\n")
    self.seen += [name for name in map(_marker, lines) if name and name not in self.seen]

  def furthest(self, order: list[str]) -> int:
    """Index in ``order`` of the latest segment reached; -1 before the first marker."""
    return max((order.index(name) for name in self.seen if name in order), default=-1)


def _marker(line: str) -> str | None:
  for pattern, name in MARKERS:
    match = pattern.search(line)
    if match:
      return name.format(*match.groups())
  return None


def timeline(log_path: str) -> tuple[list[str], list[float]]:
  """Segments of a finished run's log in order, and how long each lasted (from absl's timestamps)."""
  starts, last = {}, 0.0
  with open(log_path, encoding="utf-8", errors="replace") as log:
    for line in log:
      stamp = ABSL_TIME.match(line)
      if stamp:
        hours, minutes, seconds = stamp.groups()
        last = 3600 * int(hours) + 60 * int(minutes) + float(seconds)
        starts.setdefault(_marker(line), last)
  starts.pop(None, None)
  order = sorted(starts, key=starts.get)
  ends = [starts[name] for name in order[1:]] + [last + LAST_SEGMENT_SECONDS]
  return order, [end - starts[name] for name, end in zip(order, ends)]


def _command(args, workdir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "l2vit_jax.main",
    f"--config={args.config}",
    f"--workdir={workdir}",
    *args.overrides,
  ]


def _launch(args, workdir: str, log_path: str) -> tuple[subprocess.Popen, Progress]:
  # Output goes to a file, not a pipe: a full pipe nobody reads would block the run.
  with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(
      _command(args, workdir), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
  return process, Progress(log_path)


def _wait(process: subprocess.Popen, progress: Progress, timeout: float, until=lambda: False) -> bool:
  """Polls the log until ``until()`` holds (True) or the process ends (False)."""
  deadline = time.monotonic() + timeout
  while process.poll() is None:
    progress.poll()
    if until():
      return True
    if time.monotonic() > deadline:
      _kill(process)
      raise TimeoutError(f"{progress.log_path}: no progress for {timeout:.0f} s")
    time.sleep(POLL_SECONDS)
  progress.poll()
  return False


def _kill(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)  # the run's whole session: data workers die with it
  except ProcessLookupError:
    pass
  process.wait()


def _log_tail(path: str, lines: int = 30) -> str:
  with open(path, encoding="utf-8", errors="replace") as log:
    return "".join(log.readlines()[-lines:])


def run_reference(args, workdir: str) -> None:
  """Runs the pipeline uninterrupted (its log, ``workdir``.log, gives the timeline)."""
  process, progress = _launch(args, workdir, workdir + ".log")
  _wait(process, progress, args.timeout)
  if process.returncode != 0:
    raise RuntimeError(
      f"the reference run failed (status {process.returncode}):\n{_log_tail(progress.log_path)}"
    )


def kill_plan(num_segments: int, kills: int, rng: random.Random) -> list[int]:
  """Segment indices to aim at, in pipeline order: each segment once, then random extra kills."""
  plan = list(range(num_segments)) if kills >= num_segments else rng.sample(range(num_segments), kills)
  plan += [rng.randrange(num_segments) for _ in range(kills - len(plan))]
  return sorted(plan)


def _attempt(args, workdir: str, log_path: str, order: list[str], target: int, delay: float) -> dict:
  """One run killed ``delay`` seconds after it reaches segment ``target`` (or a later one)."""
  process, progress = _launch(args, workdir, log_path)
  reached = _wait(process, progress, args.timeout, until=lambda: progress.furthest(order) >= target)
  if reached:
    fire = time.monotonic() + delay
    _wait(process, progress, args.timeout, until=lambda: time.monotonic() >= fire)
  killed = process.poll() is None
  if killed:
    _kill(process)
    progress.poll()  # everything it logged before it died: where the kill landed
  reached_index = progress.furthest(order)
  return {
    "aimed": order[target],
    "delay_s": round(delay, 4),
    "killed": killed,
    "landed": (order[reached_index] if reached_index >= 0 else "start-up") if killed else None,
    "aimed_segment_ran": order[target] in progress.seen,
    "status": process.returncode,
    "log": os.path.relpath(log_path, args.workdir),
  }


def _retry(attempt: dict, order: list[str], target: int) -> bool:
  """Aim again, earlier, at a segment the run went through without being killed in it.

  Resumed runs go faster than the reference (work already done, executables cached), so a delay drawn
  from the reference's timeline can overshoot. A segment the run skipped (its work was complete) is
  not aimed at again.
  """
  overshot = not attempt["killed"] or (attempt["landed"] in order and order.index(attempt["landed"]) > target)
  return overshot and attempt["aimed_segment_ran"]


def _restart_data_generation(workdir: str, order: list[str], target: int, attempts: list[dict]) -> bool:
  """Empties ``workdir`` before a kill aimed at data generation that an earlier attempt got past.

  Generating the quickstart's tiny files takes tens of milliseconds, so a kill aimed there can land
  after them, and no rerun generates complete files again: without a fresh start the data segments
  would never be hit. Data generation comes first, so the attempts so far made nothing else that an
  empty workdir loses except what a first run makes again.
  """
  got_past = any(
    attempt["landed"] in order and order.index(attempt["landed"]) > target or attempt["status"] == 0
    for attempt in attempts
  )
  if not order[target].startswith("generate ") or not got_past:
    return False
  shutil.rmtree(workdir, ignore_errors=True)
  return True


def run_chaos(args, workdir: str, order: list[str], durations: list[float]) -> list[dict]:
  """Kills the pipeline at seeded moments, at least ``args.kills`` times, rerunning it after each kill."""
  rng = random.Random(args.seed)
  attempts = []
  for target in kill_plan(len(order), args.kills, rng):
    delay = rng.uniform(0, durations[target])
    for _ in range(1 + RETRIES):
      log_path = os.path.join(args.workdir, "logs", f"attempt-{len(attempts):02d}.log")
      fresh = _restart_data_generation(workdir, order, target, attempts)
      attempts.append(dict(_attempt(args, workdir, log_path, order, target, delay), fresh_workdir=fresh))
      if not attempts[-1]["killed"] and attempts[-1]["status"] != 0:  # died by itself: a bug
        return attempts
      if not _retry(attempts[-1], order, target):
        break
      delay /= 4
  return attempts


# --- comparison ----------------------------------------------------------------------------------


def _files(root: str) -> dict[str, str]:
  """Relative path → absolute path of every file under ``root``."""
  return {
    os.path.relpath(os.path.join(folder, name), root): os.path.join(folder, name)
    for folder, _, names in os.walk(root)
    for name in names
  }


def _normalised(relative: str) -> str:
  # The observables cache is named after a hash of the data file's path and mtime.
  return re.sub(r"observables-[0-9a-f]+\.npz$", "observables-*.npz", relative)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as file:
    return file.read()


def _log_rows(path: str) -> list[dict]:
  from l2vit_jax.training import metrics_log  # pylint: disable=import-outside-toplevel  # imports JAX

  return [
    {k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS}
    for row in metrics_log.read_metrics_jsonl(path)
  ]


def _is_temporary(relative: str) -> bool:
  """A hidden temporary of an atomic write (``paths.replacing``): a kill can leave one behind until the
  next write of its file; nothing reads them."""
  return paths.is_temporary(os.path.basename(relative))


def _same_checkpoint(reference: str, chaos: str, roots: tuple[str, str]) -> bool:
  """Same steps kept, and the latest one's arrays and meta equal (Orbax's files hold timestamps)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from l2vit_jax.checkpoint import model_io, naming  # pylint: disable=import-outside-toplevel

  steps = [sorted(name for name in os.listdir(folder) if name.isdigit()) for folder in (reference, chaos)]
  subfolder = os.path.basename(reference)
  restored = [
    model_io.read_model_checkpoint(os.path.dirname(folder), prefer=(subfolder,))
    for folder in (reference, chaos)
  ]
  flat = [naming.flatten_names(arrays) for arrays, _ in restored]
  # The meta names init_from, a folder inside the workdir.
  metas = [
    json.dumps(meta, sort_keys=True).replace(root, "WORKDIR") for (_, meta), root in zip(restored, roots)
  ]
  return (
    steps[0] == steps[1]
    and flat[0].keys() == flat[1].keys()
    and metas[0] == metas[1]
    and all(np.array_equal(flat[0][k], flat[1][k]) for k in flat[0])
  )


def _checkpoint_folder(relative: str) -> str | None:
  """'stage/checkpoints' for a file inside an Orbax checkpoint folder, else None."""
  parts = relative.split(os.sep)
  for index, part in enumerate(parts[:-1]):
    if part in ("checkpoints", "best"):
      return os.path.join(*parts[: index + 1])
  return None


def _compare_file(relative: str, reference: str, chaos: str, roots: tuple[str, str]) -> str:
  """'identical', 'equal' (after dropping what legitimately differs), 'skipped' or 'DIFFERENT'."""
  name = os.path.basename(relative)
  if name.startswith("events.out.tfevents"):
    return "skipped"
  if name == "metrics.jsonl":
    return "equal" if _log_rows(reference) == _log_rows(chaos) else "DIFFERENT"
  ours, theirs = _read_bytes(reference), _read_bytes(chaos)
  if ours == theirs:
    return "identical"
  if name == "config.json":  # it records the data paths inside the workdir
    ours = ours.replace(roots[0].encode(), b"WORKDIR")
    theirs = theirs.replace(roots[1].encode(), b"WORKDIR")
    return "equal" if ours == theirs else "DIFFERENT"
  return "DIFFERENT"


def compare_runs(reference: str, chaos: str) -> dict:
  """Every output of the chaos run against the reference's (see the module docstring)."""
  files = [{_normalised(k): v for k, v in _files(root).items()} for root in (reference, chaos)]
  leftovers = sorted(k for k in files[1] if _is_temporary(k))
  checkpoints = [{_checkpoint_folder(k) for k in run} - {None} for run in files]
  # Outside checkpoints, file by file; checkpoint folders as wholes (their file names are random).
  for index in (0, 1):
    files[index] = {
      k: v for k, v in files[index].items() if not _is_temporary(k) and _checkpoint_folder(k) is None
    }
  result = {
    "missing": sorted((files[0].keys() - files[1].keys()) | (checkpoints[0] - checkpoints[1])),
    "extra": sorted((files[1].keys() - files[0].keys()) | (checkpoints[1] - checkpoints[0])),
    "leftover_temporaries": leftovers,
    "files": {},
    "checkpoints": {},
  }
  for relative in sorted(files[0].keys() & files[1].keys()):
    result["files"][relative] = _compare_file(
      relative, files[0][relative], files[1][relative], (reference, chaos)
    )
  for folder in sorted(checkpoints[0] & checkpoints[1]):
    same = _same_checkpoint(os.path.join(reference, folder), os.path.join(chaos, folder), (reference, chaos))
    result["checkpoints"][folder] = "equal" if same else "DIFFERENT"
  return result


def _matches(comparison: dict) -> bool:
  values = list(comparison["files"].values()) + list(comparison["checkpoints"].values())
  return not comparison["missing"] and not comparison["extra"] and "DIFFERENT" not in values


# --- entry point ---------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="holds reference/, chaos/, logs/ and the summary")
  parser.add_argument("--kills", type=int, default=12, help="SIGKILLs to deliver (at least 1)")
  parser.add_argument("--seed", type=int, default=0, help="draws the kill plan and the delays")
  parser.add_argument("--reference", help="a finished uninterrupted run with the same config (optional)")
  parser.add_argument("--config", default="configs/quickstart.py", help="passed to l2vit_jax.main")
  parser.add_argument("--timeout", type=float, default=600, help="seconds one run may go without ending")
  args, overrides = parser.parse_known_args(argv)
  bad = [flag for flag in overrides if not flag.startswith("--config.")]
  if bad or args.kills < 1:
    parser.error(
      f"unknown arguments {bad} (only --config.FIELD=VALUE overrides pass through)"
      if bad
      else "--kills must be >= 1"
    )
  args.overrides = overrides
  args.workdir = os.path.abspath(args.workdir)
  # Runs start in the repository root: a config path relative to here must still name the same file.
  if os.path.exists(args.config):
    args.config = os.path.abspath(args.config)
  else:
    args.config = os.path.join(REPO, args.config)
  return args


def _environment() -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # A cached executable is the same code, so results stay bit-identical; reruns skip recompiling.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _entries(folder: str) -> set[str]:
  return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def reference_timeline(args) -> tuple[str, list[str], list[float]]:
  """The reference run (made here unless given) and the segments' order and warm durations."""
  reference = os.path.abspath(args.reference or os.path.join(args.workdir, "reference"))
  if args.reference:
    if not (
      os.path.exists(os.path.join(reference, "report", "report.md")) and os.path.exists(reference + ".log")
    ):
      raise SystemExit(
        f"error: --reference={reference}: expected a finished run and its log {reference}.log "
        "(the reference/ and reference.log of an earlier chaos run)"
      )
    return (reference, *timeline(reference + ".log"))
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  cached = _entries(cache)
  run_reference(args, reference)
  if _entries(cache) <= cached:  # every executable came from the cache: timed as the reruns
    return (reference, *timeline(reference + ".log"))
  # Compiling made the reference's segments several times longer than the reruns' (which find every
  # executable cached): delays drawn from them would overshoot whole stages. Time a warm run instead.
  timing = os.path.join(args.workdir, "timing")
  run_reference(args, timing)
  shutil.rmtree(timing)
  return (reference, *timeline(timing + ".log"))


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  _environment()
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "xla_cache"))
  os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
  started = time.monotonic()
  reference, order, durations = reference_timeline(args)
  chaos = os.path.join(args.workdir, "chaos")
  attempts = run_chaos(args, chaos, order, durations)
  process, progress = _launch(args, chaos, os.path.join(args.workdir, "logs", "final.log"))
  _wait(process, progress, args.timeout)
  comparison = compare_runs(reference, chaos)
  summary = {
    "kills": sum(a["killed"] for a in attempts),
    "segments": dict(zip(order, durations)),
    "attempts": attempts,
    "final_status": process.returncode,
    "comparison": comparison,
    "seconds": round(time.monotonic() - started, 1),
  }
  summary["ok"] = (
    process.returncode == 0
    and all(a["killed"] or a["status"] == 0 for a in attempts)
    and _matches(comparison)
  )
  paths.write_json(os.path.join(args.workdir, "chaos_summary.json"), summary)
  print(json.dumps(summary, indent=2))
  return 0 if summary["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
