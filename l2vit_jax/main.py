"""Entry point: parses flags, sets up the platform, dispatches on ``config.task``.

  python -m l2vit_jax.main --config=configs/simclr.py --workdir=runs/simclr [--config.batch_size=32]
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports (resumes if it has them).")
config_flags.DEFINE_config_file("config", None, "Training or evaluation configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "bad input or setup": reported as one line, never as a traceback.
USER_ERRORS = ("DataError", "CheckpointMismatchError", "CheckpointImportError", "DivergenceError",
               "FileNotFoundError")


class _QuietLibraries(logging.logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _initialize_distributed() -> None:
  """Multi-host (TPU VM pod slices, multi-node GPU) runs set these; single-host runs skip it."""
  if os.environ.get("L2VIT_COORDINATOR_ADDRESS"):
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests)
    jax.distributed.initialize(coordinator_address=os.environ["L2VIT_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["L2VIT_NUM_PROCESSES"]),
                               process_id=int(os.environ["L2VIT_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def dispatch(config, workdir: str):
  """Runs one task; importable so tests and the quickstart call it without flags."""
  if config.task in ("simclr", "finetune"):
    from l2vit_jax import train  # pylint: disable=import-outside-toplevel
    return train.train_and_evaluate(config, workdir)
  if config.task == "evaluate":
    from l2vit_jax import evaluate  # pylint: disable=import-outside-toplevel
    return evaluate.evaluate_checkpoints(config, workdir)
  if config.task == "pipeline":
    from l2vit_jax import quickstart  # pylint: disable=import-outside-toplevel
    return quickstart.run_pipeline(config, workdir)
  raise ValueError(f"unknown config.task {config.task!r}; use simclr, finetune, evaluate or pipeline")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  _initialize_distributed()
  logging.info("JAX %s on %s: %d process(es), %d local / %d global devices", jax.__version__,
               jax.default_backend(), jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    dispatch(FLAGS.config, FLAGS.workdir)
  except Exception as error:  # pylint: disable=broad-except
    if type(error).__name__ not in USER_ERRORS:
      raise
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
