"""One training loop for every recipe (SimCLR pretraining, finetuning, scratch), over a device mesh.

The step is a pure function of explicit state ``(params, batch_stats, opt_state)`` jit-compiled once,
with the NNX graph split outside jit and merged inside (DESIGN.md §6). Dropout keys are derived from
(seed, step), so a resumed run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from l2vit_jax import checkpointing, metrics_writer, paths, sharding, tasks
from l2vit_jax import platform as l2vit_platform  # "platform" names a mesh platform string here
from l2vit_jax.data import device_augment, hdf5, pipeline
from l2vit_jax.models import depthwise

SIMCLR_VALIDATION_SEED = 12345  # fixed views, so validation losses are comparable across epochs


class DivergenceError(RuntimeError):
  """Training produced a non-finite loss or gradient; nothing from that state was saved."""


# --- optimiser --------------------------------------------------------------------------------------

def _top_level_name(path) -> str:
  entry = path[0]
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def parameter_groups(params) -> object:
  """'head' for the task heads (classification, regression, SimCLR projector), else 'backbone'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "head" if _top_level_name(path) in tasks.HEAD_NAMES else "backbone", params)


def learning_rate_schedules(config, steps_per_epoch: int, total_steps: int) -> dict[str, optax.Schedule]:
  """Linear warmup then cosine decay to ``end_learning_rate``, per parameter group.

  Warmup starts at peak/warmup_steps rather than 0, so the first step already learns (the original's
  first epoch did not move the model).
  """
  warmup = int(config.warmup_epochs * steps_per_epoch)

  def schedule(peak: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=peak / max(warmup, 1), peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.end_learning_rate)

  backbone = config.backbone_learning_rate
  return {"head": schedule(config.learning_rate),
          "backbone": schedule(config.learning_rate if backbone is None else backbone)}


def make_optimizer(config, schedules: dict[str, optax.Schedule]) -> optax.GradientTransformation:
  def adamw(schedule):
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.multi_transform({g: adamw(s) for g, s in schedules.items()},
                                           parameter_groups))


# --- steps ------------------------------------------------------------------------------------------

def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation,
                    dropout_key: jax.Array, *, skip_nonfinite: bool = False,
                    prepare_batch: Callable | None = None) -> Callable:
  """jit(params, batch_stats, other, opt_state, step, batch) -> new state and metrics (donated).

  ``prepare_batch`` (e.g. ``device_augment.prepare_batch``) turns the shipped batch into the one the
  loss reads, on the device, before anything else.

  With ``skip_nonfinite`` a step whose loss or gradient is not finite returns the state it was given
  (parameters, BatchNorm statistics and optimizer moments untouched) and reports ``skipped=1``;
  otherwise the loop stops on it (``DivergenceError``).
  """

  def train_step(params, batch_stats, other, opt_state, step, batch):
    if prepare_batch is not None:
      batch = prepare_batch(batch)

    def compute_loss(params):
      model = nnx.merge(graphdef, params, batch_stats, other, copy=True)
      nnx.reseed(model, dropout=jax.random.fold_in(dropout_key, step))
      loss, metrics = loss_fn(model, batch)
      return loss, (metrics, nnx.state(model, nnx.BatchStat))

    (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, **metrics, "finite": finite}
    if skip_nonfinite:
      keep_new = lambda new, old: jnp.where(finite, new, old)
      new_params, new_batch_stats, new_opt_state = jax.tree.map(
          keep_new, (new_params, new_batch_stats, new_opt_state), (params, batch_stats, opt_state))
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_params, new_batch_stats, new_opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1, 3))


def make_eval_step(graphdef, loss_fn: Callable) -> Callable:
  def eval_step(params, batch_stats, other, batch):
    model = nnx.merge(graphdef, params, batch_stats, other, copy=True)
    loss, metrics = loss_fn(model, batch)
    count = jnp.sum(batch["mask"]) if "mask" in batch else jnp.float32(next(iter(batch.values())).shape[0])
    return {"loss": loss, **metrics, "count": count}
  return jax.jit(eval_step)


# --- steps for the devices of a mesh ----------------------------------------------------------------

