"""Checkpoint integrity and storage faults, through the real command line (issue 15, items 1 and 2).

One short finetuning run (checkpoints at steps 5, 10 and 15) is trained once; every test damages a
copy of it: bytes flipped in an array file (as a bad disk block or a torn copy would), a full disk
(a size-limited tmpfs, root only) or a file-size limit (unprivileged) during a save.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import TEST_XLA_FLAGS, write_jet_file
from l2vit_jax import models
from l2vit_jax import errors
from l2vit_jax.checkpoint import integrity, model_io, naming, workdir_lock

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
RUN = ("--config.checkpoint_every_steps=5",)  # 5 steps an epoch, 20 in all (num_epochs=4)
# The CLI under a file-size limit; SIGXFSZ ignored so an oversized write fails with EFBIG instead of
# killing the process (set in the child itself: no preexec_fn in a process with threads).
LIMITED_CLI = (
  "import resource, runpy, signal, sys; limit = int(sys.argv.pop(1)); "
  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
  "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
  "sys.argv[0] = 'l2vit_jax.main'; "
  "runpy.run_module('l2vit_jax.main', run_name='__main__', alter_sys=True)"
)


def _write_config(path, task, labelled, **overrides) -> str:
  path.write_text(
    f"from conftest import tiny_config\n\n"
    f"def get_config():\n"
    f"  return tiny_config({task!r}, {str(labelled)!r}, '', **{overrides!r})\n"
  )
  return str(path)


def _cli(config_file, workdir, *flags, prefix=("-m", "l2vit_jax.main")) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *prefix, f"--config={config_file}", f"--workdir={workdir}", *flags],
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _verify(workdir) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "verify_checkpoint.py"), str(workdir)],
    env=ENV,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _all_intact(workdir) -> bool:
  """What ``_verify`` checks, in this process (no start-up cost): every step verifies."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  try:
    import verify_checkpoint  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  checked, damaged, unreadable = verify_checkpoint.verify(str(workdir))
  return checked > 0 and damaged == unreadable == 0


def _error_line(result, *fragments) -> str:
  """Non-zero exit, no traceback, and one ``error:`` line holding ``fragments``, last on stderr."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def _entries(workdir, sub=naming.LATEST_DIR) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, sub)))


def _resumed_from(result) -> int:
  line = next(line for line in result.stderr.splitlines() if "Resumed finetune from step" in line)
  return int(line.split("from step ")[1].split()[0])


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config file, workdir) of a run stopped at step 15 with checkpoints 5, 10, 15 and best/."""
  root = tmp_path_factory.mktemp("integrity")
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
  labelled = write_jet_file(root / "labelled.h5", num=65)
  config_file = _write_config(root / "config.py", "finetune", labelled, num_epochs=4)
  workdir = str(root / "trained")
  result = _cli(config_file, workdir, *RUN, "--config.stop_after_steps=15")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _entries(workdir) == ["10", "15", "5"]
  return {"config": config_file, "workdir": workdir, "labelled": labelled, "root": root}


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(trained["workdir"], copy)
  return copy


# --- damage ---------------------------------------------------------------------------------------------


def _biggest_file(directory) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def flip_bytes(step_dir, count=64) -> str:
  """Inverts ``count`` bytes in the middle of the biggest file under ``step_dir/model``, as the issue
  did (a bad disk block); returns the file."""
  path = _biggest_file(os.path.join(step_dir, "model"))
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
  open(path, "wb").write(bytes(data))
  return path


def _read_params(step_dir) -> dict:
  """The step's parameters as stored, read past every check (a plain Orbax restore)."""
  with ocp.CheckpointManager(
    os.path.dirname(os.path.abspath(step_dir)), options=ocp.CheckpointManagerOptions(read_only=True)
  ) as manager:
    restored = manager.restore(
      int(os.path.basename(step_dir)), args=ocp.args.Composite(model=ocp.args.StandardRestore())
    )
  return {name: np.asarray(value) for name, value in restored["model"]["params"].items()}


