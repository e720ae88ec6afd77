"""The workdir lock is a lease: a frozen or vanished holder on another host is taken over once it stops
refreshing, a live one never is, and of many runs racing for one stale lock exactly one wins.

The holders run in subprocesses that pretend to be on another host (``socket.gethostname`` replaced),
with a lease of a second or two (``L2VIT_LOCK_LEASE_SECONDS``). No assertion is about speed: the tests
wait for conditions and check each outcome against the lock's own timestamps.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from l2vit_jax import errors
from l2vit_jax.checkpoint import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock as "old-spot-vm" until it finds it lost, then says to whom.
HOLDER = """
import socket, sys, time
socket.gethostname = lambda: "old-spot-vm"
from l2vit_jax.checkpoint import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
while lock.lost is None:
  time.sleep(0.02)
print("lost to", lock.lost, flush=True)
"""


def _start_holder(workdir, lease: float) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO, **{workdir_lock.LEASE_VARIABLE: str(lease)})
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env=env,
  )
  assert holder.stdout.readline().strip() == "held"
  return holder


def _lock_content(workdir) -> dict:
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    return json.load(f)


def test_a_frozen_holder_on_another_host_is_taken_over_once_its_lease_runs_out(tmp_path, monkeypatch, caplog):
  lease = 1.0
  holder = _start_holder(tmp_path, lease)
  try:
    os.kill(holder.pid, signal.SIGSTOP)  # a Spot VM gone silent: the lock stays, nobody refreshes it
    frozen = _lock_content(tmp_path)
    assert frozen["host"] == "old-spot-vm" and frozen["lease_seconds"] == lease
    monkeypatch.setenv(workdir_lock.LEASE_VARIABLE, "600")  # the taker judges by the holder's lease
    deadline = time.monotonic() + 60
    while True:
      before = time.time()
      taker = workdir_lock.WorkdirLock(str(tmp_path))
      try:
        taker.acquire()
        break
      except errors.WorkdirLockedError as refused:
        assert before - frozen["refreshed"] <= lease, f"refused a lock past its lease: {refused}"
        assert "old-spot-vm" in str(refused)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.time() - frozen["refreshed"] > lease  # taken over only after the lease
    assert "taking over a stale lock of process" in caplog.text and "old-spot-vm" in caplog.text
    assert f"process {holder.pid} on host old-spot-vm" in caplog.text
    mine = _lock_content(tmp_path)
    assert mine["pid"] == os.getpid()

    os.kill(holder.pid, signal.SIGCONT)  # the old holder wakes up: it finds its lock gone, writes nothing
    assert holder.stdout.readline().startswith(f"lost to process {os.getpid()} on host")
    assert holder.wait(timeout=30) == 0
    assert _lock_content(tmp_path)["token"] == mine["token"]
    assert taker.confirm_held() is None
    taker.release()
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
  finally:
    holder.kill()
    holder.wait()


def test_a_live_holder_on_another_host_is_never_taken_over(tmp_path):
  lease = 2.0
  holder = _start_holder(tmp_path, lease)
  try:
    first = _lock_content(tmp_path)
    deadline = time.monotonic() + 2.5 * lease  # attempts over more than two leases
    attempts = 0
    while time.monotonic() < deadline:
      with pytest.raises(errors.WorkdirLockedError, match="in use by process .* on host old-spot-vm"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
      attempts += 1
      time.sleep(0.1)
    last = _lock_content(tmp_path)
    assert last["token"] == first["token"] and last["refreshes"] > first["refreshes"]  # kept refreshing
    assert holder.poll() is None and attempts > 1
  finally:
    holder.kill()
    holder.wait()


def _write_stale_lock(path, host="gone-host"):
  with open(path, "w") as f:
    json.dump(
      {
        "host": host,
        "pid": 4242,
        "since": "2026-01-01 00:00:00",
        "refreshed": time.time() - 1000,
        "lease_seconds": 1.0,
        "refreshes": 7,
        "token": "stale",
      },
      f,
    )


def race_for_the_lock(workdir: str, write_stale, *, takers: int = 8) -> list:
  """``takers`` threads call ``acquire`` on one stale lock at once; returns the locks that got it."""
  write_stale()
  barrier = threading.Barrier(takers)
  winners, outcomes = [], []

  def take():
    lock = workdir_lock.WorkdirLock(workdir, lease=60)
    barrier.wait()
    try:
      lock.acquire()
      winners.append(lock)
      outcomes.append("won")
    except errors.WorkdirLockedError as refused:
      outcomes.append(str(refused))

  threads = [threading.Thread(target=take) for _ in range(takers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  assert len(outcomes) == takers, outcomes
  return winners


def test_of_many_runs_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
  path = tmp_path / workdir_lock.LOCK_FILE
  for _ in range(10):
    winners = race_for_the_lock(str(tmp_path), lambda: _write_stale_lock(path))
    assert len(winners) == 1
    assert _lock_content(tmp_path)["token"] == winners[0]._token  # pylint: disable=protected-access
    winners[0].release()
    assert not path.exists()
  leftovers = sorted(os.listdir(tmp_path))
  assert leftovers == []  # no stale-renamed or draft files left behind


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
  sleeper = subprocess.Popen([sys.executable, "-c", "pass"])
  sleeper.wait()
  with open(tmp_path / workdir_lock.LOCK_FILE, "w") as f:
    json.dump(
      dict(
        workdir_lock.machine_identity(), pid=sleeper.pid, since="x", refreshed=time.time(), lease_seconds=600
      ),
      f,
    )
  with workdir_lock.WorkdirLock(str(tmp_path)):  # refreshed just now, but its process is gone
    assert _lock_content(tmp_path)["pid"] == os.getpid()
  assert "no longer running" in caplog.text


def test_the_lease_comes_from_the_environment(monkeypatch):
  monkeypatch.delenv(workdir_lock.LEASE_VARIABLE, raising=False)
  assert workdir_lock.lease_seconds() == workdir_lock.DEFAULT_LEASE_SECONDS == 120
  monkeypatch.setenv(workdir_lock.LEASE_VARIABLE, "7.5")
  assert workdir_lock.lease_seconds() == 7.5
  for bad in ("0", "-3", "soon", "inf"):
    monkeypatch.setenv(workdir_lock.LEASE_VARIABLE, bad)
    with pytest.raises(errors.ConfigError, match=f"{workdir_lock.LEASE_VARIABLE}='{bad}'"):
      workdir_lock.lease_seconds()


def test_a_holder_refreshes_its_lock_in_place_while_it_holds_it(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=0.2)
  with lock:
    first = _lock_content(tmp_path)
    deadline = time.monotonic() + 30
    while _lock_content(tmp_path)["refreshes"] < first["refreshes"] + 2:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    later = _lock_content(tmp_path)
    assert later["token"] == first["token"] and later["refreshed"] > first["refreshed"]
    assert os.path.getsize(tmp_path / workdir_lock.LOCK_FILE) == workdir_lock.LOCK_BYTES
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)


def test_training_stops_before_a_save_once_its_lock_was_taken_over(tmp_path):
  from l2vit_jax.training import loop  # pylint: disable=import-outside-toplevel

  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=60)
  lock.acquire()
  try:
    loop._check_lock_held(lock, str(tmp_path))  # pylint: disable=protected-access  # ours: no error
    os.remove(tmp_path / workdir_lock.LOCK_FILE)
    _write_stale_lock(tmp_path / workdir_lock.LOCK_FILE, host="new-spot-vm")  # someone else's now
    with pytest.raises(errors.WorkdirLockedError, match="process 4242 on host new-spot-vm .*took over"):
      loop._check_lock_held(lock, str(tmp_path))  # pylint: disable=protected-access
  finally:
    lock.release()
  assert _lock_content(tmp_path)["host"] == "new-spot-vm"  # not ours: release left it alone


@pytest.mark.parametrize("other", ["boot_id", "pid_namespace", None])
def test_a_dead_pid_of_another_container_or_boot_with_our_host_name_is_judged_by_its_lease_alone(
  tmp_path, other
):
  """Two containers with one host name (or one host after a reboot) cannot see each other's PIDs: a
  PID gone here says nothing there, so the lock stays until its lease runs out. ``None``: a lock of an
  older version, without those fields."""
  sleeper = subprocess.Popen([sys.executable, "-c", "pass"])
  sleeper.wait()
  identity = workdir_lock.machine_identity()
  if other is None:
    identity = {"host": identity["host"]}
  else:
    identity[other] = "somewhere-else"
  with open(tmp_path / workdir_lock.LOCK_FILE, "w") as f:
    json.dump(dict(identity, pid=sleeper.pid, since="x", refreshed=time.time(), lease_seconds=600), f)
  with pytest.raises(errors.WorkdirLockedError, match=f"in use by process {sleeper.pid}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert _lock_content(tmp_path)["pid"] == sleeper.pid  # left alone


class _FailingRefreshes:
  """Stands in for a lock file whose refreshes raise ``error`` (``failures`` times, or for ever)."""

  def __init__(self, real, error: BaseException, failures: float):
    self.real, self.error, self.failures, self.calls = real, error, failures, 0

  def refresh(self, data):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.error
    return self.real.refresh(data)

  def __getattr__(self, name):
    return getattr(self.real, name)


class HttpError(Exception):
  """What gcsfs raises once its own retries are spent (not an OSError)."""


def _wait_for(condition, seconds=30.0):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline
    time.sleep(0.01)


def test_the_refresher_survives_any_storage_error_and_goes_on_refreshing(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=4.0)  # two failed refreshes stay within 3/4 of it
  with lock:
    failing = lock._file = _FailingRefreshes(lock._file, HttpError("503 Service Unavailable"), 2)  # pylint: disable=protected-access
    _wait_for(lambda: failing.calls >= 4)  # two failed, then two that went through (1 s apart)
    assert lock._thread.is_alive()  # pylint: disable=protected-access
    assert lock.check() is None and lock.confirm_held() is None
    assert _lock_content(tmp_path)["refreshes"] >= 3


def test_a_lock_not_refreshed_for_a_lease_counts_as_lost_even_before_anyone_takes_it(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=0.3)
  with lock:
    lock._file = _FailingRefreshes(lock._file, HttpError("503"), float("inf"))  # pylint: disable=protected-access
    assert lock.check() is None
    _wait_for(lambda: lock.check() is not None)
    assert "last refreshed its lock" in lock.check() and "lease" in lock.check()
    assert lock.confirm_held() == lock.check()  # the storage still names us, yet we stop writing
    assert lock._thread.is_alive()  # pylint: disable=protected-access


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end
def test_a_dead_refresher_is_a_lost_lock(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=0.2)
  with lock:
    lock._file = _FailingRefreshes(lock._file, SystemExit(), float("inf"))  # ends the thread  # pylint: disable=protected-access
    _wait_for(lambda: not lock._thread.is_alive())  # pylint: disable=protected-access
    assert "refresher stopped" in lock.confirm_held()


def test_an_unexpected_error_while_locking_reaches_every_process(tmp_path, monkeypatch):
  """Process 0's lock fails with an error of no lock's kind (a bug, a storage library): it tells the
  other processes before it raises, so they stop too instead of waiting in the broadcast for ever."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(
    workdir_lock.WorkdirLock, "acquire", lambda self: (_ for _ in ()).throw(HttpError("500 from the storage"))
  )
  monkeypatch.setattr(workdir_lock.jax, "process_count", lambda: 2)
  sent = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda value: sent.append(int(value)) or value)
  with pytest.raises(HttpError, match="500"):
    workdir_lock.lock_workdir(str(tmp_path))
  assert sent == [0]  # "not locked", told to every process
  monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)  # another process gets that 0
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda value: np.int32(sent[0]))
  with pytest.raises(errors.WorkdirLockedError, match="process 0 could not lock this workdir"):
    workdir_lock.lock_workdir(str(tmp_path))


