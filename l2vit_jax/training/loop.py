"""One training loop for every recipe (SimCLR and masked-image pretraining, finetuning, scratch), over a
device mesh: resume, validation, early stopping, checkpoints and the metrics log.

The loop only runs what ``recipes.build_task`` describes and the jitted steps ``steps.build_steps``
makes; it knows nothing about SimCLR, MAE or mass regression.
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from l2vit_jax.checkpoint import workdir_lock
from l2vit_jax.checkpoint import naming, train_state
from l2vit_jax.data import device_augment, hdf5, pipeline
from l2vit_jax.errors import (
  CheckpointMismatchError,
  ConfigError,
  DataError,
  DivergenceError,
  Preempted,
  WorkdirLockedError,
)
from l2vit_jax.runtime import compilation, paths, sharding
from l2vit_jax.training import metrics_log, preemption, recipes, steps

SIMCLR_VALIDATION_SEED = 12345  # fixed views, so validation losses are comparable across epochs


# --- loop helpers -----------------------------------------------------------------------------------


def _device_batch(batch: dict, keys: tuple[str, ...], mesh) -> dict:
  return sharding.global_batch({k: batch[k] for k in keys}, mesh)


def _mean_metrics(history: list[dict], prefix: str) -> dict:
  """Means over the steps since the last log; steps skipped as non-finite are left out of them."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  fetched = [m for m in fetched if m["finite"]] or fetched
  return {
    f"{prefix}{k}": float(np.mean([m[k] for m in fetched]))
    for k in fetched[0]
    if k not in ("finite", "skipped")
  }