def nudge_values(step_dir) -> str:
  """Damage that stays finite: one bit flipped in the biggest array file under ``step_dir/model``, at
  the first position from its middle where the stored parameters still read back and differ from the
  saved ones by less than 1, all finite (chunks are compressed, so which bits qualify is found by
  trying).
  Returns the damaged array's name."""
  original = _read_params(step_dir)
  path = _biggest_file(os.path.join(step_dir, "model"))
  data = bytearray(open(path, "rb").read())
  for offset in range(len(data) // 2, len(data), 101):
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))
    try:
      damaged = _read_params(step_dir)
    except Exception:  # pylint: disable=broad-except  # unreadable: not the damage wanted here
      damaged = original
    changed = [name for name in original if not np.array_equal(original[name], damaged[name])]
    plausible = all(
      np.isfinite(damaged[name]).all() and np.abs(damaged[name] - original[name]).max() < 1.0
      for name in changed
    )
    if changed and plausible:  # weights a training run would go on from without a word
      return f"model/params/{changed[0]}"
    data[offset] ^= 0x01
  open(path, "wb").write(bytes(data))
  raise AssertionError(f"no single-bit flip in {path} kept the values finite")


# --- 1. integrity --------------------------------------------------------------------------------------


def test_damaged_latest_checkpoints_are_set_aside_and_the_run_resumes_from_one_that_verifies(
  trained, workdir
):
  """Step 15: the issue's 64 flipped bytes (non-finite values once read). Step 10: values nudged and
  still finite (before this change training went on from them silently). Both set aside, with one
  warning line each naming the arrays; the run resumes from step 5 and finishes."""
  checkpoints = os.path.join(workdir, naming.LATEST_DIR)
  flip_bytes(os.path.join(checkpoints, "15"))
  nudged = nudge_values(os.path.join(checkpoints, "10"))

  check = _verify(workdir)
  assert check.returncode == 1, check.stdout + check.stderr
  verdicts = dict(line.split(": ", 1) for line in check.stdout.splitlines())
  assert verdicts[os.path.join(checkpoints, "5")].startswith("ok")
  assert (
    verdicts[os.path.join(checkpoints, "10")].startswith("DAMAGED")
    and nudged in verdicts[os.path.join(checkpoints, "10")]
  )
  assert verdicts[os.path.join(checkpoints, "15")].startswith("DAMAGED: 1 array(s) differ")

  result = _cli(trained["config"], workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines() if "damaged checkpoint" in line]
  assert len(warnings) == 2, warnings
  assert "checkpoints/15: damaged checkpoint: 1 array(s) differ from the digests" in warnings[0]
  assert "model/params/" in warnings[0] and "set aside as" in warnings[0]
  assert "checkpoints/10: damaged checkpoint" in warnings[1] and nudged in warnings[1]
  assert _resumed_from(result) == 5
  assert "15.damaged" in _entries(workdir) and "10.damaged" in _entries(workdir)
  assert {"10", "15", "20"} <= set(_entries(workdir))  # redone from step 5
  assert _all_intact(workdir)  # the set-aside steps are listed, not counted


def test_when_no_checkpoint_verifies_the_run_stops_in_one_line(trained, workdir):
  for step in ("5", "10", "15"):
    flip_bytes(os.path.join(workdir, naming.LATEST_DIR, step))
  line = _error_line(
    _cli(trained["config"], workdir, *RUN),
    "checkpoints: no checkpoint verifies",
    "step(s) 15, 10, 5 are damaged and were set aside",
  )
  assert "Resumed" not in line
  assert _entries(workdir) == ["10.damaged", "15.damaged", "5.damaged"]
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_evaluation_and_the_finetune_bridge_refuse_a_damaged_checkpoint(trained, workdir):
  (step,) = _entries(workdir, naming.BEST_DIR)
  best = os.path.join(workdir, naming.BEST_DIR, step)
  nudged = nudge_values(best)
  before = sorted(os.listdir(best))
  evaluate = _write_config(
    trained["root"] / "evaluate.py",
    "evaluate",
    trained["labelled"],
    checkpoints=f"tiny={workdir}",
    physics_baseline=False,
    split="test",
    bootstrap_samples=10,
    report_title="report",
    report_notes="",
  )
  _error_line(_cli(evaluate, str(trained["root"] / "report")), f"{best}: damaged checkpoint", nudged)
  finetune = _cli(trained["config"], str(trained["root"] / "bridge"), f"--config.init_from={workdir}")
  _error_line(finetune, f"{best}: damaged checkpoint", nudged)
  assert sorted(os.listdir(best)) == before  # refused, not set aside: these runs only read it