def _files(directory, leave_out=("lock", "tensorboard")) -> dict:
  """Every file under ``directory`` (but ``leave_out``) with its bytes."""
  found = {}
  for root, dirs, names in os.walk(directory):
    dirs[:] = [d for d in dirs if d not in leave_out]
    for name in names:
      if name not in leave_out:
        with open(os.path.join(root, name), "rb") as file:
          found[os.path.relpath(os.path.join(root, name), directory)] = file.read()
  return found


def test_a_run_whose_lock_was_taken_over_writes_no_best_model_metrics_row_or_checkpoint(
  tmp_path, monkeypatch
):
  """The lock is taken over while the run validates its last epoch, with a validation loss that
  would be its best: the run stops with every file as the new owner found it (no ``best/`` step, no
  metrics row, no checkpoint)."""
  from conftest import tiny_config, write_jet_file  # pylint: disable=import-outside-toplevel
  from l2vit_jax.training import loop  # pylint: disable=import-outside-toplevel

  config = tiny_config("finetune", write_jet_file(tmp_path / "labelled.h5", num=65), num_epochs=2)
  workdir, lock_path = str(tmp_path / "run"), tmp_path / "run" / workdir_lock.LOCK_FILE
  real_validate, seen = loop.validate, {}

  def validate_then_lose_the_lock(*args, **kwargs):
    metrics = real_validate(*args, **kwargs)
    seen["calls"] = seen.get("calls", 0) + 1
    if seen["calls"] == 2:  # the last epoch: the first one's best/, checkpoint and rows are on disk
      seen["files"] = _files(workdir)
      os.remove(lock_path)
      with open(lock_path, "w") as f:  # a live run on another host took over
        json.dump(
          {
            "host": "new-spot-vm",
            "pid": 4242,
            "since": "now",
            "refreshed": time.time(),
            "lease_seconds": 600,
            "token": "new",
          },
          f,
        )
      metrics["val/loss"] = -1.0  # better than any before: the old code saved it as best/
    return metrics

  monkeypatch.setattr(loop, "validate", validate_then_lose_the_lock)
  with pytest.raises(errors.WorkdirLockedError, match="process 4242 on host new-spot-vm .*took over"):
    loop.train_and_evaluate(config, workdir)
  after = _files(workdir)
  best = lambda files: {name: data for name, data in files.items() if name.startswith("best")}
  assert seen["calls"] == 2 and best(seen["files"])
  assert best(after) == best(seen["files"])  # the old code replaced best/5 with best/10 here
  assert after["metrics.jsonl"] == seen["files"]["metrics.jsonl"]  # no row for step 10
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]  # step 5's save was under way
  assert _lock_content(workdir)["token"] == "new"