# Key implementation for dropout, drop-path and MAE masks per platform ('auto'); JAX's default
# (threefry) elsewhere, so CPU and GPU runs draw what they always drew. On TPU, threefry's hashing of
# every mask element made compiling the default model's train step take over 10 minutes (XLA's
# RngBitGenerator: 147 s; README "Compile-only TPU checks"). 'rbg' still splits and folds keys with
# threefry, so keys stay a function of (seed, step) and resumes stay exact.
PRNG_IMPL_BY_PLATFORM = {"tpu": "rbg"}


def resolve_prng_impl(name: str, platform: str) -> str | None:
  """The key implementation ``config.prng_impl`` stands for on ``platform`` (None: JAX's default)."""
  return PRNG_IMPL_BY_PLATFORM.get(platform) if name == "auto" else name


def fix_depthwise_implementations(model: nnx.Module, platform: str) -> str:
  """Resolves every 'auto' depthwise formulation in ``model`` for ``platform``, in place.

  Done before the graph is split, so the jitted steps carry the target's choice and never consult
  the host's default backend (which is 'cpu' when compiling for a TPU topology). Returns the
  formulation(s) now in use, comma-separated.
  """
  chosen = set()
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "depthwise_implementation"):
      node.depthwise_implementation = depthwise.resolve_implementation(node.depthwise_implementation,
                                                                       platform)
      chosen.add(node.depthwise_implementation)
  return ",".join(sorted(chosen))


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps of one model for one platform, and what they were built with."""
  train: Callable
  eval: Callable
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]
  platform: str
  depthwise_implementation: str
  prng_impl: str


def build_steps(config, model: nnx.Module, loss_fn: Callable, mesh, *, steps_per_epoch: int,
                total_steps: int, prepare_batch: Callable | None = None) -> tuple[Steps, tuple]:
  """The steps the training loop runs, for the devices of ``mesh`` (also a compile-only TPU mesh).

  Platform-dependent choices follow the mesh's devices, not JAX's default backend: 'auto' depthwise
  formulations are fixed on ``model`` and the dropout key gets ``config.prng_impl``'s implementation.
  The state crossing jit keeps the model's own keys (the step reseeds a copy), so its pytree is the
  same on every step.

  Returns the steps and the model's host-side state ``(params, batch_stats, other)`` split for them.
  """
  platform = sharding.mesh_platform(mesh)
  depthwise_implementation = fix_depthwise_implementations(model, platform)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
  model.train()
  graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  schedules = learning_rate_schedules(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedules)
  dropout_key = jax.random.key(config.seed, impl=resolve_prng_impl(config.get("prng_impl", "auto"),
                                                                   platform))
  train_step = make_train_step(graphdef, loss_fn, tx, dropout_key,
                               skip_nonfinite=bool(config.get("skip_nonfinite_steps", False)),
                               prepare_batch=prepare_batch)
  steps = Steps(train=train_step, eval=make_eval_step(eval_graphdef, loss_fn), tx=tx,
                schedules=schedules, platform=platform,
                depthwise_implementation=depthwise_implementation,
                prng_impl=str(jax.random.key_impl(dropout_key)))
  return steps, (params, batch_stats, other)


def keeps_one_step_in_flight() -> bool:
  """Whether the train loop dispatches a step only after the previous one ended.

  XLA:CPU allocates a step's temporaries (GBs) when the step is dispatched. With freed memory kept
  for reuse (platform.configure_allocator), every step run ahead would keep a block of its own, so
  there the next batch is prepared while a step runs but dispatched after it ends.
  """
  return jax.default_backend() == "cpu" and l2vit_platform.allocator_tuned()


def eval_batch_keys(augmentation: str, batch_keys: tuple[str, ...]) -> tuple[str, ...]:
  """SimCLR validates on fixed-seed views of whole batches; other tasks on padded batches whose
  'mask' flags the padding."""
  return batch_keys if augmentation == "simclr" else batch_keys + ("mask",)


# --- loop helpers -----------------------------------------------------------------------------------

def _device_batch(batch: dict, keys: tuple[str, ...], mesh) -> dict:
  return sharding.global_batch({k: batch[k] for k in keys}, mesh)


def _mean_metrics(history: list[dict], prefix: str) -> dict:
  """Means over the steps since the last log; steps skipped as non-finite are left out of them."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  fetched = [m for m in fetched if m["finite"]] or fetched
  return {f"{prefix}{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]
          if k not in ("finite", "skipped")}