def test_checkpoints_without_digests_still_load_with_a_warning(trained, workdir, caplog):
  (step,) = _entries(workdir, naming.BEST_DIR)
  meta_file = os.path.join(workdir, naming.BEST_DIR, step, "meta", "metadata")
  meta = json.load(open(meta_file))
  for key in (integrity.DIGESTS, *integrity.WRITTEN_WITH_DIGESTS):
    del meta[key]  # as written before digests (and the fields written since) existed
  json.dump(meta, open(meta_file, "w"))
  arrays, _ = model_io.read_model_checkpoint(workdir)
  assert arrays["params"]
  assert "has no array digests (written before integrity checks)" in caplog.text


def test_imported_weights_carry_digests(tmp_path):
  """``save_model_checkpoint`` (scripts/convert_torch_checkpoint.py) writes digests too."""
  model = models.L2ViT(img_size=25, embed_dim=32, depth=1, num_heads=2, rngs=nnx.Rngs(0))
  model_io.save_model_checkpoint(str(tmp_path), model, {"model_config": {}})
  best = os.path.join(tmp_path, naming.BEST_DIR, "0")
  flip_bytes(best)
  with pytest.raises(errors.CheckpointDamagedError, match=f"{best}: damaged checkpoint"):
    model_io.read_model_checkpoint(str(tmp_path))


# --- 2. storage faults ---------------------------------------------------------------------------------


def _assert_save_failed_cleanly(result, workdir, cause):
  # The run's last step saves the latest state and the best model at once, both asynchronously:
  # whichever write meets the full disk (or the size limit) first is the one the line names.
  error = _error_line(result, f": checkpoint save failed: {cause}")
  named = error.removeprefix("error: ").split(": checkpoint save failed")[0]
  assert named in {os.path.join(workdir, naming.LATEST_DIR), os.path.join(workdir, naming.BEST_DIR)}, error
  complete = [name for name in _entries(workdir) if name.isdigit()]
  assert sorted(complete, key=int) == ["5", "10", "15"]  # nothing half-written taken for step 20
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  assert _all_intact(workdir)  # the earlier checkpoints are intact


