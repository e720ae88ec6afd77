"""Entry point: parses flags, sets up the platform, dispatches on ``config.task``.

  python -m l2vit_jax.main --config=configs/simclr.py --workdir=runs/simclr [--config.batch_size=32]

Bad flags, configs, input files and workdirs fail before any work with one line on stderr
(``error: ...``, no traceback) and a non-zero exit status; nothing is written into the workdir.
A preempted run (SIGTERM, or Ctrl-C) saves a checkpoint and exits with 128 + the signal number.
"""

import os
import sys
import warnings

from l2vit_jax import platform

platform.configure_xla_flags()  # before JAX starts a backend: XLA reads XLA_FLAGS only once
platform.configure_allocator()  # before any thread starts: a thread keeps its first malloc arena

import jax  # pylint: disable=wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from l2vit_jax import peers  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports (resumes if it has them).")
config_flags.DEFINE_config_file("config", None, "Training or evaluation configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "bad input or setup": reported as one line, never as a traceback.
USER_ERRORS = ("DataError", "ConfigError", "CheckpointMismatchError", "CheckpointImportError",
               "DivergenceError", "WorkdirLockedError", "FileNotFoundError",
               "CheckpointDamagedError", "CheckpointSaveError")
OTHER_TASKS = ("evaluate", "pipeline", "study")
# The file each training task reads, so an empty path is reported by its config key.
TASK_INPUT_KEYS = {"simclr": "data.unlabelled_path", "mae": "data.unlabelled_path",
                   "finetune": "data.labelled_path"}


class ConfigError(ValueError):
  """A config that cannot work, found before anything runs; the message names every bad field."""


def _training_tasks() -> tuple[str, ...]:
  from l2vit_jax import tasks  # pylint: disable=import-outside-toplevel
  return tuple(sorted(tasks.TASKS))


def check_config(config) -> None:
  """Semantic checks that flag parsing cannot do, before any data is read or the workdir is touched.

  Raises:
    ConfigError: naming every offending field, its value and what was expected.
  """
  training = _training_tasks()
  if config.task not in training + OTHER_TASKS:
    raise ConfigError(f"config.task={config.task!r}: expected one of {list(training + OTHER_TASKS)}")
  if config.task not in training:
    return
  from l2vit_jax.models import l2vit  # pylint: disable=import-outside-toplevel

  problems = []

  def expect(ok: bool, field: str, expected: str) -> None:
    if not ok:
      value = config
      for key in field.split("."):
        value = value.get(key) if value is not None else None
      problems.append(f"{field}={value!r}: expected {expected}")

  devices, processes = jax.device_count(), jax.process_count()
  expect(config.batch_size > 0 and config.batch_size % devices == 0, "batch_size",
         f"a positive multiple of the {devices} device(s)")
  expect(config.eval_batch_size > 0 and config.eval_batch_size % processes == 0, "eval_batch_size",
         f"a positive multiple of the {processes} process(es)")
  expect(config.num_epochs > 0, "num_epochs", "> 0")
  expect(config.log_every_steps > 0, "log_every_steps", "> 0")
  expect(config.checkpoint_every_steps >= 0, "checkpoint_every_steps", ">= 0 (0: every epoch)")
  expect(config.keep_checkpoints > 0, "keep_checkpoints", "> 0")
  expect(config.stop_after_steps >= 0, "stop_after_steps", ">= 0 (0: never)")
  expect(config.early_stopping_patience > 0, "early_stopping_patience", "> 0")
  expect(config.learning_rate > 0, "learning_rate", "> 0")
  expect(config.data.pixel_scale > 0, "data.pixel_scale", "> 0")
  expect(0 < config.data.unlabelled_val_fraction < 1, "data.unlabelled_val_fraction", "in (0, 1)")
  expect(config.model.attention in l2vit.ATTENTION_FNS, "model.attention",
         f"one of {sorted(l2vit.ATTENTION_FNS)}")
  expect(config.model.embed_dim % config.model.num_heads == 0, "model.embed_dim",
         f"a multiple of model.num_heads={config.model.num_heads}")
  expect(config.model.dtype in ("float32", "bfloat16", "float16", None, ""), "model.dtype",
         "'float32', 'bfloat16' or 'float16'")
  input_key = TASK_INPUT_KEYS.get(config.task)
  if input_key:
    expect(bool(config.data.get(input_key.split(".")[1])), input_key, "the path of a jet file (.h5 or .sparse)")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with unknown or mistyped ``--config.FIELD`` overrides as one line, exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as error:  # wrong type, missing required flag, unknown flag
    message = str(error)
  except (AttributeError, KeyError) as error:  # ml_collections: no such config field
    field = str(error).strip("\"'")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0].split(".")]
    message = (f"{culprits[0] if culprits else '--config.' + field}: the config has no field {field!r}")
  except Exception as error:  # pylint: disable=broad-except  # a config file that fails to load
    message = f"{type(error).__name__}: {error}"
  _fail(f"{message} (see --helpfull)", status=2)


