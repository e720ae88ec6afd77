"""Shared pieces of the python config files in ``configs/``: the base config, model sizes and the
training recipes of the original (``docs/design.md``, "Training recipes").

A recipe is the set of top-level training fields one stage sets (batch size, epochs, learning rates,
...). The single-stage configs apply one to the base config; the quickstart and the study keep one per
stage (``pretrain_simclr``, ``pretrain_mae``, ``finetune``, ``scratch``) and
``experiments.stages.stage_config`` applies it when the stage runs.
"""

from __future__ import annotations

import ml_collections

LABELLED_FILE = "data/Dataset_Specific_labelled_full_only_for_2i.h5"
UNLABELLED_FILE = "data/Dataset_Specific_Unlabelled.h5"


def model_config(size: str = "default") -> ml_collections.ConfigDict:
  """L2ViT constructor arguments. 'default' is the original (5,111,579 parameters)."""
  config = ml_collections.ConfigDict(
    dict(
      in_channels=8,
      img_size=125,
      patch_size=5,
      embed_dim=256,
      depth=6,
      num_heads=4,
      mlp_ratio=4.0,
      num_classes=2,
      drop_rate=0.1,
      drop_path_rate=0.1,
      lcm_kernel=7,
      attention="linear",
      dtype="float32",
    )
  )
  if size == "tiny":  # for the quickstart on 2 CPU cores and for tests
    config.update(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
  elif size != "default":
    raise ValueError(f"unknown model size {size!r}; use 'default' or 'tiny'")
  return config


# The original's recipes (SimCLR: AdamW 3e-4, wd 0.05, warmup 5 of 100 epochs; finetuning: heads 1e-4,
# backbone 5e-5, wd 0.01, warmup 3 of 50; scratch: 3e-4 everywhere). Masked-image pretraining uses
# SimCLR's schedule.
RECIPES = {
  "simclr": dict(
    batch_size=128,
    num_epochs=100,
    warmup_epochs=5,
    learning_rate=3e-4,
    weight_decay=0.05,
    early_stopping_patience=15,
  ),
  "mae": dict(
    batch_size=128,
    num_epochs=100,
    warmup_epochs=5,
    learning_rate=3e-4,
    weight_decay=0.05,
    early_stopping_patience=15,
  ),
  "finetune": dict(
    batch_size=64,
    num_epochs=50,
    warmup_epochs=3,
    learning_rate=1e-4,
    backbone_learning_rate=5e-5,
    weight_decay=0.01,
    early_stopping_patience=15,
  ),
  "scratch": dict(
    batch_size=64,
    num_epochs=50,
    warmup_epochs=3,
    learning_rate=3e-4,
    weight_decay=0.01,
    early_stopping_patience=15,
  ),
}


def recipe(name: str, **overrides) -> ml_collections.ConfigDict:
  """The fields of recipe ``name`` (``RECIPES``) with ``overrides``; keys may be dotted
  ('data.train_repeats') to name a nested field."""
  return ml_collections.ConfigDict({**RECIPES[name], **overrides})


def apply_recipe(config: ml_collections.ConfigDict, fields) -> ml_collections.ConfigDict:
  """Sets ``fields`` (a recipe, or any mapping of possibly dotted keys) into ``config``, in place."""
  for key, value in fields.items() if hasattr(fields, "items") else fields:
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


# Jet generators the multi-stage runs can write their data with (experiments/stages.py).
GENERATORS = ("pythia", "synthetic")


def generated_data_config(
  *, num_labelled: int, num_unlabelled: int, data_seed: int = 0, generator: str = "pythia"
) -> ml_collections.ConfigDict:
  """What the multi-stage runs generate under WORKDIR/data when no data files are given: a labelled
  and an unlabelled file of this many jets (the unlabelled one from seed ``data_seed + 1``).

  ``generator`` 'pythia' (default): Pythia 8 showers and FastJet jets in a CMS-like detector model
  (``data/pythia.py``, ``data/jet_files.py``); 'synthetic': the fast toy generator
  (``data/synthetic.py``), for tests that need speed. ``workers``: generation processes (0: one per
  core); ``signal_fraction``: top jets in the unlabelled file; ``pt_min``/``pt_max``: the jet pT
  window (GeV).
  """
  return ml_collections.ConfigDict(
    dict(
      num_labelled=num_labelled,
      num_unlabelled=num_unlabelled,
      data_seed=data_seed,
      generator=generator,
      workers=0,
      signal_fraction=0.5,
      pt_min=400.0,
      pt_max=600.0,
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """Fields every task reads; task configs override what differs."""
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.seed = 0
  # Key implementation for dropout, drop-path and MAE masks: 'auto' is XLA's RBG generator ('rbg') on
  # TPU and JAX's default (threefry) elsewhere (training.steps.PRNG_IMPL_BY_PLATFORM); or any jax.random impl.
  config.prng_impl = "auto"
  # How the model's blocks compile: 'auto' scans them (one lax.scan, XLA compiles one block) on TPU and
  # unrolls them elsewhere (training.steps.SCAN_BLOCKS_PLATFORMS), or 'on' / 'off'. A scanned step
  # keeps for its backward pass what this policy saves (models.l2vit.REMAT_POLICIES):
  # 'nothing_saveable' recomputes each block's forward (a quarter more FLOPs than the unrolled step, a
  # quarter of its memory, the least HBM traffic); 'lcm_norm_saveable' also keeps the LCM's BatchNorm
  # output and compiles in a fifth less time, for more HBM traffic (the same bound for finetuning at 16
  # images per v5e chip, up to a fifth slower bound with more images per chip); '' saves everything and
  # compiles fastest (docs/performance.md, "Compile time").
  config.scan_blocks = "auto"
  config.remat_policy = "nothing_saveable"

  config.data = ml_collections.ConfigDict()
  config.data.labelled_path = LABELLED_FILE
  config.data.unlabelled_path = UNLABELLED_FILE
  config.data.pixel_scale = 1.0  # images are divided by this; stored with every checkpoint
  config.data.split_seed = 42
  config.data.unlabelled_val_fraction = 0.05  # held out for SimCLR's validation loss
  config.data.worker_count = 0  # Grain mp_prefetch workers; 0 reads in the main process
  # Training batches from a .sparse file travel to the device sparse (≈2 % of the dense bytes) and are
  # densified and augmented inside the jitted step, bit-identical to host augmentation: 'auto' (on for
  # .sparse, off for HDF5), 'on' (refuses HDF5) or 'off' (dense host augmentation).
  config.data.device_augmentation = "auto"
  # Finetuning on a labelled subset: this many train-split jets (0: all), a stratified prefix of the
  # ordering drawn with train_subset_seed (data.split.nested_subsets); validation and test stay whole.
  config.data.train_subset = 0
  config.data.train_subset_seed = 0
  # Passes over the (subset of the) train split per epoch: > 1 gives a few-jet subset enough steps per
  # epoch without validating and checkpointing after every step.
  config.data.train_repeats = 1

  config.model = model_config()

  config.batch_size = 64  # global, over all devices and processes
  config.eval_batch_size = 128
  config.num_epochs = 50
  config.warmup_epochs = 3
  config.learning_rate = 3e-4  # heads (and everything, unless backbone_learning_rate is set)
  config.backbone_learning_rate = ml_collections.FieldReference(None, field_type=float)
  config.end_learning_rate = 1e-6
  config.weight_decay = 0.01
  config.grad_clip_norm = 1.0
  config.early_stopping_patience = 15

  config.loss = ml_collections.ConfigDict()
  config.loss.classification_weight = 1.0
  config.loss.regression_weight = 1.0
  config.loss.temperature = 0.5  # SimCLR NT-Xent
  config.loss.projection_dim = 128

  config.mae = ml_collections.ConfigDict(
    dict(  # masked-image pretraining (task 'mae')
      mode="mask", mask_ratio=0.6, nonzero_weight=10.0, noise_relative_std=0.2, target_transform="log1p"
    )
  )

  # Frozen-feature probes during SimCLR/MAE pretraining (evaluation/probes.py): at every every_epochs-th
  # validation, a linear probe and kNN on the encoder's features of num_train train-split jets of this
  # labelled file, scored on num_val validation-split jets; logged as probe/* in metrics.jsonl.
  # An empty labelled_path turns it off.
  config.online_probe = ml_collections.ConfigDict(
    dict(labelled_path="", num_train=512, num_val=256, every_epochs=1, k=20, seed=0)
  )

  config.init_from = ""  # a SimCLR workdir whose backbone initialises finetuning
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  config.keep_checkpoints = 3
  config.stop_after_steps = 0  # >0: stop (with a checkpoint) after this many steps, to resume later
  # True: a step with a non-finite loss or gradient is discarded (counted and logged) instead of stopping
  # the run with DivergenceError.
  config.skip_nonfinite_steps = False
  # TensorBoard events in WORKDIR/tensorboard/ (every metrics.jsonl scalar and the config as text), and
  # a report's figures as images in REPORT_DIR/tensorboard/.
  config.tensorboard = True
  # 'START,END': a jax.profiler trace of those steps (1-based, both included) in WORKDIR/profile/;
  # '' (default): none.
  config.profile_steps = ""
  # XLA's persistent compilation cache (runtime.compilation.resolve_compilation_cache): 'auto' is
  # $JAX_COMPILATION_CACHE_DIR, else $L2VIT_COMPILATION_CACHE, else ~/.cache/l2vit_jax/xla (the study:
  # WORKDIR/cache/xla when run from code); a folder (local or gs://) uses that one; '' turns it off.
  config.compilation_cache = "auto"
  return config
