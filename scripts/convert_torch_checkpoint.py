r"""Converts a checkpoint of the PyTorch original into an Orbax checkpoint of the NNX L2ViT.

  python scripts/convert_torch_checkpoint.py --input=best_model.pt --workdir=runs/imported

The architecture is inferred from tensor shapes; the result lands in WORKDIR/best/0 with its meta
(model config, pixel scale 1.0, mass standardisation, training history, source), so evaluation can
point at WORKDIR directly. Needs PyTorch (CPU wheel is enough): pip install torch.

A SimCLR checkpoint's encoder is converted; its projection head is checked and imported but not
saved, since finetuning discards it.
"""

import os
import sys

from absl import app
from absl import flags

from l2vit_jax.runtime import host

host.configure_platforms()  # before JAX starts a backend: no libtpu start-up noise off a TPU VM

from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.checkpoint import model_io, naming  # pylint: disable=wrong-import-position
from l2vit_jax import models  # pylint: disable=wrong-import-position
from l2vit_jax.interop import torch_import  # pylint: disable=wrong-import-position

_INPUT = flags.DEFINE_string('input', None, 'PyTorch checkpoint (.pt) written by the original.',
                             required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory to write the Orbax checkpoint to.',
                               required=True)
_PIXEL_SCALE = flags.DEFINE_float(
    'pixel_scale', 1.0, 'Pixels are divided by this before the model sees them: 255 for weights '
    'trained on pixels / 255, 1 (the default) for raw pixels; stored in the meta.')
_TRUST_PICKLE = flags.DEFINE_bool(
    'trust_pickle', False, 'Load with torch.load(weights_only=False). Only for trusted files.')


def main(argv):
  del argv
  try:
    model, projector, meta = torch_import.import_checkpoint(_INPUT.value,
                                                            trust_pickle=_TRUST_PICKLE.value)
  except (errors.CheckpointImportError, ImportError) as error:
    sys.exit(f'error: {error}')
  meta['pixel_scale'] = _PIXEL_SCALE.value
  try:
    model_io.save_model_checkpoint(_WORKDIR.value, model, meta)
  except errors.CheckpointSaveError as error:  # a full disk or a write error
    sys.exit(f'error: {error}')
  print(f'imported {_INPUT.value}: L2ViT {meta["model_config"]}, '
        f'{models.param_count(model):,} parameters')
  if projector is not None:
    print(f'SimCLR projector ({models.param_count(projector):,} parameters) checked, not saved')
  print(f'saved to {os.path.join(_WORKDIR.value, naming.BEST_DIR)}')


if __name__ == '__main__':
  app.run(main)