def validate(eval_step, state: tuple, task: tasks.Task, config, mesh) -> dict:
  """Mean validation metrics; SimCLR uses fixed-seed views, finetuning every example once."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  per_process = config.eval_batch_size // jax.process_count()
  if task.augmentation == "simclr":
    per_process = min(per_process, len(task.val_source) // jax.process_count())
    dataset = pipeline.make_train_dataset(task.val_source, batch_size=per_process,
                                          seed=SIMCLR_VALIDATION_SEED, augmentation="simclr",
                                          pixel_scale=config.data.pixel_scale, **process)
    num_batches = max(len(task.val_source) // (per_process * jax.process_count()), 1)
    batches = (b for _, b in zip(range(num_batches), dataset))
  else:
    batches = pipeline.make_eval_dataset(task.val_source, batch_size=per_process,
                                         pixel_scale=config.data.pixel_scale, **process)
  keys = eval_batch_keys(task.augmentation, task.batch_keys)
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
    raise checkpointing.CheckpointMismatchError(
        f"{workdir}: existing checkpoint (task {saved_meta.get('task')!r}) does not match this run "
        f"(task {meta['task']!r}){'; ' + details if details else ''}. Use a new --workdir.")


def _check_enough_examples(task: tasks.Task, per_process_batch: int) -> None:
  """The training split must fill one batch per process, and validation must see one example each."""
  path = getattr(task.train_source, "path", "training data")
  per_process = len(task.train_source) // jax.process_count()
  if per_process < per_process_batch:
    raise hdf5.DataError(
        f"{path}: key '{hdf5.IMAGE_KEY}': the training split has {len(task.train_source)} examples "
        f"({per_process} per process), fewer than one batch of {per_process_batch} per process; use a "
        "larger file or a smaller --config.batch_size")
  if len(task.val_source) < jax.process_count():
    raise hdf5.DataError(
        f"{path}: key '{hdf5.IMAGE_KEY}': the validation split has {len(task.val_source)} examples, "
        f"need at least {jax.process_count()} (one per process); use a larger file")


class Preempted(Exception):
  """SIGTERM/SIGINT (or a multi-host preemption notice) stopped training after a final checkpoint.

  ``exit_status`` is 128 + the signal number (143 for SIGTERM), as if the signal had ended the process,
  so schedulers and retry loops see an unfinished run and restart it, and the restart resumes.
  """

  def __init__(self, message: str, exit_status: int = 128 + signal.SIGTERM):
    super().__init__(message)
    self.exit_status = exit_status


class _StopRequests:
  """Turns SIGTERM and SIGINT into a flag the loop checks at step boundaries (a preemption notice).

  Single-process runs install Python handlers (main thread only). Multi-process runs use JAX's
  preemption sync point instead: its SIGTERM notifier tells every process, and they agree on the step
  at which to save together (a local flag could make one process save while the others train on).
  A second SIGINT falls back to the default (KeyboardInterrupt), for an impatient Ctrl-C.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self.signum = signal.SIGTERM
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.received, self.signum = signal.Signals(signum).name, signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "preemption notice"
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        pass
    return self.received is not None

  def restore(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _lock_workdir(workdir: str) -> checkpointing.WorkdirLock | None:
  """Process 0 takes ``WORKDIR/lock``; every process learns whether it did, so all stop together."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = checkpointing.WorkdirLock(workdir)
    try:
      lock.acquire()
    except checkpointing.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = checkpointing.WorkdirLockedError(
          f"{workdir}: process 0 could not lock this workdir (another run is using it)")
  if error is not None:
    raise error
  return lock


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))


# --- the loop ---------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.task`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Inputs are validated before the workdir is touched, so a bad file or config leaves no trace. Then
  process 0 locks the workdir (one run per workdir). The loop stops with ``DivergenceError`` on a
  non-finite loss or gradient before anything from that state is saved, and with ``Preempted`` after a
  final checkpoint when SIGTERM/SIGINT arrives; both leave the workdir resumable.

  Returns a summary: final step, best validation loss and its epoch, and whether it stopped early.
  """
  task = tasks.build_task(config)
  mesh = sharding.make_mesh()
  per_process_batch = sharding.check_batch_size(config.batch_size, mesh)
  _check_enough_examples(task, per_process_batch)
  paths.makedirs(workdir)
  lock = _lock_workdir(workdir)
  checkpointer = stop_requests = None
  try:
    checkpointer = checkpointing.TrainingCheckpointer(workdir, keep=config.keep_checkpoints)
    stop_requests = _StopRequests()
    summary = _train(config, workdir, task, mesh, per_process_batch, checkpointer, stop_requests)
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
    raise Preempted(f"{workdir}: received {stop_requests.received}; saved a checkpoint at step "
                    f"{summary['step']} and stopped. Rerun the same command to resume.",
                    exit_status=128 + stop_requests.signum)
  return summary


def _train(config, workdir: str, task: tasks.Task, mesh, per_process_batch: int,
           checkpointer: checkpointing.TrainingCheckpointer, stop_requests: _StopRequests) -> dict:
  """The loop proper, in a locked workdir; see ``train_and_evaluate``."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = pipeline.steps_per_epoch(len(task.train_source) // jax.process_count(),
                                             per_process_batch)
  total_steps = int(config.num_epochs * steps_per_epoch)
  # .sparse training files ship sparse batches that the step densifies and augments on the device.
  on_device = device_augment.enabled(config.data.get("device_augmentation", "auto"), task.train_source)
  train_dataset = pipeline.make_train_dataset(
      task.train_source, batch_size=per_process_batch, seed=config.seed,
      augmentation=task.augmentation, pixel_scale=config.data.pixel_scale,
      worker_count=config.data.worker_count, device_augmentation=on_device, **process)
  train_keys = (device_augment.batch_keys(task.batch_keys, task.augmentation) if on_device
                else task.batch_keys)
  train_iterator = iter(train_dataset)

  model = task.model
  steps, (params, batch_stats, other) = build_steps(
      config, model, task.loss, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      prepare_batch=(device_augment.prepare_batch(task.augmentation, task.train_source.image_shape)
                     if on_device else None))
  schedules, tx = steps.schedules, steps.tx
  params, batch_stats, other = sharding.replicate((params, batch_stats, other), mesh)
  opt_state = sharding.replicate(tx.init(params), mesh)

  meta = dict(task.meta, steps_per_epoch=steps_per_epoch, global_batch_size=config.batch_size)
  early = {"best_val_loss": math.inf, "best_epoch": -1, "epochs_without_improvement": 0,
           "stopped_early": False}
  step = 0
  # The newest checkpoint whose arrays match their digests; damaged ones are set aside with a warning.
  resumed = checkpointer.restore_latest(
      model=checkpointing.named_arrays(params, batch_stats),
      optimizer={"opt_state": opt_state, "step": 0}, data_iterator=train_iterator,
      check_meta=lambda saved_meta: _check_same_architecture(saved_meta, meta, workdir))
  if resumed is not None:
    arrays, optimizer, saved_meta = resumed
    checkpointing.load_model_arrays(model, arrays, context=f"{workdir}: resuming")
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params, batch_stats = sharding.replicate((params, batch_stats), mesh)
    opt_state, step = optimizer["opt_state"], int(optimizer["step"])
    early = saved_meta["early_stopping"]
    logging.info("Resumed %s from step %d (epoch %.2f) in %s", task.name, step,
                 step / steps_per_epoch, workdir)
  write_config(config, workdir)

  skip_nonfinite = bool(config.get("skip_nonfinite_steps", False))
  train_step, eval_step = steps.train, steps.eval
  # Rows logged after the step we start from (by a run killed after its last checkpoint, or before
  # its first) are redone: the writer drops them, so every step is logged once.
  writer = metrics_writer.MetricWriter(workdir, tensorboard=config.tensorboard, resume_step=step)
  try:
    progress = metrics_writer.Progress(total_steps, step, config.batch_size)
    logging.info("%s: %d steps (%d epochs × %d), global batch %d on %d %s devices / %d processes "
                 "(JAX %s)", task.name, total_steps, config.num_epochs, steps_per_epoch,
                 config.batch_size, jax.device_count(), jax.default_backend(), jax.process_count(),
                 jax.__version__)

    def save_latest():
      writer.flush()  # on gs:// the log is rewritten in batches: make it cover this checkpoint
      checkpointer.save(step, model=checkpointing.named_arrays(params, batch_stats),
                        optimizer={"opt_state": opt_state, "step": step},
                        meta=dict(meta, early_stopping=early, epoch=step / steps_per_epoch),
                        data_iterator=train_iterator)
      if stop_here or preempted or step >= total_steps or early["stopped_early"]:
        # The loop ends after this save: wait for it here, so a failed write (a full disk) stops the
        # loop with CheckpointSaveError and the cleanup after it (lock release) still runs.
        checkpointer.wait_until_finished()

    def check_finite(history):
      fetched = jax.device_get([(m["finite"], m.get("skipped", 0.0)) for m in history])
      first_step = step - len(history) + 1
      skipped = [first_step + i for i, (_, skip) in enumerate(fetched) if skip]
      if skipped:
        logging.warning("Skipped %d step(s) with a non-finite loss or gradient (steps %s); their "
                        "updates were discarded (skip_nonfinite_steps=True).", len(skipped),
                        ", ".join(map(str, skipped[:10])))
        return len(skipped)
      bad = [i for i, (ok, _) in enumerate(fetched) if not ok]
      if bad:
        checkpointer.wait_until_finished()  # so the step named below is complete on disk
        last_good = checkpointer.latest_step()
        raise DivergenceError(
            f"{workdir}: non-finite loss or gradient at step {first_step + bad[0]}; stopped without "
            f"saving that state (last good checkpoint: "
            f"{'none' if last_good is None else f'step {last_good}'}). Lower the learning rate or set "
            "--config.skip_nonfinite_steps=True")
      return 0

    history: list[dict] = []  # metrics since the last log step
    skipped_steps = 0
    preempted = False
    one_step_in_flight = keeps_one_step_in_flight()
    metrics = None
    with jax.set_mesh(mesh):
      while step < total_steps and not early["stopped_early"]:
        batch = _device_batch(next(train_iterator), train_keys, mesh)
        if one_step_in_flight:
          jax.block_until_ready(metrics)
        params, batch_stats, opt_state, metrics = train_step(
            params, batch_stats, other, opt_state, jnp.int32(step), batch)
        history.append(metrics)
        step += 1
        end_of_epoch = step % steps_per_epoch == 0
        stop_here = bool(config.stop_after_steps) and step >= config.stop_after_steps
        preempted = stop_requests.requested(step) and step < total_steps
        periodic = bool(config.checkpoint_every_steps) and step % config.checkpoint_every_steps == 0
        saving = end_of_epoch or periodic or stop_here or preempted or step == total_steps
        # A row at every save: the running means since the last row live only in memory, and a run
        # resumed from this checkpoint must not log a row that averages fewer steps than it claims.
        if step % config.log_every_steps == 0 or saving:
          skipped_steps += check_finite(history)  # also before every save: never save a non-finite state
          record = {"epoch": step / steps_per_epoch, **_mean_metrics(history, "train/"),
                    "learning_rate": float(schedules["head"](step - 1)), **progress.update(step)}
          if skip_nonfinite:
            record["skipped_steps"] = skipped_steps
          if config.backbone_learning_rate is not None:
            record["backbone_learning_rate"] = float(schedules["backbone"](step - 1))
          if end_of_epoch or step == total_steps:
            record.update(validate(eval_step, (params, batch_stats, other), task, config, mesh))
            record["epoch"] = round(step / steps_per_epoch, 6)
            if task.online_probe is not None:  # frozen-feature probes of a pretraining backbone
              record.update(task.online_probe(model, (params, batch_stats, other), mesh,
                                              epoch=record["epoch"]))
            if record["val/loss"] < early["best_val_loss"]:
              early.update(best_val_loss=record["val/loss"], best_epoch=record["epoch"],
                           epochs_without_improvement=0)
              checkpointer.save_best(step, model=checkpointing.named_arrays(params, batch_stats),
                                     meta=dict(meta, epoch=record["epoch"], val_loss=record["val/loss"]))
            else:
              early["epochs_without_improvement"] += 1
            early["stopped_early"] = early["epochs_without_improvement"] >= config.early_stopping_patience
          metrics_writer.log_status(step, total_steps, record)
          writer.write(step, record)
          history = []
        if saving:
          save_latest()
        if preempted:
          logging.warning("Received %s: saved a checkpoint at step %d; exiting. Rerun the same command "
                          "to resume.", stop_requests.received, step)
          break
        if stop_here:
          logging.info("Stopping after step %d as configured (stop_after_steps); rerun to resume.", step)
          break
  finally:
    writer.close()
  if early["stopped_early"]:
    logging.info("Early stopping: no validation improvement for %d epochs (best epoch %s).",
                 config.early_stopping_patience, early["best_epoch"])
  return {"step": step, "total_steps": total_steps, **early, "skipped_steps": skipped_steps,
          "preempted": preempted}
