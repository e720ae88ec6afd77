"""The optimiser: AdamW with gradient clipping, and a learning-rate schedule per parameter group
(the task heads, and the backbone, which finetuning trains at a lower rate)."""

from __future__ import annotations

import jax
import optax

from l2vit_jax.models.build import HEAD_NAMES


def _top_level_name(path) -> str:
  entry = path[0]
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def parameter_groups(params) -> object:
  """'head' for the task heads (classification, regression, SimCLR projector), else 'backbone'."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "head" if _top_level_name(path) in HEAD_NAMES else "backbone", params
  )


def learning_rate_schedules(config, steps_per_epoch: int, total_steps: int) -> dict[str, optax.Schedule]:
  """Linear warmup then cosine decay to ``end_learning_rate``, per parameter group.

  Warmup starts at peak/warmup_steps rather than 0, so the first step already learns (the original's
  first epoch did not move the model).
  """
  warmup = int(config.warmup_epochs * steps_per_epoch)

  def schedule(peak: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
      init_value=peak / max(warmup, 1),
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=config.end_learning_rate,
    )

  backbone = config.backbone_learning_rate
  return {
    "head": schedule(config.learning_rate),
    "backbone": schedule(config.learning_rate if backbone is None else backbone),
  }


def make_optimizer(config, schedules: dict[str, optax.Schedule]) -> optax.GradientTransformation:
  def adamw(schedule):
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)

  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip_norm),
    optax.multi_transform({g: adamw(s) for g, s in schedules.items()}, parameter_groups),
  )
