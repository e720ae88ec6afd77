"""Faults of a two-process run, through the real command line: preemption of one or both processes,
the loss of a peer (SIGKILL), kills mid-write of ``metrics.jsonl``, and the end of a run (the peer
watchdog stopped before JAX shuts its client down).

Two CPU processes on 127.0.0.1 stand in for the hosts of a TPU slice (gloo collectives, JAX's
coordination service on a free port), as in ``tests/test_train.py``. Signals are sent at moments read
from the run's own files (a logged step, a complete checkpoint), not after blind sleeps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, write_jet_file
from l2vit_jax.checkpoint import model_io, naming, workdir_lock
from l2vit_jax.runtime import peers
from l2vit_jax.training import metrics_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
PEER_TIMEOUT = 10  # seconds; L2VIT_PEER_TIMEOUT_SECONDS of every run here (small, yet above a busy CI stall)
ENV = dict(
  os.environ,
  PYTHONPATH=os.pathsep.join([REPO, TESTS]),
  JAX_PLATFORMS="cpu",
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  **{peers.TIMEOUT_VARIABLE: str(PEER_TIMEOUT)},
)
ENV["XLA_FLAGS"] = TEST_XLA_FLAGS  # one CPU device per process
# 46 training jets, 2 per process and step: 11 steps an epoch, 44 in all. A step takes ~30 ms, and a
# preemption notice needs a moment to reach every process: leave room for the sync point.
CONFIG = dict(batch_size=4, num_epochs=4)
TOTAL_STEPS = 44


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")  # every run compiles the same steps
  labelled = write_jet_file(root / "labelled.h5", num=65)
  unlabelled = write_jet_file(root / "unlabelled.h5", num=48, labelled=False)
  path = root / "config.py"
  path.write_text(
    f"from conftest import tiny_config\n\n"
    f"def get_config():\n"
    f"  return tiny_config('finetune', {labelled!r}, {unlabelled!r}, **{CONFIG!r})\n"
  )
  return str(path)


class Pair:
  """Two processes of one run, ``python ARGS`` joined through a coordinator on a free port; their
  output goes to files (a full pipe would block one at a barrier)."""

  def __init__(self, log_prefix, *args):
    with socket.socket() as probe:  # a free port for the coordinator
      probe.bind(("127.0.0.1", 0))
      port = probe.getsockname()[1]
    self.logs, self.processes = [], []
    for i in range(2):
      self.logs.append(f"{log_prefix}.process{i}.log")
      with open(self.logs[-1], "w") as out:
        self.processes.append(
          subprocess.Popen(
            [sys.executable, *args],
            env=dict(
              ENV,
              L2VIT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              L2VIT_NUM_PROCESSES="2",
              L2VIT_PROCESS_ID=str(i),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
          )
        )

  def output(self, i) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait_for(self, condition, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
      for i, process in enumerate(self.processes):
        assert process.poll() is None, f"process {i} ended early:\n{self.output(i)[-3000:]}"
      assert time.monotonic() < deadline, "timed out waiting for the signal point"
      time.sleep(0.01)

  def wait(self, timeout=240.0) -> list[int]:
    try:
      for process in self.processes:
        process.wait(timeout=timeout)
    finally:
      for process in self.processes:
        process.kill()
    return [process.returncode for process in self.processes]


def _main_pair(config_file, workdir, log_prefix, *flags) -> Pair:
  """Both processes of ``l2vit_jax.main`` training ``config_file`` in ``workdir``."""
  return Pair(log_prefix, "-m", "l2vit_jax.main", f"--config={config_file}", f"--workdir={workdir}", *flags)


def _logged_steps(workdir) -> list[int]:
  """Steps of ``metrics.jsonl``; every line must parse (the file is replaced whole, never appended)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f]


def _complete_steps(workdir) -> list[int]:
  path = os.path.join(workdir, naming.LATEST_DIR)
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _run_to_the_end(config_file, workdir, log_prefix) -> list[str]:
  pair = _main_pair(config_file, workdir, log_prefix)
  statuses = pair.wait()
  outputs = [pair.output(i) for i in range(2)]
  assert statuses == [0, 0], "\n".join(o[-3000:] for o in outputs)
  return outputs


def _model_arrays(workdir, sub) -> tuple[int, dict]:
  """The step under ``workdir/sub`` and its model arrays, read by this single process (the pair's
  checkpoint names the devices of both processes: read as numpy, see read_model_checkpoint)."""
  arrays, _ = model_io.read_model_checkpoint(str(workdir), prefer=(sub,))
  return model_io.find_model_checkpoint(str(workdir), prefer=(sub,))[1], arrays