def validate(eval_step, state: tuple, task: recipes.Task, config, mesh) -> dict:
  """Mean validation metrics; SimCLR uses fixed-seed views, finetuning every example once."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  per_process = config.eval_batch_size // jax.process_count()
  if task.augmentation == "simclr":
    per_process = min(per_process, len(task.val_source) // jax.process_count())
    dataset = pipeline.make_train_dataset(
      task.val_source,
      batch_size=per_process,
      seed=SIMCLR_VALIDATION_SEED,
      augmentation="simclr",
      pixel_scale=config.data.pixel_scale,
      **process,
    )
    num_batches = max(len(task.val_source) // (per_process * jax.process_count()), 1)
    batches = (b for _, b in zip(range(num_batches), dataset))
  else:
    batches = pipeline.make_eval_dataset(
      task.val_source, batch_size=per_process, pixel_scale=config.data.pixel_scale, **process
    )
  keys = steps.eval_batch_keys(task.augmentation, task.batch_keys)
  totals, count = {}, 0.0
  for batch in batches:
    metrics = jax.device_get(eval_step(*state, _device_batch(batch, keys, mesh)))
    weight = float(metrics.pop("count"))
    count += weight
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v) * weight
  return {f"val/{k}": v / max(count, 1.0) for k, v in totals.items()}


def _check_same_architecture(saved_meta: dict, meta: dict, workdir: str) -> None:
  saved, current = saved_meta.get("model_config", {}), meta["model_config"]
  differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if differing or saved_meta.get("task") != meta["task"]:
    details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
    raise CheckpointMismatchError(
      f"{workdir}: existing checkpoint (task {saved_meta.get('task')!r}) does not match this run "
      f"(task {meta['task']!r}){'; ' + details if details else ''}. Use a new --workdir."
    )


# What a checkpoint's input position (Grain's iterator state of every process) depends on, by the
# setting that chooses it: resumed with another value, the saved position cannot be restored.
INPUT_LAYOUT = {
  "worker_count": "config.data.worker_count",
  "process_count": "the number of processes",
  "global_batch_size": "config.batch_size",
}


# What a checkpoint records of the jets its model trained on (the finetuning recipes): resumed on other
# jets, the model would train on a mixture and its checkpoints would vouch for a split it broke.
TRAINING_DATA_KEYS = ("data_split", "train_subset", "train_subset_seed", "train_repeats")


def _training_data(meta: dict) -> dict:
  recorded = {key: meta[key] for key in TRAINING_DATA_KEYS if key in meta}
  if isinstance(recorded.get("data_split"), dict):  # the NumPy version alone changes no jet
    recorded["data_split"] = {k: v for k, v in recorded["data_split"].items() if k != "numpy"}
  return recorded


def _check_same_training_data(saved_meta: dict, meta: dict, workdir: str) -> None:
  """Refuses a resume on other training jets (another labelled file, split seed or label subset)."""
  saved, current = _training_data(saved_meta), _training_data(meta)
  differing = sorted(key for key in saved.keys() & current.keys() if saved[key] != current[key])
  if differing:
    raise CheckpointMismatchError(
      f"{workdir}: this run's training jets differ from those its checkpoints were trained on "
      f"({', '.join(differing)}: config.data.labelled_path, config.data.split_seed or "
      "config.data.train_subset changed); resume with the settings the run was started with, or use a "
      "new --workdir. No checkpoint was changed."
    )


def input_layout(config) -> dict:
  return {
    "worker_count": int(config.data.worker_count),
    "process_count": jax.process_count(),
    "global_batch_size": int(config.batch_size),
  }


def _check_same_input_layout(saved_meta: dict, meta: dict, workdir: str) -> None:
  """Refuses, naming the setting, a resume whose input pipeline cannot take the saved position.
  Checkpoints from before the layout was recorded hold the batch size only; their worker count is
  checked when their position is restored (``TrainingCheckpointer._restore_data``)."""
  saved = saved_meta.get("input_layout")
  if not isinstance(saved, dict):
    saved = {key: saved_meta[key] for key in ("global_batch_size",) if key in saved_meta}
  for key, setting in INPUT_LAYOUT.items():
    if key in saved and saved[key] != meta["input_layout"][key]:
      raise CheckpointMismatchError(
        f"{workdir}: {setting} is {meta['input_layout'][key]}, but this run was started with "
        f"{saved[key]}, and its saved input position (Grain's iterator state) only restores into "
        f"that layout; resume with {saved[key]}, or use a new --workdir. No checkpoint was changed."
      )


def _check_enough_examples(task: recipes.Task, per_process_batch: int) -> None:
  """The training split must fill one batch per process, and validation must see one example each."""
  path = getattr(task.train_source, "path", "training data")
  per_process = len(task.train_source) // jax.process_count()
  if per_process < per_process_batch:
    raise DataError(
      f"{path}: key '{hdf5.IMAGE_KEY}': the training split has {len(task.train_source)} examples "
      f"({per_process} per process), fewer than one batch of {per_process_batch} per process; use a "
      "larger file or a smaller --config.batch_size"
    )
  if len(task.val_source) < jax.process_count():
    raise DataError(
      f"{path}: key '{hdf5.IMAGE_KEY}': the validation split has {len(task.val_source)} examples, "
      f"need at least {jax.process_count()} (one per process); use a larger file"
    )


def write_config(config, workdir: str) -> str:
  """Writes ``WORKDIR/config.json`` (process 0) and returns its text, which TensorBoard shows too."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), text)
  return text


PROFILE_DIR = "profile"


def parse_profile_steps(value) -> tuple[int, int] | None:
  """``config.profile_steps`` as (first, last) step to trace, both included; None when empty (off).

  Steps count from 1, as in ``metrics.jsonl``: ``"10,12"`` traces the 10th to the 12th step; ``"10"``
  is ``"10,10"``. Leave the first few steps out to see the steady state (step 1 includes compilation).

  Raises:
    ConfigError: anything else, naming the value.
  """
  text = str(value if value is not None else "").strip()
  if not text:
    return None
  try:
    steps = [int(part) for part in text.split(",")]
  except ValueError:
    steps = []
  if len(steps) not in (1, 2) or steps[0] < 1 or steps[-1] < steps[0]:
    raise ConfigError(
      f"profile_steps={value!r}: expected 'START,END' (steps to trace, 1 <= START <= END) or '' for none"
    )
  return steps[0], steps[-1]


