"""Reliability: preemption, faults and bad input lose nothing and explain themselves.

Most tests drive the real command line (``python -m l2vit_jax.main``) in a subprocess, as a user or a
scheduler would: SIGKILL at random moments (one during an asynchronous checkpoint save), SIGTERM,
bad input files, bad configs, a second run on a busy workdir, a wrong resume. The rest call the
functions directly where a subprocess would only add start-up time.
"""

import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TEST_XLA_FLAGS, write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io, naming, storage, workdir_lock
from l2vit_jax.data import download, hdf5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
ENV = dict(
  os.environ,
  PYTHONPATH=os.pathsep.join([REPO, TESTS]),
  JAX_PLATFORMS="cpu",
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)
ENV["XLA_FLAGS"] = TEST_XLA_FLAGS  # one CPU device per process
# Every run of one config compiles the same train step: subprocesses share a compilation cache, so only
# the first pays (a cached executable is the same code, so results stay bit-identical).
CONFIG = dict(num_epochs=4)  # 20 steps of 5 per epoch: room for four interruptions


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  # 65 images: one more than validation samples (see nan_outside_the_sample); 46 train, 5 steps an epoch
  return {
    "labelled": write_jet_file(root / "labelled.h5", num=65),
    "unlabelled": write_jet_file(root / "unlabelled.h5", num=48, labelled=False),
  }


def _write_config(path, task, labelled="", unlabelled="", **overrides) -> str:
  """A config file for ``--config=`` that builds ``conftest.tiny_config(task, ...)``."""
  path.write_text(
    f"from conftest import tiny_config\n\n"
    f"def get_config():\n"
    f"  return tiny_config({task!r}, {str(labelled)!r}, {str(unlabelled)!r}, "
    f"**{overrides!r})\n"
  )
  return str(path)


def _cli(config_file, workdir, *flags, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "l2vit_jax.main", f"--config={config_file}", f"--workdir={workdir}", *flags],
    env=env or ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _launch(config_file, workdir, log, *flags) -> subprocess.Popen:
  # Output goes to a file, not a pipe: nobody reads it while the run goes, and a full pipe would block.
  with open(log, "w") as out:
    return subprocess.Popen(
      [sys.executable, "-m", "l2vit_jax.main", f"--config={config_file}", f"--workdir={workdir}", *flags],
      env=ENV,
      stdout=out,
      stderr=subprocess.STDOUT,
    )


def _assert_one_line_error(result, *fragments, alone=True):
  """Non-zero exit, no traceback, and one ``error:`` line holding ``fragments``, last on stderr.

  ``alone``: the error came before any work, so it is all there is on stderr (no log lines either).
  """
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  assert len(lines) == 1 or not alone, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def _snapshot(directory) -> dict | None:
  """Every file under ``directory`` with its size and mtime; None if it does not exist."""
  if not os.path.exists(directory):
    return None
  return {
    os.path.join(root, name): (
      os.stat(os.path.join(root, name)).st_size,
      os.stat(os.path.join(root, name)).st_mtime_ns,
    )
    for root, dirs, names in os.walk(directory)
    for name in names + dirs
  }


def _latest_arrays(workdir):
  return model_io.read_model_checkpoint(str(workdir), prefer=(naming.LATEST_DIR,))


def _checkpoint_entries(workdir) -> list[str]:
  path = os.path.join(workdir, naming.LATEST_DIR)
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _complete_steps(workdir) -> list[int]:
  return sorted(int(name) for name in _checkpoint_entries(workdir) if name.isdigit())


def _tmp_steps(workdir) -> list[int]:
  """Steps of Orbax temporary directories: saves under way, or left by a killed process."""
  return sorted(
    int(name.split(".")[0])
    for name in _checkpoint_entries(workdir)
    if "tmp" in name and name.split(".")[0].isdigit()
  )


def _logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path) as f:
    for line in f:
      try:
        steps.append(json.loads(line)["step"])
      except ValueError:
        pass  # being written
  return steps


def _wait_for(condition, process, timeout=240.0, poll=0.003):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"the run ended (status {process.returncode}) before the kill point"
    assert time.monotonic() < deadline, "timed out waiting for the kill point"
    time.sleep(poll)


# --- 1. preemption: SIGKILL and SIGTERM ---------------------------------------------------------------