def _assert_resumes_after_space_is_freed(trained, workdir):
  result = _cli(trained["config"], workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _resumed_from(result) == 15
  assert [name for name in _entries(workdir) if not name.isdigit()] == []  # leftovers removed
  assert "20" in _entries(workdir)


def test_a_full_disk_during_a_save_stops_in_one_line_and_the_rerun_resumes(trained, tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a size-limited tmpfs needs root; the file-size-limit test covers the rest")
  mount = tmp_path / "disk"
  mount.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    workdir = str(mount / "run")
    shutil.copytree(trained["workdir"], workdir)
    free = shutil.disk_usage(mount).free
    filler = mount / "filler"
    with open(filler, "wb") as f:  # leave 100 KiB: the log fits, a checkpoint (~0.5 MiB) does not
      f.write(b"\0" * (free - 100 * 1024))
    _assert_save_failed_cleanly(
      _cli(trained["config"], workdir, *RUN), workdir, "[Errno 28] No space left on device"
    )
    filler.unlink()
    _assert_resumes_after_space_is_freed(trained, workdir)
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_a_write_error_during_a_save_stops_in_one_line_and_the_rerun_resumes(trained, workdir):
  """Unprivileged: a 40 kB file-size limit (RLIMIT_FSIZE) makes the checkpoint's array files fail
  with EFBIG while the log and config still fit."""
  result = _cli(trained["config"], workdir, *RUN, prefix=("-c", LIMITED_CLI, "40000"))
  _assert_save_failed_cleanly(result, workdir, "[Errno 27] File too large")
  _assert_resumes_after_space_is_freed(trained, workdir)


def test_the_error_line_stays_last_when_an_aborted_save_left_coroutines_unawaited():
  """Seen in CI on a full disk: Orbax left write coroutines unawaited, and Python's warning about
  them at interpreter exit landed below the error line."""
  code = (
    "import atexit\n"
    "from l2vit_jax import main\n"
    "async def write_fragment(): pass\n"
    "pending = [write_fragment()]\n"
    "atexit.register(pending.clear)  # dropped at exit, as Orbax's were\n"
    "main._fail('checkpoint save failed')\n"
  )
  result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == "error: checkpoint save failed", result.stderr


# --- only damage is damage: the storage, changed settings (issue 31) -----------------------------------

# The CLI with Orbax's reads failing in the storage the first ``sys.argv[1]`` times (-1: always), as a
# GCS outage would: ConnectionError, gcsfs's HttpError after its own retries, tensorstore's UNAVAILABLE.
FLAKY_STORAGE_CLI = (
  "import runpy, sys, orbax.checkpoint as ocp; from l2vit_jax.checkpoint import storage; "
  "failures = int(sys.argv.pop(1)); storage.RETRY_SECONDS = 0.0; real = ocp.CheckpointManager.restore; "
  "calls = [0]; error = eval(sys.argv.pop(1))\n"
  "def restore(self, *args, **kwargs):\n"
  "  calls[0] += 1\n"
  "  if failures < 0 or calls[0] <= failures:\n"
  "    raise error\n"
  "  return real(self, *args, **kwargs)\n"
  "ocp.CheckpointManager.restore = restore; sys.argv[0] = 'l2vit_jax.main'; "
  "runpy.run_module('l2vit_jax.main', run_name='__main__', alter_sys=True)"
)


OUTAGE = "ValueError('UNAVAILABLE: Error reading gs://bucket/run: HTTP 503')"


def test_a_storage_error_while_resuming_is_retried_and_sets_nothing_aside(trained, workdir):
  result = _cli(
    trained["config"],
    workdir,
    *RUN,
    "--config.stop_after_steps=16",
    prefix=("-c", FLAKY_STORAGE_CLI, "1", OUTAGE),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reading failed in the storage" in result.stderr and "retrying" in result.stderr
  assert _resumed_from(result) == 15  # the old code set step 15 aside as damaged, resumed from 10
  assert not [entry for entry in _entries(workdir) if "damaged" in entry]


def test_a_storage_that_keeps_failing_stops_the_resume_in_one_line_and_keeps_every_checkpoint(
  trained, workdir
):
  before = _snapshot(workdir)
  result = _cli(trained["config"], workdir, *RUN, prefix=("-c", FLAKY_STORAGE_CLI, "-1", OUTAGE))
  _error_line(
    result, "checkpoints/15: the storage failed 3 reads", "UNAVAILABLE", "nothing was changed or set aside"
  )
  assert _snapshot(workdir) == before  # the old code set all three steps aside


def _snapshot(directory) -> dict:
  """Every file under ``directory`` with its bytes."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as file:
        found[os.path.relpath(os.path.join(root, name), directory)] = file.read()
  return found


def test_resuming_with_another_worker_count_is_refused_naming_the_field(trained, workdir):
  before = _snapshot(workdir)
  result = _cli(trained["config"], workdir, *RUN, "--config.data.worker_count=1")
  _error_line(
    result,
    "config.data.worker_count is 1, but this run was started with 0",
    "resume with 0, or use a new --workdir",
  )
  assert _snapshot(workdir) == before


def test_a_checkpoint_without_its_input_layout_is_still_refused_not_set_aside_for_another_worker_count(
  trained, workdir
):
  """Checkpoints from before the layout was recorded: Grain's state of another worker count does not
  restore (KeyError 'next_index'), which the old code took for damage and set every step aside."""
  for step in _entries(workdir):
    meta_file = os.path.join(workdir, naming.LATEST_DIR, step, "meta", "metadata")
    meta = json.load(open(meta_file))
    del meta["input_layout"]
    json.dump(meta, open(meta_file, "w"))
  before = _snapshot(workdir)
  result = _cli(trained["config"], workdir, *RUN, "--config.data.worker_count=1")
  _error_line(
    result,
    "checkpoints/15/data: the saved input position does not fit this run's input pipeline",
    "config.data.worker_count",
  )
  assert _snapshot(workdir) == before


def test_digests_must_cover_exactly_the_arrays_read():
  """An empty or partial digest set (an edited or truncated meta) verified nothing, or only part."""
  items = {"model": {"a": np.arange(3.0), "b": np.ones(2)}}
  digests = integrity.array_digests(items)
  assert integrity.damaged_arrays(items, {integrity.DIGESTS: digests}) == []
  assert integrity.damaged_arrays(items, {integrity.DIGESTS: {}}) == ["model/a", "model/b"]
  partial = {"model/a": digests["model/a"]}
  assert integrity.damaged_arrays(items, {integrity.DIGESTS: partial}) == ["model/b"]
  extra = dict(digests, **{"model/c": digests["model/a"]})  # a digest whose array is missing
  assert integrity.damaged_arrays(items, {integrity.DIGESTS: extra}) == ["model/c"]
  other_item = dict(digests, **{"optimizer/x": "sha256:0"})  # an item not read: not judged here
  assert integrity.damaged_arrays(items, {integrity.DIGESTS: other_item}) == []
  with pytest.raises(errors.CheckpointDamagedError, match="2 array"):
    integrity.check_restored("here", items, {integrity.DIGESTS: {}})


def _storage_errors():
  import aiohttp  # pylint: disable=import-outside-toplevel
  import gcsfs.retry  # pylint: disable=import-outside-toplevel
  import requests  # pylint: disable=import-outside-toplevel

  return {
    "gcsfs HttpError 503": gcsfs.retry.HttpError({"code": 503, "message": "Service Unavailable"}),
    "gcsfs 403 as a bare OSError": OSError("Forbidden: https://storage.googleapis.com/b/run"),
    "requests ProxyError (a 502)": requests.exceptions.ProxyError("502 Bad Gateway"),
    "aiohttp payload cut short": aiohttp.ClientPayloadError("Response payload is not completed"),
    "tensorstore UNAVAILABLE": ValueError('UNAVAILABLE: Error reading "x" in gs://b/run/15/model: HTTP 503'),
    "tensorstore EIO": ValueError(
      "UNKNOWN: Error reading local file \"/r/15/model/d/0\": Input/output error [os_error_code='5']"
    ),
    "a timeout": TimeoutError("read timed out"),
    "wrapped by Orbax": _wrapped(ConnectionError("reset by peer")),
  }


def _damage_errors():
  return {
    "tensorstore undecodable chunk": ValueError(
      'FAILED_PRECONDITION: Error reading "x": Invalid blosc-compressed data'
    ),
    "tensorstore DATA_LOSS": ValueError('DATA_LOSS: Error reading "x": Checksum mismatch'),
    "a missing file": FileNotFoundError(2, "No such file or directory"),
    "tensorstore NOT_FOUND": ValueError('NOT_FOUND: Error opening "zarr3" driver: metadata missing'),
    "unparsable JSON": json.JSONDecodeError("Expecting value", "{", 1),
    "a status word in a path": ValueError('FAILED_PRECONDITION: Error reading "/runs/CANCELLED/15": bad'),
  }


def _wrapped(cause):
  try:
    try:
      raise cause
    except Exception as error:  # pylint: disable=broad-except
      raise RuntimeError("restore failed") from error
  except RuntimeError as outer:
    return outer


@pytest.mark.parametrize("kind", ["storage", "damage"])
def test_read_errors_of_the_storage_are_told_apart_from_damage(kind):
  """What GCS clients and tensorstore raise for an outage is retried and never sets a step aside;
  what they raise for bytes that do not decode, or a missing file, is damage."""
  from l2vit_jax.checkpoint import storage  # pylint: disable=import-outside-toplevel

  cases = _storage_errors() if kind == "storage" else _damage_errors()
  verdicts = {name: storage.read_failure(error) is not None for name, error in cases.items()}
  assert verdicts == {name: kind == "storage" for name in cases}


def test_a_checkpoint_of_another_optimizer_structure_is_refused_not_set_aside(trained, workdir):
  """As after an optax upgrade that renamed a state field: the old code took every step for damaged
  and set all of them aside."""
  for step in _entries(workdir):
    meta_file = os.path.join(workdir, naming.LATEST_DIR, step, "meta", "metadata")
    meta = json.load(open(meta_file))
    name = next(n for n in meta[integrity.DIGESTS] if n.startswith("optimizer/opt_state/"))
    meta[integrity.DIGESTS][name.rsplit("/", 1)[0] + "/renamed_field"] = meta[integrity.DIGESTS].pop(name)
    json.dump(meta, open(meta_file, "w"))
  before = _snapshot(workdir)
  _error_line(
    _cli(trained["config"], workdir, *RUN),
    "checkpoints/15: holds other arrays than this version",
    "renamed_field",
    "resume with that version, or use a new --workdir",
  )
  assert _snapshot(workdir) == before


def test_resuming_on_another_split_of_the_training_jets_is_refused(trained, workdir):
  before = _snapshot(workdir)
  _error_line(
    _cli(trained["config"], workdir, *RUN, "--config.data.split_seed=7"),
    "training jets differ from those its checkpoints were trained on",
    "data_split",
  )
  assert _snapshot(workdir) == before


def test_a_meta_that_lost_its_digests_but_not_the_fields_written_with_them_is_damaged(trained, workdir):
  (step,) = _entries(workdir, naming.BEST_DIR)
  meta_file = os.path.join(workdir, naming.BEST_DIR, step, "meta", "metadata")
  meta = json.load(open(meta_file))
  del meta[integrity.DIGESTS]  # edited: it would otherwise load unverified
  json.dump(meta, open(meta_file, "w"))
  with pytest.raises(errors.CheckpointDamagedError, match="has no 'digests', yet it was written by"):
    model_io.read_model_checkpoint(workdir)


def test_a_read_that_fails_without_a_sign_of_damage_refuses_the_resume_and_keeps_every_checkpoint(
  trained, workdir
):
  """Out of memory while restoring (or a library's TypeError) says nothing about the files: the old
  code set all three steps aside and the rerun started from step 0."""
  before = _snapshot(workdir)
  result = _cli(trained["config"], workdir, *RUN, prefix=("-c", FLAKY_STORAGE_CLI, "-1", "MemoryError()"))
  _error_line(
    result, "checkpoints/15: checkpoint cannot be read (MemoryError", "no sign of damage", "left in place"
  )
  assert _snapshot(workdir) == before


def test_checkpoints_whose_digests_were_emptied_are_damaged_not_another_structure(trained, workdir):
  for step in _entries(workdir):
    meta_file = os.path.join(workdir, naming.LATEST_DIR, step, "meta", "metadata")
    meta = json.load(open(meta_file))
    meta[integrity.DIGESTS] = {}
    json.dump(meta, open(meta_file, "w"))
  _error_line(
    _cli(trained["config"], workdir, *RUN),
    "checkpoints: no checkpoint verifies",
    "step(s) 15, 10, 5 are damaged",
  )


@pytest.mark.parametrize(
  "error, damaged",
  [
    (ValueError('FAILED_PRECONDITION: Error reading "x": Invalid blosc-compressed data'), True),
    (ValueError('DATA_LOSS: Error reading "x": Checksum mismatch'), True),
    (FileNotFoundError(2, "No such file or directory"), True),
    (json.JSONDecodeError("Expecting value", "{", 1), True),
    (MemoryError(), False),
    (OSError(12, "Cannot allocate memory"), False),
    (TypeError("unexpected keyword argument"), False),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not match"), False),
  ],
)
def test_only_evidence_in_the_bytes_read_counts_as_damage(error, damaged):
  from l2vit_jax.checkpoint import storage  # pylint: disable=import-outside-toplevel

  assert (storage.damage_evidence(_wrapped(error)) is not None) == damaged
