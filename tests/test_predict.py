"""Task ``predict`` (``l2vit_jax/evaluation/predict.py``): every jet of a file tagged by a finetuned
checkpoint into one ``predictions.h5``, equal to the evaluation's predictions, in bounded memory,
resumable after a kill, on several processes, and refusing bad input in one line with nothing written.

One tiny finetuned checkpoint (25×25 images, depth 1, dim 32; random weights and BatchNorm statistics,
saved as finetuning saves its best model) and one 80-jet file are shared by the module; the reference
output is one uninterrupted single-process run in chunks of 16 jets (batches of 8).
"""

import json
import os
import signal
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TEST_XLA_FLAGS, run_two_processes, tiny_config, write_jet_file
from l2vit_jax import errors
from l2vit_jax.checkpoint import model_io, workdir_lock
from l2vit_jax.data import hdf5, sources, sparse, split
from l2vit_jax.evaluation import evaluate, predict
from l2vit_jax.models import build
from l2vit_jax.runtime import peers, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
  os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS, **{peers.TIMEOUT_VARIABLE: "30"}
)
NUM_JETS, BATCH, CHUNK = 80, 8, 16  # five chunks of two batches
KEYS = ("index", "prob_top", "mass")

# The command line with the predict task registered (until l2vit_jax/main.py lists it). Each chunk it
# scores is printed as "scoring rows A-B"; with argv[1] = N > 0 the process kills itself (SIGKILL) as
# it starts chunk N + 1, i.e. after N chunks were saved. l2vit_jax.main is imported first: it sets up
# XLA's flags and the platform before JAX is imported.
PREDICT_CLI = (
  "import os, signal, sys\n"
  "from l2vit_jax import main\n"
  "import jax\n"
  "from absl import app\n"
  "from l2vit_jax.evaluation import predict\n"
  "main.OTHER_TASKS.setdefault('predict', ('l2vit_jax.evaluation.predict', 'predict_file'))\n"
  "main.REPORT_DIRS.setdefault('predict', '')\n"
  "kill_after, real, calls = int(sys.argv.pop(1)), predict.score_chunk, [0]\n"
  "def scoring(score, plan, chunk):\n"
  "  calls[0] += 1\n"
  "  if kill_after and calls[0] > kill_after:\n"
  "    os.kill(os.getpid(), signal.SIGKILL)\n"
  "  start, stop = plan.rows(chunk)\n"
  "  print(f'scoring rows {start}-{stop - 1}', flush=True)\n"
  "  return real(score, plan, chunk)\n"
  "predict.score_chunk = scoring\n"
  "sys.argv[0] = 'l2vit_jax.main'\n"
  "jax.config.config_with_absl()\n"
  "app.run(main.main, flags_parser=main._parse_flags)\n"
)


def _randomise(model: nnx.Module) -> None:
  """Random parameters and BatchNorm statistics, so that no prediction is a trivial constant."""
  rng = np.random.default_rng(0)
  nnx.update(
    model,
    jax.tree.map(lambda x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype), nnx.state(model, nnx.Param)),
  )
  nnx.update(
    model,
    jax.tree.map(lambda x: x + rng.uniform(0, 0.5, x.shape).astype(x.dtype), nnx.state(model, nnx.BatchStat)),
  )


def _meta(config, **overrides) -> dict:
  return {
    "task": "finetune",
    "model_config": config.model.to_dict(),
    "pixel_scale": 4.0,
    "mass_mean": 150.0,
    "mass_std": 40.0,
    **overrides,
  }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The finetuned checkpoint, an 80-jet labelled file and the reference output's arrays and attributes."""
  root = tmp_path_factory.mktemp("predict")
  model_config = tiny_config("finetune")
  model = build.build_l2vit(model_config.model.to_dict())
  _randomise(model)
  checkpoint = str(root / "finetuned")
  model_io.save_model_checkpoint(checkpoint, model, _meta(model_config))
  jets = write_jet_file(root / "jets.h5", num=NUM_JETS)
  summary = predict.predict_file(_config(checkpoint, jets), str(root / "reference"))
  arrays, attrs = _read(summary["path"])
  return {
    "root": root,
    "checkpoint": checkpoint,
    "jets": jets,
    "arrays": arrays,
    "attrs": attrs,
    "output": summary["path"],
    "model_config": model_config,
  }