class StepProfiler:
  """A ``jax.profiler`` trace of steps ``first..last`` in ``WORKDIR/profile/`` (every process traces its
  own host; TensorBoard's profile plugin or XProf opens the folder: ``tensorboard --logdir
  WORKDIR/profile``).

  The trace starts before the first step's batch is fetched, once the step before it has finished, and
  stops once the last step's results are ready, so it holds exactly those steps (input pipeline
  included). A run resumed inside the range traces what is left of it; one stopped inside it (an
  error, a preemption) keeps what was traced (``close``). On ``gs://`` the trace is written locally
  and uploaded when it stops.
  """

  def __init__(self, steps: tuple[int, int] | None, workdir: str):
    self.steps = steps
    self.directory = paths.join(workdir, PROFILE_DIR)
    self._remote = paths.is_remote(workdir)
    self._local = None
    self._first_traced = None

  def before_step(self, step: int, previous_metrics) -> None:
    """Called before step ``step`` (1-based) fetches its batch."""
    if self.steps is None or self._first_traced is not None or not self.steps[0] <= step <= self.steps[1]:
      return
    jax.block_until_ready(previous_metrics)
    self._local = tempfile.mkdtemp(prefix="l2vit-profile-") if self._remote else self.directory
    paths.makedirs(self._local)
    jax.profiler.start_trace(self._local)
    self._first_traced = step

  def after_step(self, step: int, metrics) -> None:
    """Called after step ``step`` was dispatched; stops the trace after the last one."""
    if self._local is not None and step >= self.steps[1]:
      jax.block_until_ready(metrics)
      self._stop(step)

  def close(self, step: int, *, upload: bool = True) -> None:
    if self._local is not None:
      self._stop(step, upload=upload)

  def _stop(self, last_step: int, *, upload: bool = True) -> None:
    jax.profiler.stop_trace()
    local, self._local = self._local, None
    if self._remote and upload:
      for root, _, names in os.walk(local):
        for name in names:
          relative = os.path.relpath(os.path.join(root, name), local).split(os.sep)
          with open(os.path.join(root, name), "rb") as file:
            paths.write_bytes(paths.join(self.directory, *relative), file.read())
    logging.info(
      "Profile of steps %d-%d in %s (open it with: tensorboard --logdir %s)",
      self._first_traced,
      last_step,
      self.directory,
      self.directory,
    )