def test_killed_and_preempted_run_resumes_to_the_same_parameters(files, tmp_path):
  """SIGKILL three times (twice while an asynchronous save is being written), then SIGTERM, then run to
  the end: the final parameters equal an uninterrupted run's, bit for bit."""
  config_file = _write_config(
    tmp_path / "config.py", "finetune", files["labelled"], files["unlabelled"], **CONFIG
  )
  uninterrupted = _cli(config_file, tmp_path / "uninterrupted")
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  reference = {
    "total_steps": max(_logged_steps(tmp_path / "uninterrupted")),
    "best_val_loss": _latest_arrays(tmp_path / "uninterrupted")[1]["early_stopping"]["best_val_loss"],
  }
  workdir = str(tmp_path / "interrupted")
  rng = random.Random(0)
  left_behind = []
  for trial, moment in enumerate(["during a save", "at a random time", "during a save"]):
    start = max(_complete_steps(workdir), default=0)
    log = tmp_path / f"kill{trial}.log"
    process = _launch(config_file, workdir, log, "--config.checkpoint_every_steps=1")
    try:
      if moment == "during a save":  # an Orbax temporary directory exists only while a save is written
        _wait_for(lambda start=start: any(s >= start + 2 for s in _tmp_steps(workdir)), process)
      else:
        _wait_for(lambda start=start: max(_complete_steps(workdir), default=0) >= start + 2, process)
        time.sleep(rng.uniform(0.0, 0.3))
    finally:
      process.send_signal(signal.SIGKILL)
      process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    left_behind += _tmp_steps(workdir)
    assert max(_complete_steps(workdir)) > start
    if trial:  # the previous kill left its lock behind; this run took it over
      assert "taking over a stale lock" in log.read_text()
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # the last kill left it too

  # SIGTERM (a preemption notice): the run saves at the next step boundary and exits; checkpoints are
  # otherwise only written at epoch ends here, so the checkpoint at that step is the SIGTERM's doing.
  start = max(_complete_steps(workdir))
  log = tmp_path / "sigterm.log"
  process = _launch(config_file, workdir, log)
  try:
    # Rows past `start` left by the last kill are dropped on resume, before "Resumed" is logged.
    _wait_for(
      lambda: "Resumed finetune" in log.read_text() and any(s > start for s in _logged_steps(workdir)),
      process,
    )
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
  finally:
    process.kill()
  output = log.read_text()
  assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert "Traceback" not in output
  saved_at = max(_complete_steps(workdir))
  assert f"Received SIGTERM: saved a checkpoint at step {saved_at}; exiting" in output, output[-3000:]
  assert start < saved_at < reference["total_steps"]
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released on SIGTERM

  result = _cli(config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed finetune from step {saved_at}" in result.stderr
  assert not _tmp_steps(workdir)  # what the kills left behind was cleaned up
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  got, meta = _latest_arrays(workdir)
  assert meta["early_stopping"]["best_val_loss"] == reference["best_val_loss"]
  for sub in (naming.LATEST_DIR, naming.BEST_DIR):  # the best model survived intact too
    want, want_meta = model_io.read_model_checkpoint(str(tmp_path / "uninterrupted"), prefer=(sub,))
    got, got_meta = model_io.read_model_checkpoint(workdir, prefer=(sub,))
    assert got_meta["epoch"] == want_meta["epoch"]
    for group in want:
      assert sorted(got[group]) == sorted(want[group])
      for name in want[group]:
        np.testing.assert_array_equal(got[group][name], want[group][name], err_msg=f"{sub}: {name}")
  # Log rows of steps redone after a kill were dropped on resume: one row per step, in order.
  assert _logged_steps(workdir) == list(range(1, reference["total_steps"] + 1))
  print(f"Orbax temporary directories left by the kills (then cleaned up): steps {left_behind}")


# --- 2. bad input files -------------------------------------------------------------------------------


def _nan_images(num, size=25):
  jet = np.zeros((num, size, size, 8), np.float32)
  jet[-1, 3, 4, 5] = np.nan  # the last image is always among those checked
  return jet


def _bad_file(tmp_path, case) -> tuple[str, str, dict, tuple[str, ...]]:
  """(task, path, config overrides, expected fragments) for one bad-input case."""
  path = tmp_path / f"{case}.h5"
  if case == "missing":
    return "finetune", str(path), {}, ("file not found",)
  if case == "not_hdf5":
    path.write_text("<html><body>Error 404: file not found</body></html>")
    return "simclr", str(path), {}, ("not an HDF5 file",)
  if case == "truncated":
    good = write_jet_file(tmp_path / "good.h5", num=64)
    path.write_bytes(open(good, "rb").read()[:300_000])
    return "finetune", str(path), {}, ("truncated",)
  if case == "nan_pixels":
    write_jet_file(path, num=48, labelled=False, overrides={"jet": _nan_images(48)})
    return "simclr", str(path), {}, ("key 'jet'", "expected finite pixels", "image 47")
  if case == "labels_not_binary":
    write_jet_file(path, num=64, overrides={"Y": np.full((64, 1), 3.0, np.float32)})
    return "finetune", str(path), {}, ("key 'Y'", "expected class labels in {0, 1}", "found 3.0")
  if case == "wrong_image_size":
    write_jet_file(path, num=64, size=20)
    return "finetune", str(path), {}, ("key 'jet'", "expected shape (N, 25, 25, 8)", "(64, 20, 20, 8)")
  if case == "train_split_under_one_batch":  # 9 images pass the file's one-batch check; 7 train
    write_jet_file(path, num=9)
    return "finetune", str(path), {}, ("key 'jet'", "fewer than one batch of 8")
  raise ValueError(case)


def _rows_without_timings(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in row.items() if k not in ("images_per_second", "eta_seconds")} for row in rows]


