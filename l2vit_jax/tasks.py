"""What differs between training recipes: model, objective, data and which parameters are "heads".

``build_task(config)`` returns everything the shared loop in ``train.py`` needs; the loop itself knows
nothing about SimCLR or mass regression.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from absl import logging
from flax import nnx

from l2vit_jax import checkpointing, models, objectives, probes
from l2vit_jax.data import hdf5, sources, split

HEAD_NAMES = ("cls_head", "reg_head", "projector", "decoder", "mask_token")


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


def model_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1)


def build_backbone(config) -> models.L2ViT:
  return models.L2ViT(**checkpointing.model_kwargs(config.model.to_dict()), rngs=model_rngs(config.seed))


def _labelled_subset(config, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
  """The first ``config.data.train_subset`` jets of the seeded stratified ordering (0: the whole split)."""
  count = int(config.data.get("train_subset", 0) or 0)
  if not count:
    return train
  if count > len(train):
    raise hdf5.DataError(
        f"{config.data.labelled_path}: data.train_subset={count} is larger than the train split "
        f"({len(train)} jets); use a larger file or a smaller subset")
  return split.nested_subsets(labels, train, [count], seed=config.data.get("train_subset_seed", 0))[count]


def labelled_splits(config, *, min_train_examples: int = 1) -> dict:
  """Validated labelled file → sources for train/val/test and the train-split mass statistics."""
  path = config.data.labelled_path
  sources.validate_file(path, labelled=True, image_size=config.model.img_size,
                        min_examples=min_train_examples)
  labels = sources.read_labels(path)
  parts = split.stratified_split(labels["label"], seed=config.data.split_seed)
  parts["train"] = _labelled_subset(config, labels["label"], parts["train"])
  # Standardised on the jets actually trained on: a user with n labels has only those n masses.
  mass_mean, mass_std = split.mass_statistics(labels["mass"], parts["train"])
  parts["train"] = np.tile(parts["train"], max(int(config.data.get("train_repeats", 1)), 1))
  split_sources = {name: sources.open_source(path, labelled=True, indices=idx, labels=labels)
                   for name, idx in parts.items()}
  return {**split_sources, "mass_mean": mass_mean, "mass_std": mass_std}


def _base_meta(config, **extra) -> dict:
  return {"task": config.task, "model_config": config.model.to_dict(),
          "pixel_scale": float(config.data.pixel_scale), **extra}


def unlabelled_splits(config) -> dict:
  """Validated unlabelled file → train and held-out validation sources (a seeded random split)."""
  path = config.data.unlabelled_path
  info = sources.validate_file(path, labelled=False, image_size=config.model.img_size,
                               min_examples=config.batch_size)
  order = np.random.default_rng(config.data.split_seed).permutation(info.num_examples)
  num_val = int(round(config.data.unlabelled_val_fraction * info.num_examples))
  return {"train": sources.open_source(path, labelled=False, indices=np.sort(order[num_val:])),
          "val": sources.open_source(path, labelled=False, indices=np.sort(order[:num_val]))}


# What each recipe's training batches are made by and hold (the keys its step reads).
AUGMENTATIONS = {"simclr": "simclr", "mae": "physics", "finetune": "physics"}
BATCH_KEYS = {"simclr": ("view1", "view2"), "mae": ("image",), "finetune": ("image", "label", "mass")}


def build_model_and_loss(config, *, mass_mean: float = 0.0, mass_std: float = 1.0
                         ) -> tuple[nnx.Module, Callable]:
  """``config.task``'s freshly initialised model and its loss, without opening any data file.

  The data-reading task builders below use it, and so does ``scripts/compile_tpu.py``, which has no
  data (finetuning's mass statistics then only scale the regression target).
  """
  check_task_name(config)
  if config.task == "simclr":
    projector = models.SimCLRProjector(in_dim=config.model.embed_dim, hidden_dim=config.model.embed_dim,
                                       out_dim=config.loss.projection_dim,
                                       rngs=model_rngs(config.seed + 7))
    return (objectives.ContrastiveModel(build_backbone(config), projector),
            objectives.SimCLRLoss(temperature=config.loss.temperature))
  if config.task == "mae":
    return (models.MaskedImageModel(build_backbone(config), rngs=model_rngs(config.seed + 11)),
            objectives.MaskedReconstructionLoss(**config.mae.to_dict()))
  return (build_backbone(config),
          objectives.DualHeadLoss(mass_mean=mass_mean, mass_std=mass_std,
                                  classification_weight=config.loss.classification_weight,
                                  regression_weight=config.loss.regression_weight))


def _simclr_task(config) -> Task:
  data = unlabelled_splits(config)
  model, loss = build_model_and_loss(config)
  return Task(
      name="simclr", model=model, loss=loss,
      train_source=data["train"], val_source=data["val"],
      augmentation=AUGMENTATIONS["simclr"], batch_keys=BATCH_KEYS["simclr"],
      meta=_base_meta(config, projection_dim=config.loss.projection_dim, mass_mean=None, mass_std=None),
      online_probe=probes.online_probe(config))


def _mae_task(config) -> Task:
  data = unlabelled_splits(config)
  model, loss = build_model_and_loss(config)
  return Task(
      name="mae", model=model, loss=loss,
      train_source=data["train"], val_source=data["val"], augmentation=AUGMENTATIONS["mae"],
      batch_keys=BATCH_KEYS["mae"],
      meta=_base_meta(config, mae=config.mae.to_dict(), mass_mean=None, mass_std=None),
      online_probe=probes.online_probe(config))


def load_pretrained_backbone(model: models.L2ViT, workdir: str) -> None:
  """The pretrain→finetune bridge: backbone weights from a SimCLR, MAE or imported checkpoint; fresh heads."""
  arrays, meta = checkpointing.read_model_checkpoint(workdir)
  prefix = "encoder/"
  if any(name.startswith(prefix) for name in arrays["params"]):
    arrays = {group: {name[len(prefix):]: value for name, value in named.items() if name.startswith(prefix)}
              for group, named in arrays.items()}
  is_backbone = lambda name: name.split("/")[0] not in HEAD_NAMES
  checkpointing.load_model_arrays(
      model, arrays, select=is_backbone,
      context=f"{workdir}: pretrained backbone (model_config {meta.get('model_config')}) does not fit "
      "the model being finetuned")
  logging.info("Initialised the backbone from %s (heads left fresh).", workdir)


def _finetune_task(config) -> Task:
  data = labelled_splits(config, min_train_examples=config.batch_size)
  model, loss = build_model_and_loss(config, mass_mean=data["mass_mean"], mass_std=data["mass_std"])
  if config.init_from:
    load_pretrained_backbone(model, config.init_from)
  return Task(
      name="finetune", model=model, loss=loss,
      train_source=data["train"], val_source=data["val"], augmentation=AUGMENTATIONS["finetune"],
      batch_keys=BATCH_KEYS["finetune"],
      meta=_base_meta(config, mass_mean=data["mass_mean"], mass_std=data["mass_std"],
                      init_from=config.init_from, train_subset=int(config.data.get("train_subset", 0)),
                      train_subset_seed=int(config.data.get("train_subset_seed", 0)),
                      train_repeats=int(config.data.get("train_repeats", 1))))


TASKS = {"simclr": _simclr_task, "mae": _mae_task, "finetune": _finetune_task}


def check_task_name(config) -> None:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not a training task; use one of {sorted(TASKS)}")


def build_task(config) -> Task:
  check_task_name(config)
  return TASKS[config.task](config)
