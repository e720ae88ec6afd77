"""Model-only checkpoints (the best model, imported PyTorch weights) and restoring a model from any
checkpoint: whole (evaluation) or only its backbone (the pretrain→finetune bridge, probes)."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from l2vit_jax import models
from l2vit_jax.checkpoint import integrity, storage
from l2vit_jax.checkpoint.naming import BEST_DIR, LATEST_DIR, load_model_arrays, model_arrays
from l2vit_jax.errors import MissingCheckpointError
from l2vit_jax.models import build
from l2vit_jax.runtime import paths


def save_model_checkpoint(directory: str, model: nnx.Module, meta: dict, *, step: int = 0) -> None:
  """Saves ``model`` (params and BatchNorm stats) with its ``meta`` under ``directory/best/<step>``.

  ``meta`` must hold ``model_config`` (the L2ViT constructor arguments); evaluation also reads
  ``pixel_scale``, ``mass_mean`` and ``mass_std`` from it.
  """
  if "model_config" not in meta:
    raise ValueError("meta must contain 'model_config' (the model's constructor arguments)")
  arrays = model_arrays(model)
  best = paths.join(directory, BEST_DIR)
  with storage.reporting_storage_faults(best), storage.open_manager(best, max_to_keep=1) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(arrays),
        meta=ocp.args.JsonSave(integrity.with_digests(meta, {"model": arrays}))), force=True)
    manager.wait_until_finished()


def find_model_checkpoint(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
                          ) -> tuple[str, int]:
  """The (manager directory, step) to restore: by default ``best/`` first, else the latest."""
  for sub in prefer:
    path = paths.join(directory, sub)
    if paths.is_dir(path):
      with storage.open_manager(path, max_to_keep=None, read_only=True) as manager:
        step = manager.latest_step()
      if step is not None:
        return path, step
  raise MissingCheckpointError(
      f"{directory}: no Orbax checkpoint found (looked in {BEST_DIR}/ and {LATEST_DIR}/); train with "
      "configs/finetune.py or import PyTorch weights with scripts/convert_torch_checkpoint.py")


def read_model_checkpoint(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
                          ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """Named arrays and meta of the checkpoint ``find_model_checkpoint`` picks, as host numpy arrays.

  Raises:
    CheckpointDamagedError: the arrays differ from their digests (named), or cannot be read.
  """
  path, step = find_model_checkpoint(directory, prefer)
  with storage.open_manager(path, max_to_keep=None, read_only=True) as manager:
    restored = integrity.restore_verified(manager, step, model=_restore_as_numpy)
  return dict(restored["model"]), dict(restored["meta"])


def _restore_as_numpy(step_directory: str) -> ocp.args.PyTreeRestore:
  """Restores the ``model`` item's arrays as host numpy, whatever devices and processes saved them.

  Restoring with the saved shardings would name the saving run's devices: a single process reading
  what a multi-host run wrote is refused with 'Topology mismatch'.
  """
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(paths.as_path(paths.join(step_directory, "model"))).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.args.PyTreeRestore(restore_args=as_numpy)


def read_model_meta(directory: str, prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR)) -> dict:
  """Only the meta of the checkpoint ``find_model_checkpoint`` picks (no arrays are read)."""
  path, step = find_model_checkpoint(directory, prefer)
  with storage.open_manager(path, max_to_keep=None, read_only=True) as manager:
    return dict(integrity.restore_verified(manager, step)["meta"])


def restore_model_checkpoint(directory: str) -> tuple[nnx.Module, dict]:
  """Rebuilds the L2ViT described by the checkpoint's meta and loads its weights, in eval mode."""
  arrays, meta = read_model_checkpoint(directory)
  model = build.build_l2vit(meta["model_config"])
  load_model_arrays(model, arrays, context=f"{directory}: checkpoint does not fit the model in its meta")
  model.eval()
  return model, meta


def load_backbone_weights(model: models.L2ViT, directory: str) -> dict:
  """The pretrain→finetune bridge: backbone weights from a SimCLR, MAE, finetuned or imported
  checkpoint into ``model`` in place; its heads (``build.HEAD_NAMES``) stay as they are. Returns the
  checkpoint's meta."""
  arrays, meta = read_model_checkpoint(directory)
  prefix = "encoder/"  # a SimCLR checkpoint: the backbone is the ContrastiveModel's encoder
  if any(name.startswith(prefix) for name in arrays["params"]):
    arrays = {group: {name[len(prefix):]: value for name, value in named.items() if name.startswith(prefix)}
              for group, named in arrays.items()}
  is_backbone = lambda name: name.split("/")[0] not in build.HEAD_NAMES
  load_model_arrays(
      model, arrays, select=is_backbone,
      context=f"{directory}: pretrained backbone (model_config {meta.get('model_config')}) does not fit "
      "the model being finetuned")
  logging.info("Initialised the backbone from %s (heads left fresh).", directory)
  return meta


def restore_backbone(directory: str) -> tuple[models.L2ViT, dict]:
  """The L2ViT backbone of any checkpoint, built from its meta's ``model_config``, in eval mode; its
  heads stay at their fresh initialisation (probes use ``features`` only)."""
  meta = read_model_meta(directory)
  backbone = build.build_l2vit(meta["model_config"])
  load_backbone_weights(backbone, directory)
  backbone.eval()
  return backbone, meta
