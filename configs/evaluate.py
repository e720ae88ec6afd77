"""Evaluates restored checkpoints on the test split and writes a side-by-side report.

  python -m l2vit_jax.main --config=configs/evaluate.py --workdir=runs/report \
      --config.checkpoints=pretrained=runs/finetune,scratch=runs/scratch

Each checkpoint directory is a training workdir (its best/ checkpoint is used) or the output of
scripts/convert_torch_checkpoint.py. Outputs: runs/report/<name>/{metrics.json,predictions.npz,*.png}
and runs/report/report.md.

config.data.labelled_path and config.data.split_seed must give the split each finetuned checkpoint was
trained with (recorded in its meta); another one could hold training jets and is refused, naming the
seed or file to use. --config.split=all (every jet) is not checked.

With --config.probe=True, each checkpoint also gets rows <name>_linear_probe and <name>_knn: frozen-
feature probes of its backbone (l2vit_jax/evaluation/probes.py), which also evaluate pretraining (SimCLR/MAE)
workdirs; for those the probe rows are the only rows.

Every report also has the row physics_bdt, the physics baseline: boosted decision trees on jet-
substructure observables computed from the pixels (l2vit_jax/baselines/); --config.physics_baseline=False
leaves it out.
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
  # Row physics_bdt: boosted trees on jet observables (l2vit_jax/baselines/), fitted on the train split.
  config.physics_baseline = True
  config.probe = False  # also linear-probe and kNN rows on each checkpoint's frozen backbone
  config.probe_k = 20  # kNN neighbours
  return config
