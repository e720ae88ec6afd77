"""Model-only checkpoints (the best model, imported PyTorch weights) and restoring a model from any
checkpoint: whole (evaluation) or only its backbone (the pretrain→finetune bridge, probes)."""

from __future__ import annotations

import math

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from l2vit_jax import errors, models
from l2vit_jax.checkpoint import integrity, storage
from l2vit_jax.checkpoint.naming import (
  BEST_DIR,
  LATEST_DIR,
  describe_mismatch,
  load_model_arrays,
  model_arrays,
)
from l2vit_jax.errors import CheckpointDamagedError, CheckpointMismatchError, MissingCheckpointError
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
    manager.save(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(arrays),
        meta=ocp.args.JsonSave(integrity.with_digests(meta, {"model": arrays})),
      ),
      force=True,
    )
    manager.wait_until_finished()


def find_model_checkpoint(
  directory: str,
  prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
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
    "configs/finetune.py or import PyTorch weights with scripts/convert_torch_checkpoint.py"
  )


def read_model_checkpoint(
  directory: str,
  prefer: tuple[str, ...] = (BEST_DIR, LATEST_DIR),
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """Named arrays and meta of the checkpoint ``find_model_checkpoint`` picks, as host numpy arrays.

  Raises:
    CheckpointDamagedError: the arrays differ from their digests (named), or cannot be read.
  """
  path, step = find_model_checkpoint(directory, prefer)
  with storage.open_manager(path, max_to_keep=None, read_only=True) as manager:
    restored = integrity.restore_verified(manager, step, model=_restore_as_numpy)
  return dict(restored["model"]), _checked_meta(paths.join(path, str(step)), restored["meta"])


# Meta numbers that evaluation and export compute with: finite where present, and positive where they
# divide. The mass statistics may be None (a pretraining checkpoint has none); the pixel scale may not.
META_NUMBERS = {"pixel_scale": "positive", "mass_mean": "finite", "mass_std": "positive"}
MAY_BE_NONE = ("mass_mean", "mass_std")


def _checked_meta(where: str, meta: dict) -> dict:
  """``meta`` (a dict: ``integrity.restore_verified`` checks that), its META_NUMBERS checked.

  Raises:
    CheckpointDamagedError: naming the field and the value found.
  """
  for key, kind in META_NUMBERS.items():
    if key not in meta or (meta[key] is None and key in MAY_BE_NONE):
      continue
    value = meta[key]
    if not (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and math.isfinite(value)
      and (kind == "finite" or value > 0)
    ):
      raise CheckpointDamagedError(
        f"{where}: damaged checkpoint: meta '{key}' is {str(value)[:60]!r}, expected a {kind} number"
      )
  return dict(meta)


def _element_count(arrays: dict[str, dict]) -> int:
  return sum(math.prod(value.shape) for named in arrays.values() for value in named.values())


def build_from_meta(
  directory: str, meta: dict, arrays: dict[str, dict], *, select=lambda name: True
) -> models.L2ViT:
  """The L2ViT of ``meta["model_config"]``, built only once it is known to fit ``arrays``.

  A meta is JSON that a damaged or edited checkpoint can make anything, and a constructor run on
  such values fails in any way (KeyError, TypeError, ValueError) or allocates whatever sizes they
  name. So, before any array is allocated: ``model_config`` must be an object whose ``depth`` (the
  constructor's one loop) is an integer no larger than the checkpoint's number of arrays (each block
  holds a dozen); the model is then built abstractly (``nnx.eval_shape``: shapes, no arrays), where
  a refusing constructor means a damaged meta; the ``select``ed names must have the checkpoint's
  shapes; and the whole model may hold at most twice the checkpoint's elements (the heads a backbone
  restore leaves fresh are a small part of any model). Only then is it built for real, at about the
  size of the checkpoint.

  Raises:
    CheckpointDamagedError: the meta describes no model.
    CheckpointMismatchError: the model it describes does not fit the checkpoint's arrays.
  """
  where = f"{directory}: damaged checkpoint: meta 'model_config'"
  config = meta.get("model_config")
  if not isinstance(config, dict):
    raise CheckpointDamagedError(f"{where} is {str(config)[:60]!r}, expected an object of L2ViT arguments")
  depth, num_arrays = config.get("depth", 0), sum(len(named) for named in arrays.values())
  if not (isinstance(depth, int) and not isinstance(depth, bool) and 0 <= depth <= num_arrays):
    raise CheckpointDamagedError(
      f"{where} has depth {str(depth)[:40]!r}, expected an integer from 0 "
      f"to {num_arrays} (the checkpoint's number of arrays)"
    )
  try:
    abstract = nnx.eval_shape(lambda: build.build_l2vit(config))
  except (TypeError, ValueError, KeyError, ZeroDivisionError) as error:
    raise CheckpointDamagedError(
      f"{where} describes no model: {type(error).__name__}: {errors.one_line(error, 200)}"
    ) from None
  shapes = model_arrays(abstract)
  for group in shapes:
    problem = describe_mismatch(
      {k: v for k, v in shapes[group].items() if select(k)},
      {k: v for k, v in arrays.get(group, {}).items() if select(k)},
      context=f"{directory}: checkpoint does not fit the model in its meta ({group})",
    )
    if problem:
      raise CheckpointMismatchError(problem)
  if _element_count(shapes) > 2 * _element_count(arrays):
    raise CheckpointDamagedError(
      f"{where} describes a model of {_element_count(shapes)} elements, more "
      f"than twice the checkpoint's {_element_count(arrays)}"
    )
  return build.build_l2vit(config)


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
    return _checked_meta(paths.join(path, str(step)), integrity.restore_verified(manager, step)["meta"])


def restore_model_checkpoint(directory: str) -> tuple[nnx.Module, dict]:
  """Rebuilds the L2ViT described by the checkpoint's meta and loads its weights, in eval mode."""
  arrays, meta = read_model_checkpoint(directory)
  model = build_from_meta(directory, meta, arrays)
  load_model_arrays(model, arrays, context=f"{directory}: checkpoint does not fit the model in its meta")
  model.eval()
  return model, meta


def _backbone_arrays(arrays: dict[str, dict]) -> dict[str, dict]:
  """A checkpoint's arrays named as an L2ViT names them: a SimCLR checkpoint's backbone is the
  ContrastiveModel's encoder."""
  prefix = "encoder/"
  if any(name.startswith(prefix) for name in arrays["params"]):
    arrays = {
      group: {name[len(prefix) :]: value for name, value in named.items() if name.startswith(prefix)}
      for group, named in arrays.items()
    }
  return arrays


def _is_backbone(name: str) -> bool:
  return name.split("/")[0] not in build.HEAD_NAMES


def _load_backbone(model: models.L2ViT, directory: str, arrays: dict[str, dict], meta: dict) -> None:
  load_model_arrays(
    model,
    arrays,
    select=_is_backbone,
    context=f"{directory}: pretrained backbone (model_config {meta.get('model_config')}) does not fit "
    "the model being finetuned",
  )
  logging.info("Initialised the backbone from %s (heads left fresh).", directory)


def load_backbone_weights(model: models.L2ViT, directory: str) -> dict:
  """The pretrain→finetune bridge: backbone weights from a SimCLR, MAE, finetuned or imported
  checkpoint into ``model`` in place; its heads (``build.HEAD_NAMES``) stay as they are. Returns the
  checkpoint's meta."""
  arrays, meta = read_model_checkpoint(directory)
  _load_backbone(model, directory, _backbone_arrays(arrays), meta)
  return meta


def restore_backbone(directory: str) -> tuple[models.L2ViT, dict]:
  """The L2ViT backbone of any checkpoint, built from its meta's ``model_config`` (``build_from_meta``),
  in eval mode; its heads stay at their fresh initialisation (probes use ``features`` only)."""
  arrays, meta = read_model_checkpoint(directory)
  arrays = _backbone_arrays(arrays)
  backbone = build_from_meta(directory, meta, arrays, select=_is_backbone)
  _load_backbone(backbone, directory, arrays, meta)
  backbone.eval()
  return backbone, meta