# --- the loop ---------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.task`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Inputs are validated before the workdir is touched, so a bad file or config leaves no trace. Then
  process 0 locks the workdir (one run per workdir). The loop stops with ``DivergenceError`` on a
  non-finite loss or gradient before anything from that state is saved, and with ``Preempted`` after a
  final checkpoint when SIGTERM/SIGINT arrives; both leave the workdir resumable.

  Returns a summary: final step, best validation loss and its epoch, and whether it stopped early.
  """
  task = recipes.build_task(config)
  mesh = sharding.make_mesh()
  per_process_batch = sharding.check_batch_size(config.batch_size, mesh)
  _check_enough_examples(task, per_process_batch)
  paths.makedirs(workdir)
  lock = workdir_lock.lock_workdir(workdir)
  checkpointer = stop_requests = None
  try:
    checkpointer = train_state.TrainingCheckpointer(workdir, keep=config.keep_checkpoints)
    stop_requests = preemption.StopRequests()
    summary = _train(config, workdir, task, mesh, per_process_batch, checkpointer, stop_requests, lock)
  finally:
    if stop_requests is not None:
      stop_requests.restore()
    try:
      if checkpointer is not None:
        try:  # saves already under way hold good states: let them finish, also when an error stops us
          checkpointer.wait_until_finished()
        finally:
          checkpointer.close()
    finally:  # a save failing here (full disk) must not leave the workdir locked
      if lock is not None:
        lock.release()
  if summary.pop("preempted"):
    raise Preempted(
      f"{workdir}: received {stop_requests.received}; saved a checkpoint at step "
      f"{summary['step']} and stopped. Rerun the same command to resume.",
      exit_status=128 + stop_requests.signum,
    )
  return summary


def _check_lock_held(lock: workdir_lock.WorkdirLock | None, workdir: str, *, confirm: bool = True) -> None:
  """Before every write of the run (metrics rows, the best model, checkpoints): a run that may have
  lost its lock (another run took it over, or may at any moment: this one has not refreshed it for
  longer than the lease, frozen or cut off from the storage) stops without writing anything more, so
  two runs never interleave their writes. ``confirm`` asks the storage too (before checkpoints); else
  the lock's in-memory state decides (every row). Every process learns it together (the writes that
  follow are collective, or process 0's)."""
  holder = (lock.confirm_held() if confirm else lock.check()) if lock is not None else None
  lost = holder is not None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
  if lost:
    raise WorkdirLockedError(
      f"{workdir}: {holder or 'process 0 no longer holds the workdir lock'}; stopped without writing "
      "anything more, so two runs never interleave their writes"
    )


