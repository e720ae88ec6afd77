"""Our train step and eval-mode forward as the benchmark runs them, built as training builds them.

The model, the loss and the steps come from the finetune recipe's config (``config_lib.recipe``) through
``recipes.build_model_and_loss`` and ``steps.build_steps``, as ``tpu/compile_only.py`` builds them: the
optimizer, learning rates, dropout keys, block loop and depthwise formulation are the training loop's,
not the benchmark's own. The mass statistics are those of the benchmarked batch, as training takes
them from the jets it trains on. The step runs on one device (a one-device mesh), and is dispatched
as the loop dispatches it (``steps.keeps_one_step_in_flight``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2vit_jax import config_lib
from l2vit_jax.runtime import sharding
from l2vit_jax.tpu import compile_only
from l2vit_jax.training import recipes, steps

# The benchmark's model options (``args``), as fields of ``config.model``.
MODEL_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def bench_config(args, dtype: str):
  """The finetune recipe's config with the benchmark's model shape, attention and compute dtype."""
  config = config_lib.apply_recipe(config_lib.base_config(), config_lib.recipe("finetune"))
  config.model.update({field: getattr(args, field) for field in MODEL_FIELDS})
  config.model.update(attention=args.attention, dtype=dtype)
  return config


def model_record(args) -> dict:
  """The model's shape as the report records it (``model.config``)."""
  model = bench_config(args, "float32").model
  return {field: model[field] for field in ("in_channels", *MODEL_FIELDS)}


def fake_batch(args, size: int | None = None) -> dict[str, np.ndarray]:
  """A finetuning batch (``recipes.BATCH_KEYS['finetune']``) of random jets about as sparse as the
  real ones; ``size`` defaults to ``args.batch``. The same seed every call: ours and PyTorch's see the
  same images."""
  size = size or args.batch
  rng = np.random.default_rng(0)
  images = np.zeros((size, args.img_size, args.img_size, 8), np.float32)
  hits = rng.random(images.shape) < 0.01
  images[hits] = rng.exponential(5.0, int(hits.sum()))
  return {
    "image": images,
    "label": (np.arange(size) % 2).astype(np.int32),
    "mass": rng.uniform(50, 300, size).astype(np.float32),
  }


def mass_statistics(batch: dict[str, np.ndarray]) -> tuple[float, float]:
  """Mean and standard deviation of the batch's masses (1 where they are all equal: one image)."""
  return float(np.mean(batch["mass"])), float(np.std(batch["mass"])) or 1.0


@dataclasses.dataclass
class Built:
  """The jitted train step with its placed state and batch, and the eval-mode forward with its own
  copy of the parameters (the train step donates, and so deletes, the buffers it is given)."""

  train: Callable  # jit(params, batch_stats, other, opt_state, step, batch)
  state: list  # [params, batch_stats, other, opt_state]
  batch: dict[str, jax.Array]
  forward: Callable  # jit(eval_state, images) -> (logits, mass)
  eval_state: object
  steps: steps.Steps


def build(args, dtype: str, batch: dict[str, np.ndarray]) -> Built:
  """Our finetune train step and eval-mode forward for ``batch`` (``fake_batch``), not compiled."""
  config = bench_config(args, dtype)
  mean, std = mass_statistics(batch)
  model, loss = recipes.build_model_and_loss(config, mass_mean=mean, mass_std=std)
  # Before build_steps: it resolves 'auto' for the mesh's platform, as for every other choice.
  model.set_attributes(depthwise_implementation=args.depthwise_implementation, raise_if_not_found=False)
  mesh = sharding.make_mesh(jax.devices()[:1])
  # The schedules' length only sets the learning rate's value, not a step's work.
  per_epoch = compile_only.NOMINAL_STEPS_PER_EPOCH
  built, (params, batch_stats, other) = steps.build_steps(
    config, model, loss, mesh, steps_per_epoch=per_epoch, total_steps=int(config.num_epochs * per_epoch)
  )
  model.eval()
  eval_graphdef, eval_state = nnx.split(model)
  eval_state = jax.tree.map(lambda a: a.copy(), eval_state)  # the train step donates the originals

  def forward(state, images):
    return nnx.merge(eval_graphdef, state)(images)

  params, batch_stats, other = sharding.replicate((params, batch_stats, other), mesh)
  state = [params, batch_stats, other, sharding.replicate(built.tx.init(params), mesh)]
  return Built(
    train=built.train,
    state=state,
    batch=sharding.global_batch(batch, mesh),
    forward=jax.jit(forward),
    eval_state=eval_state,
    steps=built,
  )


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled executable by XLA's cost analysis (loop bodies once); None if unreported."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def analytic_forward_flops(args) -> float:
  """Multiply-adds ×2 of the matmuls and convolutions of one image's forward pass."""
  grid = args.img_size // args.patch_size
  tokens, dim = grid * grid, args.embed_dim
  head_dim = dim // args.num_heads
  hidden = int(dim * args.mlp_ratio)
  patch = 2 * tokens * (8 * args.patch_size**2) * dim
  qkv_proj_mlp = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
  if args.attention == "linear":  # kᵀv and q·(kᵀv) per head, the denominator q·Σk as one more column
    attention = 2 * 2 * args.num_heads * tokens * head_dim * (head_dim + 1)
  else:
    attention = 2 * 2 * args.num_heads * tokens * tokens * head_dim
  depthwise = 2 * 2 * tokens * 49 * dim
  return patch + args.depth * (qkv_proj_mlp + attention + depthwise)


class JaxTrainer:
  """Our train step and inference forward for one configuration, compiled (and timed compiling) and
  run once each, so that timed runs see neither compilation nor first-run allocation."""

  def __init__(self, args, dtype: str, batch: dict[str, np.ndarray]):
    built = build(args, dtype, batch)
    self.state, self.batch, self.eval_state = built.state, built.batch, built.eval_state
    self.depthwise_implementation = built.steps.depthwise_implementation
    self.step_count = 0
    self.one_step_in_flight = steps.keeps_one_step_in_flight()
    start = time.perf_counter()
    self.train_step = built.train.lower(*self.state, jnp.int32(0), self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.xla_flops_per_step = xla_flops(self.train_step)
    start = time.perf_counter()
    self.forward = built.forward.lower(self.eval_state, self.batch["image"]).compile()
    self.forward_compile_seconds = time.perf_counter() - start
    self.xla_flops_per_forward = xla_flops(self.forward)
    self.run_train(1)
    self.run_inference(1)

  def run_train(self, count: int) -> None:
    params, batch_stats, other, opt_state = self.state
    for _ in range(count):
      params, batch_stats, opt_state, metrics = self.train_step(
        params, batch_stats, other, opt_state, jnp.int32(self.step_count), self.batch
      )
      if self.one_step_in_flight:
        jax.block_until_ready(metrics)
      self.step_count += 1
    jax.block_until_ready((params, metrics))
    self.state = [params, batch_stats, other, opt_state]

  def run_inference(self, count: int) -> None:
    for _ in range(count):
      jax.block_until_ready(self.forward(self.eval_state, self.batch["image"]))