def _config(checkpoint, input_path, *, chunk_size=CHUNK):
  config = tiny_config("predict")
  config.checkpoint = str(checkpoint)
  config.data.input_path = str(input_path)
  config.eval_batch_size = BATCH
  config.chunk_size = chunk_size
  return config


def _read(path) -> tuple[dict, dict]:
  with h5py.File(path, "r") as f:
    return {key: f[key][...] for key in KEYS}, dict(f.attrs)


def _assert_same_predictions(path, reference):
  arrays, _ = _read(path)
  for key in KEYS:
    np.testing.assert_array_equal(arrays[key], reference[key], err_msg=key)


def _cli_args(shared, workdir, *flags):
  return [
    "--config=configs/predict.py",
    f"--workdir={workdir}",
    f"--config.checkpoint={shared['checkpoint']}",
    f"--config.data.input_path={shared['jets']}",
    f"--config.eval_batch_size={BATCH}",
    f"--config.chunk_size={CHUNK}",
    *flags,
  ]


def _cli(shared, workdir, *flags, kill_after=0) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", PREDICT_CLI, str(kill_after), *_cli_args(shared, workdir, *flags)],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )


# --- what it writes --------------------------------------------------------------------------------------


def test_the_predictions_equal_the_evaluations_on_the_same_jets_in_file_order(shared):
  labelled = sources.open_labelled(shared["jets"], split_seed=split.SPLIT_SEED)
  evaluated = evaluate.predict_checkpoint(
    shared["checkpoint"], labelled, np.arange(NUM_JETS), batch_size=BATCH, mesh=sharding.make_mesh()
  )
  arrays = shared["arrays"]
  np.testing.assert_array_equal(arrays["index"], np.arange(NUM_JETS))
  np.testing.assert_array_equal(arrays["prob_top"], evaluated["prob"])
  np.testing.assert_array_equal(arrays["mass"], evaluated["mass_pred"])
  assert arrays["prob_top"].dtype == arrays["mass"].dtype == np.float32
  assert np.ptp(arrays["prob_top"]) > 0.01 and np.ptp(arrays["mass"]) > 1.0  # not a constant


def test_the_output_names_the_checkpoint_and_input_it_came_from_and_nothing_else_is_left(shared):
  attrs = shared["attrs"]
  path, step = model_io.find_model_checkpoint(shared["checkpoint"])
  assert (attrs["checkpoint"], attrs["checkpoint_path"], attrs["checkpoint_step"]) == (
    shared["checkpoint"],
    path,
    step,
  )
  assert attrs["checkpoint_digest"].startswith("sha256:") and len(attrs["checkpoint_digest"]) == 71
  assert (attrs["input_path"], attrs["num_jets"]) == (os.path.abspath(shared["jets"]), NUM_JETS)
  assert json.loads(attrs["fingerprint"])["checkpoint_digest"] == attrs["checkpoint_digest"]
  with h5py.File(shared["output"], "r") as f:
    assert f["mass"].attrs["unit"] == "GeV"
  assert os.listdir(os.path.dirname(shared["output"])) == [predict.PREDICTIONS_FILE]


def test_a_sparse_file_gives_the_predictions_of_its_hdf5_original(shared, tmp_path):
  converted = str(tmp_path / "jets.sparse")
  sparse.convert_hdf5(shared["jets"], converted)
  summary = predict.predict_file(
    _config(shared["checkpoint"], converted, chunk_size=NUM_JETS), str(tmp_path / "out")
  )
  _assert_same_predictions(summary["path"], shared["arrays"])