def _train(
  config,
  workdir: str,
  task: recipes.Task,
  mesh,
  per_process_batch: int,
  checkpointer: train_state.TrainingCheckpointer,
  stop_requests: preemption.StopRequests,
  lock: workdir_lock.WorkdirLock | None = None,
) -> dict:
  """The loop proper, in a locked workdir; see ``train_and_evaluate``."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = pipeline.steps_per_epoch(len(task.train_source) // jax.process_count(), per_process_batch)
  total_steps = int(config.num_epochs * steps_per_epoch)
  # .sparse training files ship sparse batches that the step densifies and augments on the device.
  on_device = device_augment.enabled(config.data.get("device_augmentation", "auto"), task.train_source)
  train_dataset = pipeline.make_train_dataset(
    task.train_source,
    batch_size=per_process_batch,
    seed=config.seed,
    augmentation=task.augmentation,
    pixel_scale=config.data.pixel_scale,
    worker_count=config.data.worker_count,
    device_augmentation=on_device,
    **process,
  )
  train_keys = device_augment.batch_keys(task.batch_keys, task.augmentation) if on_device else task.batch_keys
  train_iterator = iter(train_dataset)

  model = task.model
  jitted, (params, batch_stats, other) = steps.build_steps(
    config,
    model,
    task.loss,
    mesh,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    prepare_batch=(
      device_augment.prepare_batch(task.augmentation, task.train_source.image_shape) if on_device else None
    ),
  )
  schedules, tx = jitted.schedules, jitted.tx
  params, batch_stats, other = sharding.replicate((params, batch_stats, other), mesh)
  opt_state = sharding.replicate(tx.init(params), mesh)

  meta = dict(
    task.meta,
    steps_per_epoch=steps_per_epoch,
    global_batch_size=config.batch_size,
    input_layout=input_layout(config),
  )
  early = {
    "best_val_loss": math.inf,
    "best_epoch": -1,
    "epochs_without_improvement": 0,
    "stopped_early": False,
  }
  step = 0
  # The newest checkpoint whose arrays match their digests; damaged ones are set aside with a warning.
  resumed = checkpointer.restore_latest(
    model=naming.named_arrays(params, batch_stats),
    optimizer={"opt_state": opt_state, "step": 0},
    data_iterator=train_iterator,
    check_meta=lambda saved_meta: (
      _check_same_architecture(saved_meta, meta, workdir),
      _check_same_training_data(saved_meta, meta, workdir),
      _check_same_input_layout(saved_meta, meta, workdir),
    ),
  )
  if resumed is not None:
    arrays, optimizer, saved_meta = resumed
    naming.load_model_arrays(model, arrays, context=f"{workdir}: resuming")
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params, batch_stats = sharding.replicate((params, batch_stats), mesh)
    opt_state, step = optimizer["opt_state"], int(optimizer["step"])
    early = saved_meta["early_stopping"]
    logging.info(
      "Resumed %s from step %d (epoch %.2f) in %s", task.name, step, step / steps_per_epoch, workdir
    )
  _check_lock_held(lock, workdir)  # a restore can take minutes: still ours before the first write?
  config_json = write_config(config, workdir)

  skip_nonfinite = bool(config.get("skip_nonfinite_steps", False))
  train_step, eval_step = jitted.train, jitted.eval
  # Rows logged after the step we start from (by a run killed after its last checkpoint, or before
  # its first) are redone: the writer drops them, so every step is logged once.
  writer = metrics_log.MetricWriter(
    workdir, tensorboard=config.get("tensorboard", True), resume_step=step, config_json=config_json
  )
  profiler = StepProfiler(parse_profile_steps(config.get("profile_steps", "")), workdir)
  lock_lost = False
  try:
    progress = metrics_log.Progress(total_steps, step, config.batch_size)
    logging.info(
      "%s: %d steps (%d epochs × %d), global batch %d on %d %s devices / %d processes (JAX %s)",
      task.name,
      total_steps,
      config.num_epochs,
      steps_per_epoch,
      config.batch_size,
      jax.device_count(),
      jax.default_backend(),
      jax.process_count(),
      jax.__version__,
    )

    def save_latest():  # the lock was confirmed before this row's writes
      writer.flush()  # on gs:// the log is rewritten in batches: make it cover this checkpoint
      checkpointer.save(
        step,
        model=naming.named_arrays(params, batch_stats),
        optimizer={"opt_state": opt_state, "step": step},
        meta=dict(meta, early_stopping=early, epoch=step / steps_per_epoch),
        data_iterator=train_iterator,
      )
      if stop_here or preempted or step >= total_steps or early["stopped_early"]:
        # The loop ends after this save: wait for it here, so a failed write (a full disk) stops the
        # loop with CheckpointSaveError and the cleanup after it (lock release) still runs.
        checkpointer.wait_until_finished()

    def check_finite(history):
      fetched = jax.device_get([(m["finite"], m.get("skipped", 0.0)) for m in history])
      first_step = step - len(history) + 1
      skipped = [first_step + i for i, (_, skip) in enumerate(fetched) if skip]
      if skipped:
        logging.warning(
          "Skipped %d step(s) with a non-finite loss or gradient (steps %s); their "
          "updates were discarded (skip_nonfinite_steps=True).",
          len(skipped),
          ", ".join(map(str, skipped[:10])),
        )
        return len(skipped)
      bad = [i for i, (ok, _) in enumerate(fetched) if not ok]
      if bad:
        checkpointer.wait_until_finished()  # so the step named below is complete on disk
        last_good = checkpointer.latest_step()
        raise DivergenceError(
          f"{workdir}: non-finite loss or gradient at step {first_step + bad[0]}; stopped without "
          f"saving that state (last good checkpoint: "
          f"{'none' if last_good is None else f'step {last_good}'}). Lower the learning rate or set "
          "--config.skip_nonfinite_steps=True"
        )
      return 0

    history: list[dict] = []  # metrics since the last log step
    skipped_steps = 0
    preempted = False
    one_step_in_flight = steps.keeps_one_step_in_flight()
    metrics = None
    first_row = True
    with jax.set_mesh(mesh):
      while step < total_steps and not early["stopped_early"]:
        profiler.before_step(step + 1, metrics)
        batch = _device_batch(next(train_iterator), train_keys, mesh)
        if one_step_in_flight:
          jax.block_until_ready(metrics)
        params, batch_stats, opt_state, metrics = train_step(
          params, batch_stats, other, opt_state, jnp.int32(step), batch
        )
        history.append(metrics)
        step += 1
        profiler.after_step(step, metrics)
        end_of_epoch = step % steps_per_epoch == 0
        stop_here = bool(config.stop_after_steps) and step >= config.stop_after_steps
        preempted = stop_requests.requested(step) and step < total_steps
        periodic = bool(config.checkpoint_every_steps) and step % config.checkpoint_every_steps == 0
        saving = end_of_epoch or periodic or stop_here or preempted or step == total_steps
        # A row at every save: the running means since the last row live only in memory, and a run
        # resumed from this checkpoint must not log a row that averages fewer steps than it claims.
        if step % config.log_every_steps == 0 or saving:
          improved = False
          skipped_steps += check_finite(history)  # also before every save: never save a non-finite state
          record = {
            "epoch": step / steps_per_epoch,
            **_mean_metrics(history, "train/"),
            "learning_rate": float(schedules["head"](step - 1)),
            **progress.update(step),
          }
          if skip_nonfinite:
            record["skipped_steps"] = skipped_steps
          if config.backbone_learning_rate is not None:
            record["backbone_learning_rate"] = float(schedules["backbone"](step - 1))
          if end_of_epoch or step == total_steps:
            record.update(validate(eval_step, (params, batch_stats, other), task, config, mesh))
            record["epoch"] = round(step / steps_per_epoch, 6)
            if task.online_probe is not None:  # frozen-feature probes of a pretraining backbone
              record.update(
                task.online_probe(model, (params, batch_stats, other), mesh, epoch=record["epoch"])
              )
            improved = record["val/loss"] < early["best_val_loss"]
            if improved:
              early.update(
                best_val_loss=record["val/loss"], best_epoch=record["epoch"], epochs_without_improvement=0
              )
            else:
              early["epochs_without_improvement"] += 1
            early["stopped_early"] = early["epochs_without_improvement"] >= config.early_stopping_patience
          # Nothing is written unless this run still holds the lock: asked of the storage before a
          # checkpoint (best or latest), of the lock's own state before a plain row.
          try:
            _check_lock_held(lock, workdir, confirm=saving or improved)
          except WorkdirLockedError:
            lock_lost = True  # every process: the check is collective
            raise
          if improved:
            checkpointer.save_best(
              step,
              model=naming.named_arrays(params, batch_stats),
              meta=dict(meta, epoch=record["epoch"], val_loss=record["val/loss"]),
            )
          metrics_log.log_status(step, total_steps, record)
          writer.write(step, record)
          history = []
          if first_row and jax.process_index() == 0 and compilation.compile_stats.summary():
            logging.info("%s (so far)", compilation.compile_stats.summary())  # the train step's compile
          first_row = False
        if saving:
          save_latest()
        if preempted:
          logging.warning(
            "Received %s: saved a checkpoint at step %d; exiting. Rerun the same command to resume.",
            stop_requests.received,
            step,
          )
          break
        if stop_here:
          logging.info("Stopping after step %d as configured (stop_after_steps); rerun to resume.", step)
          break
  finally:
    # A run that lost its lock leaves the files to their new owner: no final flush (on gs:// it would
    # rewrite metrics.jsonl whole over the new owner's rows), no profile upload.
    # lock_lost: every process learnt it at a row; lock.check(): process 0 may know since, when an
    # error between rows (divergence, validation, Ctrl-C) ends the run.
    held = not lock_lost and (lock is None or lock.check() is None)
    try:
      profiler.close(step, upload=held)
    finally:
      writer.close(flush=held)
  if early["stopped_early"]:
    logging.info(
      "Early stopping: no validation improvement for %d epochs (best epoch %s).",
      config.early_stopping_patience,
      early["best_epoch"],
    )
  return {
    "step": step,
    "total_steps": total_steps,
    **early,
    "skipped_steps": skipped_steps,
    "preempted": preempted,
  }