def test_a_run_stopped_between_log_rows_logs_what_an_uninterrupted_run_logs(files, tmp_path):
  """Saves off the log interval (every 2 steps, rows every 3): the stopped and resumed run must not
  log a row whose train/* means cover only the steps since the resume."""
  config_file = _write_config(
    tmp_path / "config.py",
    "finetune",
    files["labelled"],
    files["unlabelled"],
    num_epochs=2,
    log_every_steps=3,
    checkpoint_every_steps=2,
  )
  assert _cli(config_file, tmp_path / "uninterrupted").returncode == 0
  stopped = _cli(config_file, tmp_path / "stopped", "--config.stop_after_steps=4")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  resumed = _cli(config_file, tmp_path / "stopped")
  assert resumed.returncode == 0 and "Resumed finetune from step 4" in resumed.stderr
  assert _rows_without_timings(tmp_path / "stopped") == _rows_without_timings(tmp_path / "uninterrupted")


@pytest.mark.parametrize(
  "case, workdir_exists",
  [
    ("missing", False),
    ("not_hdf5", False),
    ("truncated", True),
    ("nan_pixels", False),
    ("labels_not_binary", True),
    ("wrong_image_size", False),
    ("train_split_under_one_batch", False),
  ],
)
def test_bad_input_file_fails_in_one_line_and_writes_nothing(tmp_path, case, workdir_exists):
  task, path, overrides, fragments = _bad_file(tmp_path, case)
  paths = {"labelled": path} if task == "finetune" else {"unlabelled": path}
  config_file = _write_config(tmp_path / "config.py", task, **paths, **overrides)
  workdir = tmp_path / "run"
  if workdir_exists:
    workdir.mkdir()
  result = _cli(config_file, workdir)
  _assert_one_line_error(result, path, *fragments)
  assert _snapshot(workdir) == ({} if workdir_exists else None)


