"""Tags every jet of a file with a finetuned checkpoint: P(top) and mass (GeV), in file order.

  python -m l2vit_jax.main --config=configs/predict.py --workdir=runs/predict \
      --config.checkpoint=runs/finetune --config.data.input_path=data/Dataset_Specific_Unlabelled.h5

The input is an HDF5 jet file (``jet``; labels, if any, are ignored) or a ``.sparse`` file; the
checkpoint a finetuning workdir (its best/ checkpoint) or the output of
scripts/convert_torch_checkpoint.py. Output: runs/predict/predictions.h5 with ``index``, ``prob_top``
and ``mass`` per jet and the checkpoint's identity as attributes (docs/predict.md).

Images are streamed one global batch (eval_batch_size) at a time, so memory does not grow with the
file; finished chunks of chunk_size jets are kept, so rerunning the same command after a kill goes on
where it stopped. The checkpoint's pixel scale and mass standardisation are used (config.data.pixel_scale
is not read). Runs on every local device and, with the usual multi-process settings, on every process.
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "predict"
  config.checkpoint = "runs/finetune"
  config.data.input_path = config_lib.UNLABELLED_FILE
  config.eval_batch_size = 128  # global, over all devices and processes
  # Jets per saved chunk (rounded up to whole batches): what a kill can cost, and the resume granularity.
  config.chunk_size = 4096
  config.tensorboard = False  # no report to show
  return config