def _assert_same_final_state(workdir, reference):
  """The latest and best checkpoints equal the uninterrupted run's, bit for bit; one log row a step."""
  for sub in (naming.LATEST_DIR, naming.BEST_DIR):
    want_step, want = _model_arrays(reference, sub)
    got_step, got = _model_arrays(str(workdir), sub)
    assert got_step == want_step, sub
    for group in want:
      assert sorted(got[group]) == sorted(want[group])
      for name in want[group]:
        np.testing.assert_array_equal(got[group][name], want[group][name], err_msg=f"{sub}: {name}")
  assert _logged_steps(workdir) == _logged_steps(reference)
  with open(os.path.join(workdir, "config.json")) as f:
    json.load(f)  # written whole too


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
  """An uninterrupted two-process run."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  _run_to_the_end(config_file, workdir, str(workdir))
  assert _logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
  return str(workdir)


def _preempt(config_file, workdir, log_prefix, targets) -> int:
  """SIGTERM to ``targets`` of a pair once it logged two steps past its start: both save one step."""
  start = max(_complete_steps(workdir), default=0)
  pair = _main_pair(config_file, workdir, log_prefix)
  pair.wait_for(lambda: any(s >= start + 2 for s in _logged_steps(workdir)))
  for i in targets:
    pair.processes[i].send_signal(signal.SIGTERM)
  statuses = pair.wait(timeout=120)
  outputs = [pair.output(i) for i in range(2)]
  assert statuses == [128 + signal.SIGTERM] * 2, "\n".join(o[-3000:] for o in outputs)
  saved = max(_complete_steps(workdir))
  for output in outputs:
    assert "Traceback" not in output, output[-3000:]
    assert f"saved a checkpoint at step {saved}; exiting" in output, output[-3000:]
  assert start + 2 <= saved < TOTAL_STEPS
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released
  return saved


def test_sigterm_to_one_or_both_processes_saves_one_step_and_resumes_exactly(
  config_file, reference, tmp_path
):
  """SIGTERM to process 1 only (not the coordinator), then to both (a TPU VM maintenance event): both
  processes save the same step and exit with 143; the restarted pair ends as the uninterrupted run."""
  workdir = tmp_path / "run"
  first = _preempt(config_file, workdir, str(tmp_path / "term1"), targets=[1])
  second = _preempt(config_file, workdir, str(tmp_path / "term_both"), targets=[0, 1])
  assert second > first
  outputs = _run_to_the_end(config_file, workdir, str(tmp_path / "rest"))
  assert f"Resumed finetune from step {second}" in outputs[0]
  _assert_same_final_state(workdir, reference)


def _kill_one(config_file, workdir, log_prefix, victim) -> tuple[str, int, float]:
  """SIGKILL ``victim`` once a checkpoint two steps past the start is complete (one every 2 steps)."""
  start = max(_complete_steps(workdir), default=0)
  pair = _main_pair(config_file, workdir, log_prefix, "--config.checkpoint_every_steps=2")
  pair.wait_for(lambda: max(_complete_steps(workdir), default=0) >= start + 2)
  pair.processes[victim].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  survivor = pair.processes[1 - victim]
  survivor.wait(timeout=PEER_TIMEOUT + 60)
  seconds = time.monotonic() - killed_at
  pair.wait()
  _logged_steps(workdir)  # every line parses after the kill
  return pair.output(1 - victim), survivor.returncode, seconds


def test_a_lost_peer_ends_the_survivor_naming_it_and_the_restart_resumes(config_file, reference, tmp_path):
  """SIGKILL of process 1: process 0 exits with status 1 within the peer timeout, naming process 1.
  SIGKILL of process 0 (the coordinator): JAX aborts process 1 at once, naming the lost leader. Each
  restart resumes from the last complete checkpoint and the run ends as the uninterrupted one."""
  workdir = tmp_path / "run"
  output, status, seconds = _kill_one(config_file, workdir, str(tmp_path / "kill1"), victim=1)
  errors = [line for line in output.splitlines() if line.startswith("error: ")]
  assert status == peers.EXIT_STATUS and errors, output[-3000:]
  assert errors[-1].startswith("error: process 0 of 2 lost process 1 (") and "pid " in errors[-1]
  assert f"no sign of life for {PEER_TIMEOUT} s (L2VIT_PEER_TIMEOUT_SECONDS)" in errors[-1]
  assert seconds < PEER_TIMEOUT + 30, seconds  # the watchdog's timeout, plus slack on busy cores
  print(f"survivor of a lost process 1 exited after {seconds:.1f} s: {errors[-1]}")

  for victim, log in ((0, "kill0"), (None, "rest")):
    last_complete = max(_complete_steps(workdir))
    if victim is None:
      outputs = _run_to_the_end(config_file, workdir, str(tmp_path / log))
    else:
      output, status, seconds = _kill_one(config_file, workdir, str(tmp_path / log), victim=victim)
      outputs = [output]
      assert status not in (0, None) and "leader task" in output, output[-3000:]
      print(f"survivor of a lost coordinator exited with status {status} after {seconds:.1f} s")
    assert f"Resumed finetune from step {last_complete}" in outputs[0], outputs[0][-3000:]
  _assert_same_final_state(workdir, reference)


# A process of a two-process run that reports, from JAX's exit handler, whether the peer watchdog's
# thread is still alive when the distributed client shuts down. The coordinator finishes a second
# later, so process 1 sits at the exit while its peer still works (as at the end of a training run).
_EXIT_REPORTER = """
import sys, threading, time
import jax
from jax._src import distributed as jax_distributed
from l2vit_jax.runtime import distributed, peers
distributed.initialize()
shutdown = jax_distributed.global_state.shutdown
def reporting_shutdown():
  alive = any(thread.name == "peer_watchdog" for thread in threading.enumerate())
  print(f"peer watchdog alive at JAX's shutdown: {alive}", flush=True)
  shutdown()