class _QuietLibraries(logging.logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run log (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    # The standard library's level: absl's own constants (WARNING = -1) are verbosities, not levelnos.
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


# Set (to 1) on every worker of a Cloud TPU VM slice (scripts/launch_tpu.py does): JAX then finds the
# coordinator, process count and id itself. JAX cannot tell a TPU VM from elsewhere without touching the
# backend, and the call fails outside a cluster, so it is opt-in (big_vision's BV_JAX_INIT pattern).
AUTO_DISTRIBUTED_VARIABLE = "L2VIT_DISTRIBUTED"


def _initialize_distributed() -> None:
  """Multi-host (TPU VM pod slices, multi-node GPU) runs set these; single-host runs skip it.

  A process of a multi-process run that dies ends the others within ``L2VIT_PEER_TIMEOUT_SECONDS``
  (``peers.py``: one ``error: ... lost process N`` line), instead of leaving them in a collective.
  """
  timeouts = dict(heartbeat_timeout_seconds=peers.jax_heartbeat_timeout_seconds())
  if os.environ.get(AUTO_DISTRIBUTED_VARIABLE, "") not in ("", "0"):
    jax.distributed.initialize(**timeouts)
  elif os.environ.get("L2VIT_COORDINATOR_ADDRESS"):
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests)
    jax.distributed.initialize(coordinator_address=os.environ["L2VIT_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["L2VIT_NUM_PROCESSES"]),
                               process_id=int(os.environ["L2VIT_PROCESS_ID"]), **timeouts)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize(**timeouts)
  else:
    return
  peers.start_watchdog()


def dispatch(config, workdir: str):
  """Runs one task; importable so tests and the quickstart call it without flags."""
  if config.task in _training_tasks():
    from l2vit_jax import train  # pylint: disable=import-outside-toplevel
    return train.train_and_evaluate(config, workdir)
  if config.task == "evaluate":
    from l2vit_jax import evaluate  # pylint: disable=import-outside-toplevel
    return evaluate.evaluate_checkpoints(config, workdir)
  if config.task == "pipeline":
    from l2vit_jax import quickstart  # pylint: disable=import-outside-toplevel
    return quickstart.run_pipeline(config, workdir)
  if config.task == "study":
    from l2vit_jax import study  # pylint: disable=import-outside-toplevel
    return study.run_study(config, workdir)
  raise ConfigError(f"config.task={config.task!r}: expected one of "
                    f"{list(_training_tasks() + OTHER_TASKS)}")


def _fail(message: str, status: int = 1):
  """One line on stderr (absl's handler would add a prefix, and a second copy if we also logged it)."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  # An aborted Orbax save (e.g. a full disk) can leave its write coroutines unawaited; Python warns
  # about them at interpreter exit, below the error line the user should read last.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected command-line arguments {argv[1:]}; options are --config, --workdir and "
          "--config.FIELD=value", status=2)
  logging.get_absl_logger().addFilter(_QuietLibraries())
  _initialize_distributed()
  config = FLAGS.config
  try:
    check_config(config)
    if config.task in OTHER_TASKS:  # training logs the platform once its inputs check out
      logging.info("JAX %s on %s: %d process(es), %d local / %d global devices", jax.__version__,
                   jax.default_backend(), jax.process_count(), jax.local_device_count(),
                   jax.device_count())
    dispatch(config, FLAGS.workdir)
  except Exception as error:  # pylint: disable=broad-except
    if type(error).__name__ == "Preempted":
      logging.flush()
      sys.exit(getattr(error, "exit_status", 143))
    if type(error).__name__ not in USER_ERRORS:
      raise
    _fail(str(error))
  finally:  # before JAX's final barrier: peers waiting there must not take this process for lost
    peers.mark_exiting()


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
