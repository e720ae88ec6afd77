"""Evaluates restored checkpoints on the test split and writes a side-by-side report.

  python -m l2vit_jax.main --config=configs/evaluate.py --workdir=runs/report \
      --config.checkpoints=pretrained=runs/finetune,scratch=runs/scratch

Each checkpoint directory is a training workdir (its best/ checkpoint is used) or the output of
scripts/convert_torch_checkpoint.py. Outputs: runs/report/<name>/{metrics.json,predictions.npz,*.png}
and runs/report/report.md.
"""

from l2vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.task = "evaluate"
  config.checkpoints = "pretrained=runs/finetune,scratch=runs/scratch"
  config.split = "test"  # test | val | train | all (of config.data.labelled_path)
  config.eval_batch_size = 128
  config.bootstrap_samples = 1000
  config.report_title = "L2ViT: SimCLR-pretrained vs scratch"
  config.report_notes = ""
  return config