jax_distributed.global_state.shutdown = reporting_shutdown
if jax.process_index() == 0:
  time.sleep(1.0)
peers.mark_exiting()  # as main.py's last step
"""


def test_the_peer_watchdog_has_stopped_when_jax_shuts_its_client_down(tmp_path):
  """A watchdog call into JAX's C++ client (the GIL released) that returns while Python finalizes makes
  the thread pthread_exit inside nanobind's noexcept frame: SIGABRT, ``FATAL: exception not
  rethrown``, after all the work was done (issue 31). So the watchdog must be over by then."""
  pair = Pair(str(tmp_path / "exit"), "-c", _EXIT_REPORTER)
  statuses = pair.wait(timeout=120)
  outputs = [pair.output(i) for i in range(2)]
  assert statuses == [0, 0], "\n".join(o[-3000:] for o in outputs)
  for output in outputs:
    assert "peer watchdog alive at JAX's shutdown: False" in output, output[-3000:]


class _KeyValueStore:
  """The two calls the watchdog makes on JAX's client, on a dict."""

  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value, allow_overwrite=False):  # pylint: disable=unused-argument
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(key, value) for key, value in self.values.items() if key.startswith(prefix)]


def _watchdog_of_process_0(peer_exiting: bool) -> tuple[peers.PeerWatchdog, _KeyValueStore]:
  store = _KeyValueStore()
  store.key_value_set("l2vit/peers/1", json.dumps({"host": "h", "pid": 1, "exiting": peer_exiting}))
  watchdog = peers.PeerWatchdog(store, 0, 2, timeout=100.0)  # polls every 5 s while at work
  watchdog.start()
  return watchdog, store


def _watchdog_threads() -> list[threading.Thread]:
  return [thread for thread in threading.enumerate() if thread.name == "peer_watchdog"]


def test_a_finishing_process_watches_until_its_peer_finishes_then_stops_its_watchdog():
  watchdog, store = _watchdog_of_process_0(peer_exiting=False)
  finishing = threading.Thread(target=watchdog.finish, args=(60.0,))
  finishing.start()
  finishing.join(1.0)
  assert finishing.is_alive()  # process 1 is still at work: keep watching it
  store.key_value_set("l2vit/peers/1", json.dumps({"host": "h", "pid": 1, "exiting": True}))
  finishing.join(5.0)  # the next look, EXIT_POLL_SECONDS later, not the 5 s poll of a working process
  assert not finishing.is_alive() and not _watchdog_threads()
  assert json.loads(store.values["l2vit/peers/0"])["exiting"]


def test_a_peer_still_at_work_delays_the_exit_by_at_most_the_given_wait():
  watchdog, _ = _watchdog_of_process_0(peer_exiting=False)
  started = time.monotonic()
  watchdog.finish(0.5)
  assert 0.5 <= time.monotonic() - started < 5.0 and not _watchdog_threads()


def test_metrics_log_is_never_torn_by_a_kill(tmp_path):
  """SIGKILL of a process writing ``metrics.jsonl`` as fast as it can, at random moments: every line
  of what is left parses, and a log torn by an older (appending) version is repaired on open."""
  path = tmp_path / "metrics.jsonl"
  writer_code = (
    "import os, sys\nfrom l2vit_jax.training import metrics_log\n"
    "writer = metrics_log.MetricWriter(sys.argv[1], tensorboard=False)\n"
    "log = os.path.join(sys.argv[1], 'metrics.jsonl')\n"
    "start = len(open(log).readlines()) if os.path.exists(log) else 0\n"
    "print('ready', flush=True)\n"
    "for step in range(start + 1, 10**9):\n"
    "  writer.write(step, {'train/loss': 1.0 / step, 'note': 'x' * 20000})\n"
  )
  # A line longer than Python's 8 KiB file buffer leaves in several write() calls: the appending writer
  # of earlier versions, killed between two of them, left a torn last line in 6 of 20 such kills.
  rng = np.random.default_rng(0)
  for _ in range(6):
    process = subprocess.Popen(
      [sys.executable, "-c", writer_code, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "ready\n"
    time.sleep(rng.uniform(0.05, 0.3))
    process.kill()
    process.wait()
    process.stdout.close()
    steps = _logged_steps(tmp_path)  # raises on a torn line
    assert steps == list(range(1, len(steps) + 1)), steps[-5:]  # none lost or repeated

  with open(path, "a") as f:
    f.write('{"step": 99999, "train/lo')  # what an interrupted append used to leave
  writer = metrics_log.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(100000, {"train/loss": 0.5})
  steps = _logged_steps(tmp_path)
  assert 99999 not in steps and steps[-1] == 100000