def test_a_rerun_on_a_complete_output_does_nothing(shared):
  before = os.stat(shared["output"]).st_mtime_ns
  summary = predict.predict_file(
    _config(shared["checkpoint"], shared["jets"]), os.path.dirname(shared["output"])
  )
  assert summary["resumed_jets"] == NUM_JETS
  assert os.stat(shared["output"]).st_mtime_ns == before


def _a_zero_chunk_of_another_run(workdir):
  """The chunk folder of ``workdir`` holding a first chunk of zeros; returns the folder."""
  chunks = workdir / predict.CHUNKS_DIR
  chunks.mkdir(parents=True)
  zeros = np.zeros(CHUNK, np.float32)
  np.savez(chunks / "chunk-000000.npz", index=np.arange(CHUNK), prob_top=zeros, mass=zeros)
  return chunks


def test_chunks_left_by_a_run_on_another_input_are_not_reused(shared, tmp_path, caplog):
  workdir = tmp_path / "out"
  chunks = _a_zero_chunk_of_another_run(workdir)
  (chunks / predict.MANIFEST_FILE).write_text(
    json.dumps({**json.loads(shared["attrs"]["fingerprint"]), "input_bytes": 1})
  )
  summary = predict.predict_file(_config(shared["checkpoint"], shared["jets"]), str(workdir))
  assert summary["resumed_jets"] == 0
  assert "another input_bytes; starting over" in caplog.text
  _assert_same_predictions(summary["path"], shared["arrays"])


def test_chunks_without_a_manifest_are_not_reused(shared, tmp_path):
  """A kill while chunks were removed can leave some without their manifest: another run's, perhaps
  another checkpoint's, so they are cleared rather than taken for this run's."""
  workdir = tmp_path / "out"
  _a_zero_chunk_of_another_run(workdir)
  summary = predict.predict_file(_config(shared["checkpoint"], shared["jets"]), str(workdir))
  assert summary["resumed_jets"] == 0
  _assert_same_predictions(summary["path"], shared["arrays"])


# --- streaming ---------------------------------------------------------------------------------------------

# In a fresh process: a warm-up run on a small file (compiling the forward pass, starting the input
# threads), then the big file; prints the growth of the peak RSS over the big run and the peak of the
# Python/NumPy allocations during it (tracemalloc: the images read, not XLA's buffers).
MEMORY_SCRIPT = """
import json, resource, sys, tracemalloc
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from l2vit_jax.evaluation import predict
checkpoint, small, big, workdir = sys.argv[1:]
config = tiny_config("predict")
config.checkpoint, config.eval_batch_size, config.chunk_size = checkpoint, 16, 4096
def peak_rss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
config.data.input_path = small
predict.predict_file(config, workdir + "/warm-up")
before = peak_rss()
tracemalloc.start()
config.data.input_path = big
predict.predict_file(config, workdir + "/big")
print(json.dumps({{"rss_growth": peak_rss() - before, "traced_peak": tracemalloc.get_traced_memory()[1]}}))
"""


def test_memory_stays_bounded_on_a_file_far_larger_than_a_batch(shared, tmp_path):
  """4,000 jets (80 MB) in batches of 16 (320 kB): measured about 12-20 MB of peak-RSS growth (the
  compiled forward pass of the second run, the allocator) and 4 MB of traced arrays, the same for
  300 MB (docs/predict.md); holding the file would need its 80 MB."""
  small = write_jet_file(tmp_path / "small.h5", num=32, labelled=False)
  big = write_jet_file(tmp_path / "big.h5", num=4000, labelled=False)
  size = os.path.getsize(big)
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      MEMORY_SCRIPT.format(tests=os.path.join(REPO, "tests")),
      shared["checkpoint"],
      small,
      big,
      str(tmp_path),
    ],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  assert measured["traced_peak"] < size / 10, measured
  assert measured["rss_growth"] < size / 3, measured
  with h5py.File(tmp_path / "big" / predict.PREDICTIONS_FILE, "r") as f:
    assert len(f["prob_top"]) == 4000


