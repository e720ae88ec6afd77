"""The quickstart as two processes on 127.0.0.1 (the hosts of a TPU slice in miniature): every process
generates or finds the jet files, and a generation failure on any process stops all of them with the
same line (``experiments.stages.data_files``).

Two CPU processes with gloo collectives and JAX's coordination service on a free port, as in
``tests/test_train.py`` and ``tests/test_multiprocess_faults.py``.
"""

import os
import sys

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, run_two_processes
from l2vit_jax import errors
from l2vit_jax.data import synthetic
from l2vit_jax.experiments import stages
from l2vit_jax.runtime import peers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
  os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS, **{peers.TIMEOUT_VARIABLE: "30"}
)
# 25 × 25 images, one block, synthetic jets, one epoch per stage in global batches of 16 (8 per
# process), no physics baseline: the whole quickstart in about a minute and a half on 2 CPU cores.
TINY = [
  "--config.model.img_size=25",
  "--config.model.depth=1",
  "--config.generate.generator=synthetic",
  "--config.generate.num_labelled=80",
  "--config.generate.num_unlabelled=64",
  "--config.pretrain_simclr.num_epochs=1",
  "--config.finetune.num_epochs=1",
  "--config.scratch.num_epochs=1",
  "--config.pretrain_simclr.batch_size=16",
  "--config.finetune.batch_size=16",
  "--config.scratch.batch_size=16",
  "--config.eval_batch_size=20",
  "--config.bootstrap_samples=10",
  "--config.tensorboard=False",
  "--config.physics_baseline=False",
  "--config.online_probe.num_train=32",
  "--config.online_probe.num_val=16",
]


def _run_two_processes(tmp_path, workdir, *flags) -> list[tuple[int, str]]:
  """Runs the quickstart as processes 0 and 1 of one run; (exit status, output) of each."""
  argv = [
    sys.executable,
    "-m",
    "l2vit_jax.main",
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    *TINY,
    *flags,
  ]
  return run_two_processes(argv, ENV, tmp_path, cwd=REPO)


def test_the_quickstart_as_two_processes_finishes_in_both_with_one_report(tmp_path):
  workdir = tmp_path / "run"
  (status0, output0), (status1, output1) = _run_two_processes(tmp_path, workdir)
  assert status0 == 0, output0[-3000:]
  assert status1 == 0, output1[-3000:]
  assert output0.count("Quickstart done.") == 1 and "Quickstart done." not in output1
  assert (workdir / "report" / "report.md").exists()
  assert sorted(os.listdir(workdir / "data")) == ["synthetic_labelled.h5", "synthetic_unlabelled.h5"]


def test_two_processes_refuse_data_made_with_other_settings_with_the_same_line(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "data").mkdir(parents=True)
  synthetic.write_synthetic_hdf5(str(workdir / "data" / "synthetic_labelled.h5"), 40, image_size=25)
  results = _run_two_processes(tmp_path, workdir)
  lines = [[line for line in output.splitlines() if line.startswith("error: ")] for _, output in results]
  assert [status for status, _ in results] == [1, 1], results[0][1][-3000:]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert "synthetic_labelled.h5" in lines[0][0] and "generate.num_labelled" in lines[0][0]


class _FakeMultihost:
  """``multihost_utils.process_allgather`` of a 2-process run seen from process 0: process 1's rows
  are ``other``'s (None: it succeeded)."""

  def __init__(self, other: str | None):
    self.other = other

  def process_allgather(self, row):
    theirs = np.zeros_like(row)
    if self.other is not None:
      theirs[:] = stages.encode_outcome(errors.DataError(self.other))
    return np.stack([row, theirs])


def test_a_generation_failure_on_another_process_stops_this_one_with_its_line(monkeypatch, tmp_path):
  """Process 0 generated its files; process 1 (another host, its own disk) failed: process 0 stops too,
  with process 1's line, instead of going on to train alone."""
  monkeypatch.setattr(stages.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
    stages, "multihost_utils", _FakeMultihost("/disk/data/synthetic_labelled.h5: No space left on device")
  )
  with pytest.raises(errors.DataError) as error:
    stages.agree_on_outcome(None)
  assert str(error.value) == ("/disk/data/synthetic_labelled.h5: No space left on device (process 1 of 2)")
  monkeypatch.setattr(stages, "multihost_utils", _FakeMultihost(None))
  stages.agree_on_outcome(None)  # every process succeeded
