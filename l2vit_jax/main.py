"""Entry point: parses flags, sets up the platform, dispatches on ``config.task``.

  python -m l2vit_jax.main --config=configs/simclr.py --workdir=runs/simclr [--config.batch_size=32]

Bad flags, configs, input files and workdirs fail before any work with one line on stderr
(``error: ...``, no traceback) and a non-zero exit status; nothing is written into the workdir.
A preempted run (SIGTERM, or Ctrl-C) saves a checkpoint and exits with 128 + the signal number.

Around every run: JAX is kept off libtpu where there is no TPU (``process_setup.configure_platforms``), XLA's
persistent compilation cache is on (``config.compilation_cache``; the log's last lines say how many
compilations it served), training writes TensorBoard events to ``WORKDIR/tensorboard/`` and tasks that
write a ``report.md`` get its figures as TensorBoard images beside it (``config.tensorboard``).
"""

import importlib
import sys
import warnings

from l2vit_jax.runtime import process_setup

process_setup.configure_xla_flags()  # before JAX starts a backend: XLA reads XLA_FLAGS only once
process_setup.configure_allocator()  # before any thread starts: a thread keeps its first malloc arena
process_setup.configure_platforms()  # before `import jax`: it reads JAX_PLATFORMS into its config

import jax  # pylint: disable=wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.runtime import compilation, console, distributed, peers  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports (resumes if it has them).")
config_flags.DEFINE_config_file(
  "config", None, "Training or evaluation configuration file.", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])

# Tasks other than the training recipes (training.recipes.TASKS), and the function each one runs.
OTHER_TASKS = {
  "evaluate": ("l2vit_jax.evaluation.evaluate", "evaluate_checkpoints"),
  "predict": ("l2vit_jax.evaluation.predict", "predict_file"),
  "quickstart": ("l2vit_jax.experiments.quickstart", "run_quickstart"),
  "study": ("l2vit_jax.experiments.study", "run_study"),
}
# Where each of those tasks leaves its report.md, relative to the workdir.
REPORT_DIRS = {"evaluate": "", "predict": "", "quickstart": "report", "study": ""}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with unknown or mistyped ``--config.FIELD`` overrides as one line, exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as error:  # wrong type, missing required flag, unknown flag
    message = str(error)
  except (AttributeError, KeyError) as error:  # ml_collections: no such config field
    field = str(error).strip("\"'")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0].split(".")]
    message = f"{culprits[0] if culprits else '--config.' + field}: the config has no field {field!r}"
  except Exception as error:  # pylint: disable=broad-except  # a config file that fails to load
    message = f"{type(error).__name__}: {error}"
  _fail(f"{message} (see --helpfull)", status=2)


def check_config(config) -> None:
  """The task name, and (training tasks) every field that cannot work, checked before any data is read
  or the workdir is touched.

  Raises:
    errors.ConfigError: naming every offending field, its value and what was expected.
  """
  from l2vit_jax.training import loop, recipes  # pylint: disable=import-outside-toplevel  (imports the models)

  if config.task in recipes.TASKS:
    recipes.check_training_config(config)
    loop.parse_profile_steps(config.get("profile_steps", ""))
  elif config.task not in OTHER_TASKS:
    raise errors.ConfigError(
      f"config.task={config.task!r}: expected one of {sorted(recipes.TASKS) + sorted(OTHER_TASKS)}"
    )


def dispatch(config, workdir: str):
  """Checks ``config`` and runs its task; importable so tests call it without flags."""
  check_config(config)
  if config.task not in OTHER_TASKS:
    from l2vit_jax.training import loop  # pylint: disable=import-outside-toplevel

    return loop.train_and_evaluate(config, workdir)  # it logs the platform once its inputs check out
  module, function = OTHER_TASKS[config.task]
  logging.info(
    "JAX %s on %s: %d process(es), %d local / %d global devices",
    jax.__version__,
    jax.default_backend(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  result = getattr(importlib.import_module(module), function)(config, workdir)
  if config.get("tensorboard", True):
    from l2vit_jax.runtime import paths  # pylint: disable=import-outside-toplevel
    from l2vit_jax.training import metrics_log  # pylint: disable=import-outside-toplevel

    report_dir = REPORT_DIRS[config.task]
    metrics_log.write_report_images(paths.join(workdir, report_dir) if report_dir else workdir)
  return result


def _log_compilations() -> None:
  """The run's last log line: compilations, and how many the persistent cache served."""
  summary = compilation.compile_stats.summary()
  if summary and jax.process_index() == 0:
    logging.info("%s", summary)


def _fail(message: str, status: int = 1):
  """One line on stderr (absl's handler would add a prefix, and a second copy if we also logged it)."""
  print(f"error: {errors.one_line(message)}", file=sys.stderr)
  # An aborted Orbax save (e.g. a full disk) can leave its write coroutines unawaited; Python warns
  # about them at interpreter exit, below the error line the user should read last.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    _fail(
      f"unexpected command-line arguments {argv[1:]}; options are --config, --workdir and "
      "--config.FIELD=value",
      status=2,
    )
  console.quiet_library_logs()
  compilation.enable_compilation_cache(FLAGS.config.get("compilation_cache", "auto"))
  distributed.initialize()
  try:
    dispatch(FLAGS.config, FLAGS.workdir)
    _log_compilations()
  except errors.Preempted as preempted:
    _log_compilations()
    logging.flush()
    sys.exit(preempted.exit_status)
  except errors.UserError as error:  # the error line alone: it may come before any work
    _fail(str(error))
  finally:  # before JAX's final barrier: peers waiting there must not take this process for lost
    peers.mark_exiting()


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