# --- resuming after a kill ---------------------------------------------------------------------------------


def test_a_rerun_after_a_kill_scores_only_the_missing_chunks_and_writes_the_same_file(shared, tmp_path):
  workdir = tmp_path / "out"
  killed = _cli(shared, workdir, kill_after=2)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (workdir / predict.PREDICTIONS_FILE).exists()
  assert sorted(os.listdir(workdir / predict.CHUNKS_DIR)) == [
    "chunk-000000.npz",
    "chunk-000001.npz",
    predict.MANIFEST_FILE,
  ]
  rerun = _cli(shared, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.split("\n")[:3] == ["scoring rows 32-47", "scoring rows 48-63", "scoring rows 64-79"]
  assert "2 of 5 chunks (32 of 80 jets) were tagged by an earlier run; resuming" in rerun.stderr
  assert "predict: 48 jet(s) in" in rerun.stderr
  _assert_same_predictions(workdir / predict.PREDICTIONS_FILE, shared["arrays"])
  assert _read(workdir / predict.PREDICTIONS_FILE)[1]["fingerprint"] == shared["attrs"]["fingerprint"]
  assert os.listdir(workdir) == [predict.PREDICTIONS_FILE]  # no chunks, no lock


# --- several processes -------------------------------------------------------------------------------------


def test_two_processes_of_two_devices_each_write_one_file_equal_to_one_process(shared, tmp_path):
  workdir = tmp_path / "out"
  env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}")
  results = run_two_processes(
    [sys.executable, "-c", PREDICT_CLI, "0", *_cli_args(shared, workdir)],
    env,
    tmp_path,
    timeout=300,
    cwd=REPO,
  )
  for status, output in results:
    assert status == 0, output[-3000:]
  assert "4 global devices" in results[0][1]
  assert os.listdir(workdir) == [predict.PREDICTIONS_FILE]
  arrays, attrs = _read(workdir / predict.PREDICTIONS_FILE)
  np.testing.assert_array_equal(arrays["index"], shared["arrays"]["index"])
  # Two images per device instead of eight: XLA may round the last bit otherwise.
  np.testing.assert_allclose(arrays["prob_top"], shared["arrays"]["prob_top"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(arrays["mass"], shared["arrays"]["mass"], rtol=1e-6, atol=0)
  assert attrs["fingerprint"] == shared["attrs"]["fingerprint"]


# --- bad input ---------------------------------------------------------------------------------------------


def _nan_outside_the_validated_sample(tmp_path) -> tuple[str, int]:
  """A 100-jet file with one NaN pixel in an image ``validate_file`` does not read, in the second
  chunk: the first is saved before the NaN is met."""
  unread = np.setdiff1d(np.arange(100), hdf5.value_sample_indices(100, hdf5.DEFAULT_VALUE_SAMPLE))
  row = int(unread[unread >= CHUNK][0])
  jet = np.zeros((100, 25, 25, 8), np.float32)
  jet[row, 3, 4, 5] = np.nan
  return write_jet_file(tmp_path / "nan_late.h5", num=100, labelled=False, overrides={"jet": jet}), row


def _bad_inputs(shared, tmp_path, case):
  """(checkpoint, input file, expected error type, expected message pattern) of one bad input."""
  checkpoint, jets = shared["checkpoint"], shared["jets"]
  if case == "wrong image size":
    jets = write_jet_file(tmp_path / "big_images.h5", num=8, size=30)
    return (
      checkpoint,
      jets,
      errors.DataError,
      (rf"^{jets}: key 'jet': expected shape \(N, 25, 25, 8\) float32, found \(8, 30, 30, 8\)$"),
    )
  if case == "NaN pixel in the validated sample":
    jet = np.zeros((8, 25, 25, 8), np.float32)
    jet[3, 0, 0, 0] = np.nan
    jets = write_jet_file(tmp_path / "nan.h5", num=8, overrides={"jet": jet})
    return (
      checkpoint,
      jets,
      errors.DataError,
      (rf"^{jets}: key 'jet': expected finite pixels, found NaN/Inf in image 3$"),
    )
  if case == "NaN pixel outside the validated sample":
    jets, row = _nan_outside_the_validated_sample(tmp_path)
    return (
      checkpoint,
      jets,
      errors.DataError,
      (rf"^{jets}: key 'jet': expected finite pixels, found NaN/Inf in image {row}$"),
    )
  if case == "not an HDF5 file":
    jets = str(tmp_path / "page.h5")
    with open(jets, "w") as f:
      f.write("<html>404 Not Found</html>\n")
    return checkpoint, jets, errors.DataError, rf"^{jets}: not an HDF5 file \(no HDF5 signature"
  if case == "pretraining checkpoint":
    checkpoint = str(tmp_path / "simclr")
    model = build.build_l2vit(shared["model_config"].model.to_dict())
    model_io.save_model_checkpoint(
      checkpoint, model, _meta(shared["model_config"], task="simclr", mass_mean=None, mass_std=None)
    )
    return (
      checkpoint,
      jets,
      errors.CheckpointMismatchError,
      (
        rf"^{checkpoint}: a pretraining \(SimCLR/MAE\) checkpoint has no class or mass head; expected a "
        "finetuned workdir"
      ),
    )
  assert case == "no checkpoint"
  checkpoint = str(tmp_path / "empty")
  os.makedirs(checkpoint)
  return checkpoint, jets, errors.MissingCheckpointError, rf"^{checkpoint}: no Orbax checkpoint found"


@pytest.mark.parametrize(
  "case",
  [
    "wrong image size",
    "NaN pixel in the validated sample",
    "NaN pixel outside the validated sample",
    "not an HDF5 file",
    "pretraining checkpoint",
    "no checkpoint",
  ],
)
def test_bad_input_is_refused_in_one_line_naming_the_file_and_writes_nothing(shared, tmp_path, case):
  checkpoint, jets, error_type, pattern = _bad_inputs(shared, tmp_path, case)
  workdir = tmp_path / "out"
  with pytest.raises(error_type, match=pattern) as refused:
    predict.predict_file(_config(checkpoint, jets), str(workdir))
  assert "\n" not in str(refused.value)
  assert not workdir.exists()


def test_settings_that_cannot_work_are_refused_together_before_anything_is_read(shared, tmp_path):
  config = _config(shared["checkpoint"], "", chunk_size=0)
  config.eval_batch_size = -8
  with pytest.raises(
    errors.ConfigError,
    match=r"^config.data.input_path is empty; .*; config.chunk_size=0: "
    r"expected a positive number of jets; config.eval_batch_size=-8: expected a positive "
    r"multiple of the 1 device\(s\)$",
  ):
    predict.predict_file(config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_bad_input_on_the_command_line_is_one_error_line_and_exit_status_1(shared, tmp_path):
  jets = str(tmp_path / "page.h5")
  with open(jets, "w") as f:
    f.write("<html>404 Not Found</html>\n")
  workdir = tmp_path / "out"
  result = _cli({**shared, "jets": jets}, workdir)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {jets}: not an HDF5 file")
  assert not workdir.exists()


def test_a_second_run_on_a_locked_workdir_is_refused_and_writes_nothing(shared, tmp_path):
  workdir = tmp_path / "out"
  workdir.mkdir()
  with workdir_lock.WorkdirLock(str(workdir)):  # a live run of this process holds it
    with pytest.raises(errors.WorkdirLockedError):
      predict.predict_file(_config(shared["checkpoint"], shared["jets"]), str(workdir))
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
