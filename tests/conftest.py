"""Shared test fixtures: small hand-made jet files that follow (or deliberately break) the schema."""

import atexit
import os
import shutil
import tempfile

# The test requirements install libtpu (for the compile-only TPU test), and with it every JAX process
# would try to start a TPU backend, take libtpu's lock file and print warnings before falling back to
# the CPU. Tests and the subprocesses they start run on the CPU; scripts/compile_tpu.py still loads
# libtpu as a compile-only backend under this setting.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's LLVM at -O0 in every JAX process of the suite, this one and the runs it starts (their
# environments add TEST_XLA_FLAGS where they replace XLA_FLAGS): compiling is most of the suite's time on
# 2 cores, and -O0 compiles a third faster, while the programs are too small for slower code to matter.
# Results differ from -O3's in the last bits (FMA contraction); every bit-exact comparison in the suite is
# between runs with the same flags, and the others have tolerances.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# Every l2vit_jax.main run turns XLA's persistent compilation cache on, by default in ~/.cache: tests and
# the runs they start use one folder of their own instead, removed when the session ends.
if "L2VIT_COMPILATION_CACHE" not in os.environ:
  os.environ["L2VIT_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="l2vit-test-xla-")
  atexit.register(shutil.rmtree, os.environ["L2VIT_COMPILATION_CACHE"], ignore_errors=True)

import h5py  # pylint: disable=wrong-import-position
import numpy as np
import pytest


def write_jet_file(path, num=40, size=25, *, labelled=True, seed=0, overrides=None, drop=()):
  """Writes a sparse random jet file; ``overrides`` replaces datasets by key, ``drop`` removes keys."""
  rng = np.random.default_rng(seed)
  jet = np.zeros((num, size, size, 8), np.float32)
  hits = rng.random(jet.shape) < 0.02
  jet[hits] = rng.exponential(5.0, hits.sum()).astype(np.float32)
  arrays = {"jet": jet}
  if labelled:
    labels = (np.arange(num) % 2).astype(np.float32)
    arrays.update(
      Y=labels[:, None],
      m=rng.uniform(50, 300, (num, 1)).astype(np.float32),
      pT=rng.normal(520, 100, (num, 1)).astype(np.float32),
    )
  arrays.update(overrides or {})
  with h5py.File(path, "w") as f:
    for key, value in arrays.items():
      if key not in drop:
        f.create_dataset(key, data=value)
  return str(path)


@pytest.fixture
def jet_file(tmp_path):
  return write_jet_file(tmp_path / "labelled.h5")


def tiny_config(task, labelled_path="", unlabelled_path="", **overrides):
  """A config for a 25×25 image, depth-1, dim-32 model that trains in seconds on 2 CPU cores."""
  from l2vit_jax import config_lib

  config = config_lib.base_config()
  config.task = task
  config.model = config_lib.model_config("tiny")
  config.model.update(img_size=25, depth=1, drop_rate=0.0, drop_path_rate=0.0)
  config.data.labelled_path = str(labelled_path)
  config.data.unlabelled_path = str(unlabelled_path)
  config.data.unlabelled_val_fraction = 0.25
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.warmup_epochs = 1
  config.learning_rate = 1e-3
  config.log_every_steps = 1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = getattr(target, parent)
    setattr(target, leaf, value)
  return config


def randomise_torch_module(module, generator):
  """Random values for every PyTorch parameter and BatchNorm statistic (not the zero-bias init)."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    for name, parameter in module.named_parameters():
      parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
      if name.endswith("temperature") or "norm" in name and name.endswith("weight"):
        parameter.add_(1.0)
    for name, buffer in module.named_buffers():
      if name.endswith("running_mean"):
        buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.5)
      elif name.endswith("running_var"):
        buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
  return module.eval()


def flat_params(model, variable_type=None) -> dict:
  """Named arrays of one variable type (``nnx.Param`` by default), e.g.
  ``{"blocks/0/attn/temperature": (4, 1, 1)}``, as checkpoints name them."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from l2vit_jax.checkpoint import naming  # pylint: disable=import-outside-toplevel

  return naming.flatten_names(nnx.to_pure_dict(nnx.state(model, variable_type or nnx.Param)))


def run_two_processes(argv: list[str], env: dict, log_dir, *, timeout: float = 400, cwd=None) -> list:
  """Runs ``argv`` as processes 0 and 1 of one run, coordinated on 127.0.0.1 at a free port; returns
  (exit status, output) of each. Output goes to files, not pipes: a full pipe would block one process
  at a barrier forever. Both are killed when the first wait times out or the test ends."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  logs = [os.path.join(str(log_dir), f"process{i}.log") for i in range(2)]
  processes = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      coordination = dict(
        L2VIT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", L2VIT_NUM_PROCESSES="2", L2VIT_PROCESS_ID=str(i)
      )
      processes.append(
        subprocess.Popen(argv, env=dict(env, **coordination), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
      )
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      process.kill()
  outputs = []
  for process, log in zip(processes, logs):
    with open(log) as file:
      outputs.append((process.returncode, file.read()))
  return outputs
