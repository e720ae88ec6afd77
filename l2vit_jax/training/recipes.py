"""What differs between training recipes (SimCLR and masked-image pretraining, finetuning, scratch):
model, objective, data, augmentation and what goes into the checkpoint meta.

``build_task(config)`` returns everything the shared loop (``training.loop``) needs; the loop itself
knows nothing about SimCLR, MAE or mass regression. Scratch is finetuning without ``init_from``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from l2vit_jax import errors, models
from l2vit_jax.checkpoint import model_io
from l2vit_jax.data import sources, split
from l2vit_jax.evaluation import probes
from l2vit_jax.models import build, l2vit
from l2vit_jax.training import objectives


@dataclasses.dataclass
class Task:
  name: str
  model: nnx.Module
  loss: Callable
  train_source: Sequence[dict]
  val_source: Sequence[dict]
  augmentation: str  # for training batches
  batch_keys: tuple[str, ...]  # what the step needs on device
  meta: dict  # written into every checkpoint
  # Pretraining only: (model, (params, batch_stats, other), mesh, *, epoch) -> probe/* metrics for the
  # epoch's record (probes.OnlineProbe), or None.
  online_probe: Callable | None = None


def build_backbone(config) -> models.L2ViT:
  return build.build_l2vit(config.model, seed=config.seed)


def _labelled_subset(config, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
  """The first ``config.data.train_subset`` jets of the seeded stratified ordering (0: the whole split)."""
  count = int(config.data.get("train_subset", 0) or 0)
  if not count:
    return train
  if count > len(train):
    raise errors.DataError(
      f"{config.data.labelled_path}: data.train_subset={count} is larger than the train split "
      f"({len(train)} jets); use a larger file or a smaller subset"
    )
  return split.nested_subsets(labels, train, [count], seed=config.data.get("train_subset_seed", 0))[count]


def labelled_splits(config, *, min_train_examples: int = 1) -> dict:
  """Validated labelled file → sources for train/val/test, the train-split mass statistics and the
  split's ``fingerprint`` (``sources.LabelledFile.fingerprint``), which the checkpoints record.

  Raises:
    errors.DataError: the file is unusable, or the jets trained on all have one mass.
  """
  labelled = sources.open_labelled(
    config.data.labelled_path,
    split_seed=config.data.split_seed,
    image_size=config.model.img_size,
    min_examples=min_train_examples,
  )
  parts = dict(
    labelled.parts, train=_labelled_subset(config, labelled.labels["label"], labelled.parts["train"])
  )
  # Standardised on the jets actually trained on: a user with n labels has only those n masses.
  mass_mean, mass_std = labelled.mass_statistics(parts["train"])
  parts["train"] = np.tile(parts["train"], max(int(config.data.get("train_repeats", 1)), 1))
  return {
    **{name: labelled.source(idx) for name, idx in parts.items()},
    "mass_mean": mass_mean,
    "mass_std": mass_std,
    "fingerprint": labelled.fingerprint(),
  }


def _base_meta(config, **extra) -> dict:
  return {
    "task": config.task,
    "model_config": config.model.to_dict(),
    "pixel_scale": float(config.data.pixel_scale),
    **extra,
  }


def unlabelled_splits(config) -> dict:
  """Validated unlabelled file → train and held-out validation sources (a seeded random split)."""
  path = config.data.unlabelled_path
  info = sources.validate_file(
    path, labelled=False, image_size=config.model.img_size, min_examples=config.batch_size
  )
  order = np.random.default_rng(config.data.split_seed).permutation(info.num_examples)
  num_val = int(round(config.data.unlabelled_val_fraction * info.num_examples))
  return {
    "train": sources.open_source(path, labelled=False, indices=np.sort(order[num_val:])),
    "val": sources.open_source(path, labelled=False, indices=np.sort(order[:num_val])),
  }


# What each recipe's training batches are made by and hold (the keys its step reads).
AUGMENTATIONS = {"simclr": "simclr", "mae": "physics", "finetune": "physics"}
BATCH_KEYS = {"simclr": ("view1", "view2"), "mae": ("image",), "finetune": ("image", "label", "mass")}


def build_model_and_loss(
  config, *, mass_mean: float = 0.0, mass_std: float = 1.0
) -> tuple[nnx.Module, Callable]:
  """``config.task``'s freshly initialised model and its loss, without opening any data file.

  The data-reading task builders below use it, and so does ``scripts/compile_tpu.py``, which has no
  data (finetuning's mass statistics then only scale the regression target).
  """
  check_task_name(config)
  if config.task == "simclr":
    projector = models.SimCLRProjector(
      in_dim=config.model.embed_dim,
      hidden_dim=config.model.embed_dim,
      out_dim=config.loss.projection_dim,
      rngs=build.model_rngs(config.seed + 7),
    )
    return (
      models.ContrastiveModel(build_backbone(config), projector),
      objectives.SimCLRLoss(temperature=config.loss.temperature),
    )
  if config.task == "mae":
    return (
      models.MaskedImageModel(build_backbone(config), rngs=build.model_rngs(config.seed + 11)),
      objectives.MaskedReconstructionLoss(**config.mae.to_dict()),
    )
  return (
    build_backbone(config),
    objectives.DualHeadLoss(
      mass_mean=mass_mean,
      mass_std=mass_std,
      classification_weight=config.loss.classification_weight,
      regression_weight=config.loss.regression_weight,
    ),
  )


def _simclr_task(config) -> Task:
  data = unlabelled_splits(config)
  model, loss = build_model_and_loss(config)
  return Task(
    name="simclr",
    model=model,
    loss=loss,
    train_source=data["train"],
    val_source=data["val"],
    augmentation=AUGMENTATIONS["simclr"],
    batch_keys=BATCH_KEYS["simclr"],
    meta=_base_meta(config, projection_dim=config.loss.projection_dim, mass_mean=None, mass_std=None),
    online_probe=probes.online_probe(config),
  )


def _mae_task(config) -> Task:
  data = unlabelled_splits(config)
  model, loss = build_model_and_loss(config)
  return Task(
    name="mae",
    model=model,
    loss=loss,
    train_source=data["train"],
    val_source=data["val"],
    augmentation=AUGMENTATIONS["mae"],
    batch_keys=BATCH_KEYS["mae"],
    meta=_base_meta(config, mae=config.mae.to_dict(), mass_mean=None, mass_std=None),
    online_probe=probes.online_probe(config),
  )


def _finetune_task(config) -> Task:
  data = labelled_splits(config, min_train_examples=config.batch_size)
  model, loss = build_model_and_loss(config, mass_mean=data["mass_mean"], mass_std=data["mass_std"])
  if config.init_from:
    model_io.load_backbone_weights(model, config.init_from)
  return Task(
    name="finetune",
    model=model,
    loss=loss,
    train_source=data["train"],
    val_source=data["val"],
    augmentation=AUGMENTATIONS["finetune"],
    batch_keys=BATCH_KEYS["finetune"],
    # data_split: which file and jets the model trained on, so evaluation refuses another split
    # (evaluation.evaluate.check_model_split).
    meta=_base_meta(
      config,
      mass_mean=data["mass_mean"],
      mass_std=data["mass_std"],
      data_split=data["fingerprint"],
      init_from=config.init_from,
      train_subset=int(config.data.get("train_subset", 0)),
      train_subset_seed=int(config.data.get("train_subset_seed", 0)),
      train_repeats=int(config.data.get("train_repeats", 1)),
    ),
  )


TASKS = {"simclr": _simclr_task, "mae": _mae_task, "finetune": _finetune_task}


def check_task_name(config) -> None:
  if config.task not in TASKS:
    raise errors.ConfigError(
      f"config.task={config.task!r} is not a training task; use one of {sorted(TASKS)}"
    )


def build_task(config) -> Task:
  check_task_name(config)
  return TASKS[config.task](config)


# The file each training task reads, so an empty path is reported by its config key.
_TASK_INPUT_KEYS = {
  "simclr": "data.unlabelled_path",
  "mae": "data.unlabelled_path",
  "finetune": "data.labelled_path",
}


def check_training_config(config) -> None:
  """Semantic checks that flag parsing cannot do, before any data is read or the workdir is touched.

  Raises:
    errors.ConfigError: naming every offending field, its value and what was expected.
  """
  check_task_name(config)
  problems = []

  def expect(ok: bool, field: str, expected: str) -> None:
    if not ok:
      value = config
      for key in field.split("."):
        value = value.get(key) if value is not None else None
      problems.append(f"{field}={value!r}: expected {expected}")

  devices, processes = jax.device_count(), jax.process_count()
  expect(
    config.batch_size > 0 and config.batch_size % devices == 0,
    "batch_size",
    f"a positive multiple of the {devices} device(s)",
  )
  expect(
    config.eval_batch_size > 0 and config.eval_batch_size % processes == 0,
    "eval_batch_size",
    f"a positive multiple of the {processes} process(es)",
  )
  expect(config.num_epochs > 0, "num_epochs", "> 0")
  expect(config.log_every_steps > 0, "log_every_steps", "> 0")
  expect(config.checkpoint_every_steps >= 0, "checkpoint_every_steps", ">= 0 (0: every epoch)")
  expect(config.keep_checkpoints > 0, "keep_checkpoints", "> 0")
  expect(config.stop_after_steps >= 0, "stop_after_steps", ">= 0 (0: never)")
  expect(config.early_stopping_patience > 0, "early_stopping_patience", "> 0")
  expect(config.learning_rate > 0, "learning_rate", "> 0")
  expect(config.data.pixel_scale > 0, "data.pixel_scale", "> 0")
  expect(0 < config.data.unlabelled_val_fraction < 1, "data.unlabelled_val_fraction", "in (0, 1)")
  expect(
    config.model.attention in l2vit.ATTENTION_FNS, "model.attention", f"one of {sorted(l2vit.ATTENTION_FNS)}"
  )
  expect(
    config.model.embed_dim % config.model.num_heads == 0,
    "model.embed_dim",
    f"a multiple of model.num_heads={config.model.num_heads}",
  )
  expect(
    config.model.dtype in ("float32", "bfloat16", "float16", None, ""),
    "model.dtype",
    "'float32', 'bfloat16' or 'float16'",
  )
  expect(config.get("scan_blocks", "auto") in ("auto", "on", "off"), "scan_blocks", "'auto', 'on' or 'off'")
  expect(
    config.get("remat_policy", l2vit.DEFAULT_REMAT_POLICY) in l2vit.REMAT_POLICIES,
    "remat_policy",
    f"one of {list(l2vit.REMAT_POLICIES)}",
  )
  input_key = _TASK_INPUT_KEYS.get(config.task)
  if input_key:
    expect(
      bool(config.data.get(input_key.split(".")[1])), input_key, "the path of a jet file (.h5 or .sparse)"
    )
  if problems:
    raise errors.ConfigError("invalid config: " + "; ".join(problems))