@pytest.mark.parametrize(
  "kwargs, expected",
  [
    (dict(drop=("jet",)), "key 'jet': missing; expected dataset of shape (N, H, W, 8)"),
    (dict(drop=("pT",)), "key 'pT': missing"),
    (dict(overrides={"jet": np.zeros((40, 25, 25), np.float32)}), "key 'jet': expected shape"),
    (dict(overrides={"jet": np.zeros((40, 25, 24, 8), np.float32)}), "key 'jet': expected shape"),
    (dict(overrides={"jet": np.zeros((40, 25, 25, 8), np.int16)}), "expected dtype float32, found int16"),
    (dict(overrides={"jet": np.full((40, 25, 25, 8), np.inf, np.float32)}), "NaN/Inf in image 0"),
    (dict(overrides={"jet": -np.ones((40, 25, 25, 8), np.float32)}), "expected pixels >= 0, found -1.0"),
    (dict(overrides={"Y": np.full((40, 1), np.nan, np.float32)}), "key 'Y': expected class labels"),
    (dict(overrides={"Y": np.ones((40, 2), np.float32)}), "key 'Y': expected shape (40, 1)"),
    (dict(overrides={"Y": np.array([["a"]] * 40, dtype="S1")}), "key 'Y': expected a numeric dtype"),
    (dict(overrides={"m": -np.ones((40, 1), np.float32)}), "key 'm': expected finite positive masses"),
    (dict(overrides={"m": np.full((40, 1), np.nan, np.float32)}), "key 'm': expected finite positive"),
    (dict(overrides={"pT": np.full((40, 1), np.inf, np.float32)}), "key 'pT': expected finite values"),
  ],
)
def test_every_schema_violation_is_named(tmp_path, kwargs, expected):
  path = write_jet_file(tmp_path / "bad.h5", **kwargs)
  with pytest.raises(errors.DataError) as error:
    hdf5.validate_file(path, labelled=True, image_size=25)
  message = str(error.value)
  assert expected in message and message.startswith(path) and "\n" not in message


def test_paths_that_are_not_files(tmp_path):
  with pytest.raises(errors.DataError, match="no file given"):
    hdf5.validate_file("", labelled=True)
  with pytest.raises(errors.DataError, match="is a directory"):
    hdf5.validate_file(str(tmp_path), labelled=True)
  group = tmp_path / "group.h5"
  with h5py.File(group, "w") as f:
    f.create_group("jet")
  with pytest.raises(errors.DataError, match="key 'jet': expected shape .* found a group"):
    hdf5.validate_file(str(group), labelled=False)


def test_validation_reads_a_fixed_sample_of_pixels_whatever_the_file_size(tmp_path):
  image_bytes = 25 * 25 * 8 * 4
  for num in (200, 400):
    path = write_jet_file(tmp_path / f"n{num}.h5", num=num, labelled=False)
    info = hdf5.validate_file(path, labelled=False)
    assert info.bytes_read_for_values == hdf5.DEFAULT_VALUE_SAMPLE * image_bytes < num * image_bytes


# --- 3. divergence ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_outside_the_sample(files, tmp_path_factory):
  """The labelled file with a NaN pixel in every image that validation does not sample (one of them is in
  the training split): it passes validation, and training meets the NaN a few steps in. Labels and
  masses are unchanged, so the compiled train step (mass statistics are constants in it) is reused."""
  path = str(tmp_path_factory.mktemp("nan") / "labelled_with_nan.h5")
  with open(files["labelled"], "rb") as src, open(path, "wb") as dst:
    dst.write(src.read())
  with h5py.File(path, "r+") as f:
    num = f["jet"].shape[0]
    unsampled = sorted(set(range(num)) - set(hdf5.value_sample_indices(num, hdf5.DEFAULT_VALUE_SAMPLE)))
    assert unsampled
    for index in unsampled:
      f["jet"][index, 3, 3, 3] = np.nan
  hdf5.validate_file(path, labelled=True)  # does not notice: it reads a sample
  return path