def test_a_storage_that_cannot_answer_the_confirmation_leaves_the_lease_to_decide(tmp_path):
  """Reading the lock back fails (gcsfs's HttpError after its retries): within its lease the lock is
  still this run's (nobody may take it over before), so the run goes on rather than stop on a 503."""
  lock = workdir_lock.WorkdirLock(str(tmp_path), lease=60)
  with lock:
    lock._file.still_ours = lambda: (_ for _ in ()).throw(HttpError("503"))  # pylint: disable=protected-access
    assert lock.confirm_held() is None


def test_a_gcs_write_of_ours_that_raised_or_was_retried_is_recognised_by_its_token(monkeypatch):
  """gcsfs retried a refresh whose answer was lost (the retry fails its precondition), or an earlier
  write went through although it raised: the object carries our token, so the lock is still ours at
  its new generation; another run's object is not adopted."""
  lock = workdir_lock.WorkdirLock("gs://bucket/run", lease=60)
  mine = lock._content()  # pylint: disable=protected-access
  theirs = mine.replace(lock._token.encode(), b"x" * len(lock._token))  # pylint: disable=protected-access
  remote = lock._file  # pylint: disable=protected-access
  remote._generation = 7  # pylint: disable=protected-access
  monkeypatch.setattr(workdir_lock.paths, "write_if_generation", lambda path, data, generation: None)
  for found, ours in ((mine, True), (theirs, False)):
    monkeypatch.setattr(workdir_lock.paths, "read_generation", lambda path, found=found: (found, 9))
    remote._generation = 7  # pylint: disable=protected-access
    assert remote.refresh(lock._content()) is ours  # pylint: disable=protected-access
    assert remote._generation == (9 if ours else None)  # pylint: disable=protected-access
