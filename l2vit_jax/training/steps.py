"""The jitted train and eval steps, and the platform choices they are built with.

The train step is a pure function of explicit state ``(params, batch_stats, other, opt_state)``,
jit-compiled once, with the NNX graph split outside jit and merged inside (``docs/design.md``). Dropout
keys are derived from (seed, step), so a resumed run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from l2vit_jax.models import depthwise, l2vit
from l2vit_jax.runtime import process_setup, sharding
from l2vit_jax.training import optimizer


def make_train_step(
  graphdef,
  loss_fn: Callable,
  tx: optax.GradientTransformation,
  dropout_key: jax.Array,
  *,
  skip_nonfinite: bool = False,
  prepare_batch: Callable | None = None,
) -> Callable:
  """jit(params, batch_stats, other, opt_state, step, batch) -> new state and metrics (donated).

  ``prepare_batch`` (e.g. ``device_augment.prepare_batch``) turns the shipped batch into the one the
  loss reads, on the device, before anything else.

  With ``skip_nonfinite`` a step whose loss or gradient is not finite returns the state it was given
  (parameters, BatchNorm statistics and optimizer moments untouched) and reports ``skipped=1``;
  otherwise the loop stops on it (``DivergenceError``).
  """

  def train_step(params, batch_stats, other, opt_state, step, batch):
    if prepare_batch is not None:
      with jax.named_scope("input"):
        batch = prepare_batch(batch)

    def compute_loss(params):
      model = nnx.merge(graphdef, params, batch_stats, other, copy=True)
      nnx.reseed(model, dropout=jax.random.fold_in(dropout_key, step))
      with jax.named_scope("loss"):  # the model's own scopes nest inside (tpu/accounting.py)
        loss, metrics = loss_fn(model, batch)
      return loss, (metrics, nnx.state(model, nnx.BatchStat))

    (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    with jax.named_scope("optimizer"):
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, **metrics, "finite": finite}
    if skip_nonfinite:
      keep_new = lambda new, old: jnp.where(finite, new, old)
      new_params, new_batch_stats, new_opt_state = jax.tree.map(
        keep_new, (new_params, new_batch_stats, new_opt_state), (params, batch_stats, opt_state)
      )
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
# RngBitGenerator: 147 s; docs/compile_only.md). 'rbg' still splits and folds keys with
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
      node.depthwise_implementation = depthwise.resolve_implementation(
        node.depthwise_implementation, platform
      )
      chosen.add(node.depthwise_implementation)
  return ",".join(sorted(chosen))


# Where config.scan_blocks 'auto' compiles the blocks as one lax.scan (models.l2vit.scan_blocks). For
# v5e:2x2 the default model's bf16 finetune step then compiles in 88-132 (hosts vary) instead of 297
# CPU-seconds, with a quarter of the peak memory and less HBM traffic, for 30 % more FLOPs (the default remat policy
# recomputes each block's forward; docs/performance.md, "Compile time"). On the CPU the unrolled step
# was as fast or faster and compiles in seconds; on a GPU, not measured yet, the extra FLOPs would
# cost a compute-bound step: both stay unrolled unless config.scan_blocks is 'on'.
SCAN_BLOCKS_PLATFORMS = ("tpu",)


def configure_block_loop(model: nnx.Module, config, platform: str) -> tuple[bool, str]:
  """Sets how every L2ViT in ``model`` compiles its blocks, from ``config.scan_blocks`` ('auto', 'on'
  or 'off') and ``config.remat_policy`` (used only when scanning), in place and before the graph is
  split. Returns (scan_blocks, remat_policy) as set."""
  choice = config.get("scan_blocks", "auto")  # checked by recipes.check_training_config
  scan = platform in SCAN_BLOCKS_PLATFORMS if choice == "auto" else choice == "on"
  policy = config.get("remat_policy", l2vit.DEFAULT_REMAT_POLICY) if scan else ""
  model.set_attributes(scan_blocks=scan, remat_policy=policy, raise_if_not_found=False)
  return scan, policy


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
  scan_blocks: bool
  remat_policy: str


def build_steps(
  config,
  model: nnx.Module,
  loss_fn: Callable,
  mesh,
  *,
  steps_per_epoch: int,
  total_steps: int,
  prepare_batch: Callable | None = None,
) -> tuple[Steps, tuple]:
  """The steps the training loop runs, for the devices of ``mesh`` (also a compile-only TPU mesh).

  Platform-dependent choices follow the mesh's devices, not JAX's default backend: 'auto' depthwise
  formulations and the block loop (``configure_block_loop``) are fixed on ``model``, and the dropout
  key gets ``config.prng_impl``'s implementation.
  The state crossing jit keeps the model's own keys (the step reseeds a copy), so its pytree is the
  same on every step.

  Returns the steps and the model's host-side state ``(params, batch_stats, other)`` split for them.
  """
  platform = sharding.mesh_platform(mesh)
  depthwise_implementation = fix_depthwise_implementations(model, platform)
  scan_blocks, remat_policy = configure_block_loop(model, config, platform)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
  model.train()
  graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  schedules = optimizer.learning_rate_schedules(config, steps_per_epoch, total_steps)
  tx = optimizer.make_optimizer(config, schedules)
  dropout_key = jax.random.key(config.seed, impl=resolve_prng_impl(config.get("prng_impl", "auto"), platform))
  train_step = make_train_step(
    graphdef,
    loss_fn,
    tx,
    dropout_key,
    skip_nonfinite=bool(config.get("skip_nonfinite_steps", False)),
    prepare_batch=prepare_batch,
  )
  steps = Steps(
    train=train_step,
    eval=make_eval_step(eval_graphdef, loss_fn),
    tx=tx,
    schedules=schedules,
    platform=platform,
    depthwise_implementation=depthwise_implementation,
    prng_impl=str(jax.random.key_impl(dropout_key)),
    scan_blocks=scan_blocks,
    remat_policy=remat_policy,
  )
  return steps, (params, batch_stats, other)


def keeps_one_step_in_flight() -> bool:
  """Whether the train loop dispatches a step only after the previous one ended.

  XLA:CPU allocates a step's temporaries (GBs) when the step is dispatched. With freed memory kept
  for reuse (process_setup.configure_allocator), every step run ahead would keep a block of its own, so
  there the next batch is prepared while a step runs but dispatched after it ends.
  """
  return jax.default_backend() == "cpu" and process_setup.allocator_tuned()


def eval_batch_keys(augmentation: str, batch_keys: tuple[str, ...]) -> tuple[str, ...]:
  """SimCLR validates on fixed-seed views of whole batches; other tasks on padded batches whose
  'mask' flags the padding."""
  return batch_keys if augmentation == "simclr" else batch_keys + ("mask",)