def _checkpoint_at(workdir, step) -> dict:
  """The named model arrays of ``WORKDIR/checkpoints/<step>``."""
  with storage.open_manager(
    os.path.join(workdir, naming.LATEST_DIR), max_to_keep=None, read_only=True
  ) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
  return {
    group: {name: np.asarray(value) for name, value in arrays.items()}
    for group, arrays in restored["model"].items()
  }


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  files, tmp_path, nan_outside_the_sample
):
  config_file = _write_config(
    tmp_path / "config.py", "finetune", nan_outside_the_sample, files["unlabelled"], **CONFIG
  )
  workdir = str(tmp_path / "run")
  line = _assert_one_line_error(
    _cli(config_file, workdir, "--config.checkpoint_every_steps=1"),
    "non-finite loss or gradient at step",
    "stopped without saving that state",
    alone=False,
  )
  failed_step = int(line.split("at step ")[1].split(";")[0])
  complete = _complete_steps(workdir)
  assert complete == list(range(1, failed_step))[-3:]  # every good step (the last 3 kept), no more
  assert f"last good checkpoint: {f'step {complete[-1]}' if complete else 'none'}" in line
  assert not _tmp_steps(workdir) and _logged_steps(workdir) == list(range(1, failed_step))
  if complete:
    arrays, _ = _latest_arrays(workdir)
    assert all(np.isfinite(v).all() for group in arrays.values() for v in group.values())
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_skip_nonfinite_steps_discards_exactly_that_update(files, tmp_path, nan_outside_the_sample):
  config_file = _write_config(
    tmp_path / "config.py", "finetune", nan_outside_the_sample, files["unlabelled"], **CONFIG
  )
  workdir = str(tmp_path / "run")
  result = _cli(
    config_file,
    workdir,
    "--config.skip_nonfinite_steps=True",
    "--config.stop_after_steps=8",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=10",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  skipped = [
    row["step"]
    for row, before in zip(rows, [{"skipped_steps": 0}] + rows)
    if row["skipped_steps"] > before["skipped_steps"]
  ]
  assert skipped and rows[-1]["skipped_steps"] == len(skipped), rows  # the NaN image, once an epoch
  for step in skipped:
    assert (
      f"Skipped 1 step(s) with a non-finite loss or gradient (steps {step}); their updates were discarded"
    ) in result.stderr
    if step > 1:  # parameters and BatchNorm statistics exactly as they were before the NaN batch
      before, after = _checkpoint_at(workdir, step - 1), _checkpoint_at(workdir, step)
      for group in before:
        for name in before[group]:
          np.testing.assert_array_equal(after[group][name], before[group][name], err_msg=name)
  final = _checkpoint_at(workdir, 8)
  assert all(np.isfinite(v).all() for group in final.values() for v in group.values())


# --- 4. wrong resumes and busy workdirs ---------------------------------------------------------------


def test_resuming_with_another_architecture_is_refused_naming_the_fields(files, tmp_path):
  config_file = _write_config(
    tmp_path / "config.py", "finetune", files["labelled"], files["unlabelled"], **CONFIG
  )
  trained_workdir = str(tmp_path / "run")
  first = _cli(config_file, trained_workdir, "--config.stop_after_steps=1")
  assert first.returncode == 0, first.stderr[-3000:]
  before = _snapshot(trained_workdir)
  result = _cli(config_file, trained_workdir, "--config.model.embed_dim=48", "--config.model.depth=2")
  _assert_one_line_error(
    result,
    "does not match this run",
    "depth: checkpoint 1 vs config 2",
    "embed_dim: checkpoint 32 vs config 48",
    "Use a new --workdir",
  )
  assert _snapshot(trained_workdir) == before  # config.json and checkpoints untouched, lock released


