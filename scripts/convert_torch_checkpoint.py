r"""Converts a checkpoint of the PyTorch original into an Orbax checkpoint of the NNX L2ViT.

  python scripts/convert_torch_checkpoint.py --input=best_model.pt --workdir=runs/imported

The architecture is inferred from tensor shapes; the result lands in WORKDIR/best/0 with its meta
(model config, pixel scale 1.0, mass standardisation, training history, source), so evaluation can
point at WORKDIR directly. Needs PyTorch (CPU wheel is enough): pip install torch.

The workdir must hold no model yet: ``best/`` keeps one step and Orbax keeps the newest one added, so
saving step 0 into a trained workdir's ``best/`` would delete its best model, and a workdir with only
``checkpoints/`` (a training run) would get an unrelated ``best/`` that evaluation prefers over its
own model. Such a workdir is refused and left as it is. The check and the save run under the workdir
lock (``checkpoint.workdir_lock``), so a training run cannot start writing in between, and a workdir
in use by a live run is refused too. The PyTorch file is read and checked first, so a bad input leaves
no trace.

A SimCLR checkpoint's encoder is converted; its projection head is checked and imported but not
saved, since finetuning discards it.
"""

import os
import sys

from absl import app
from absl import flags

from l2vit_jax.runtime import process_setup

process_setup.configure_platforms()  # before JAX starts a backend: no libtpu start-up noise off a TPU VM

from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.checkpoint import model_io, naming, workdir_lock  # pylint: disable=wrong-import-position
from l2vit_jax import models  # pylint: disable=wrong-import-position
from l2vit_jax.interop import torch_import  # pylint: disable=wrong-import-position
from l2vit_jax.runtime import paths  # pylint: disable=wrong-import-position

_INPUT = flags.DEFINE_string(
  "input", None, "PyTorch checkpoint (.pt) written by the original.", required=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory to write the Orbax checkpoint to.", required=True)
_PIXEL_SCALE = flags.DEFINE_float(
  "pixel_scale",
  1.0,
  "Pixels are divided by this before the model sees them: 255 for weights "
  "trained on pixels / 255, 1 (the default) for raw pixels; stored in the meta.",
)
_TRUST_PICKLE = flags.DEFINE_bool(
  "trust_pickle", False, "Load with torch.load(weights_only=False). Only for trusted files."
)


def refuse_a_workdir_with_a_model(workdir: str) -> None:
  """Raises ConfigError if ``workdir`` holds a saved model (a step in ``best/`` or ``checkpoints/``)."""
  try:
    found, step = model_io.find_model_checkpoint(workdir)
  except errors.MissingCheckpointError:
    return
  raise errors.ConfigError(
    f"{paths.join(found, str(step))}: --workdir={workdir} already holds a model, which importing would "
    "replace; expected a new or empty workdir (give another --workdir)"
  )


def save_into_new_workdir(workdir: str, model, meta: dict) -> None:
  """Saves the imported ``model`` into ``workdir`` under its lock, if the workdir holds no model."""
  paths.makedirs(workdir)
  lock = workdir_lock.lock_workdir(workdir)
  try:
    refuse_a_workdir_with_a_model(workdir)
    model_io.save_model_checkpoint(workdir, model, meta)
  finally:
    if lock is not None:
      lock.release()


def main(argv):
  del argv
  try:
    model, projector, meta = torch_import.import_checkpoint(_INPUT.value, trust_pickle=_TRUST_PICKLE.value)
  except (errors.CheckpointImportError, ImportError) as error:
    sys.exit(f"error: {error}")
  meta["pixel_scale"] = _PIXEL_SCALE.value
  try:
    save_into_new_workdir(_WORKDIR.value, model, meta)
  except errors.UserError as error:  # a workdir in use or holding a model; a full disk, a write error
    sys.exit(f"error: {error}")
  print(f"imported {_INPUT.value}: L2ViT {meta['model_config']}, {models.param_count(model):,} parameters")
  if projector is not None:
    print(f"SimCLR projector ({models.param_count(projector):,} parameters) checked, not saved")
  print(f"saved to {os.path.join(_WORKDIR.value, naming.BEST_DIR)}")


if __name__ == "__main__":
  app.run(main)