def test_a_second_run_on_a_busy_workdir_is_refused(files, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00"}
  lock_path = str(workdir / workdir_lock.LOCK_FILE)
  with open(lock_path, "w") as f:
    json.dump(holder, f)  # held by this test's own process: alive, so the lock is not stale
  before = _snapshot(workdir)
  config_file = _write_config(tmp_path / "config.py", "finetune", files["labelled"], files["unlabelled"])
  _assert_one_line_error(
    _cli(config_file, workdir),
    "workdir is in use by",
    f"process {os.getpid()} on host {holder['host']}",
    lock_path,
  )
  assert _snapshot(workdir) == before


def test_workdir_lock_refuses_live_holders_and_takes_over_dead_ones(tmp_path, caplog):
  first = workdir_lock.WorkdirLock(str(tmp_path))
  first.acquire()
  holder = json.load(open(tmp_path / "lock"))
  assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
  first.release()
  assert not os.path.exists(tmp_path / "lock")

  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(tmp_path / "lock", "w") as f:
      json.dump(dict(workdir_lock.machine_identity(), pid=sleeper.pid), f)
    with pytest.raises(errors.WorkdirLockedError, match=f"process {sleeper.pid} on host"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  with workdir_lock.WorkdirLock(str(tmp_path)):  # the holder died: a stale lock, taken over
    assert json.load(open(tmp_path / "lock"))["pid"] == os.getpid()
  assert "taking over a stale lock" in caplog.text
  assert not os.path.exists(tmp_path / "lock")

  with open(tmp_path / "lock", "w") as f:
    json.dump({"host": "another-host", "pid": 1}, f)
  with pytest.raises(
    errors.WorkdirLockedError,
    match="process 1 on host another-host.*if that run is dead, delete the lock file",
  ):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert json.load(open(tmp_path / "lock"))["host"] == "another-host"  # someone else's: left alone


# --- 6. config errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "flags, fragments, env_extra",
  [
    (["--config.not_a_field=1"], ["--config.not_a_field=1", "no field 'not_a_field'"], {}),
    (["--config.model.not_a_field=1"], ["no field 'not_a_field'"], {}),
    (["--config.batch_size=abc"], ["--config.batch_size=abc", "invalid literal for int()"], {}),
    (["--config.task=bogus"], ["config.task='bogus'", "expected one of"], {}),
    (
      ["--config.model.attention=quadratic", "--config.log_every_steps=0"],
      ["model.attention='quadratic': expected one of ['linear', 'softmax']", "log_every_steps=0"],
      {},
    ),
    (
      ["--config.batch_size=12"],
      ["batch_size=12: expected a positive multiple of the 8 device(s)"],
      {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"},
    ),
  ],
)
def test_config_errors_fail_before_any_work(files, tmp_path, flags, fragments, env_extra):
  config_file = _write_config(tmp_path / "config.py", "finetune", files["labelled"], files["unlabelled"])
  workdir = tmp_path / "run"
  result = _cli(config_file, workdir, *flags, env=dict(ENV, **env_extra))
  _assert_one_line_error(result, *fragments)
  assert not os.path.exists(workdir)


def test_check_config_accepts_the_shipped_recipes():
  # In a subprocess: importing l2vit_jax.main defines its absl flags, which this process should not.
  code = (
    "import importlib.util, sys\n"
    "from l2vit_jax import main\n"
    "for name in sys.argv[1:]:\n"
    "  spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')\n"
    "  module = importlib.util.module_from_spec(spec)\n"
    "  spec.loader.exec_module(module)\n"
    "  main.check_config(module.get_config())\n"
  )
  names = sorted(
    name[:-3]
    for name in os.listdir(os.path.join(REPO, "configs"))
    if name.endswith(".py") and not name.startswith("_")
  )
  result = subprocess.run(
    [sys.executable, "-c", code, *names], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]


# --- 5. download faults not covered by test_download.py ------------------------------------------------


class _ScriptedServer:
  """Serves ``bodies[i]`` to request i (the last one thereafter); ``drop_after`` cuts the first reply
  short, and ``wrong_start`` answers a Range request with bytes from 0 labelled as 0-."""

  def __init__(self, bodies, *, drop_after=None, wrong_start=False):
    self.bodies, self.requests = bodies, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        body = server.bodies[min(len(server.requests), len(server.bodies) - 1)]
        range_header = self.headers.get("Range")
        server.requests.append(range_header)
        start = int(range_header.split("=")[1].rstrip("-")) if range_header else 0
        if range_header and wrong_start:
          start_label, start = 0, 0
        else:
          start_label = start
        self.send_response(206 if range_header else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        if range_header:
          self.send_header("Content-Range", f"bytes {start_label}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        payload = body[start:]
        if len(server.requests) == 1 and drop_after:
          payload = payload[:drop_after]
        self.wfile.write(payload)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.h5"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_file_changed_on_the_server_mid_download_is_restarted(tmp_path):
  old = open(write_jet_file(tmp_path / "old.h5", num=8, seed=1), "rb").read()
  new = open(write_jet_file(tmp_path / "new.h5", num=12, seed=2), "rb").read()
  server = _ScriptedServer([old, new], drop_after=len(old) // 2)
  try:
    dest = str(tmp_path / "out" / "labelled.h5")
    download.download_file(server.url, dest, labelled=True, progress=False, retry_wait=0.0)
  finally:
    server.close()
  assert open(dest, "rb").read() == new  # never a splice of two versions
  assert server.requests[:2] == [None, f"bytes={len(old) // 2}-"] and server.requests[2] is None


def test_range_reply_starting_at_the_wrong_byte_is_discarded(tmp_path):
  body = open(write_jet_file(tmp_path / "file.h5", num=8), "rb").read()
  server = _ScriptedServer([body], drop_after=len(body) // 3, wrong_start=True)
  try:
    dest = str(tmp_path / "out" / "labelled.h5")
    download.download_file(server.url, dest, labelled=True, progress=False, retry_wait=0.0)
  finally:
    server.close()
  assert open(dest, "rb").read() == body
  assert server.requests == [None, f"bytes={len(body) // 3}-", None]
