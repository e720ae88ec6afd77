"""The PyTorch reference as the benchmark runs it: forward + loss + backward + grad-norm clipping +
AdamW, and ``no_grad`` inference, for the same config as ours (``ours.bench_config``).

The model is ``interop.torch_reference``'s, with the config's model fields; the optimizer has the
recipe's learning rates (heads and backbone apart, as ``training.optimizer`` groups them), weight
decay and clipping norm; the loss is the finetune loss on the same standardised masses. It runs on
the device our JAX runs on (CUDA when JAX runs on a GPU and PyTorch sees one, else the CPU), in
bfloat16 under ``torch.autocast`` when ``dtype`` is bfloat16, the way a PyTorch user runs mixed
precision (float32 parameters and optimizer, as ours). torch is imported only here, on first use.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Callable, ContextManager

import jax
import numpy as np

from l2vit_jax.bench import ours
from l2vit_jax.interop import torch_reference
from l2vit_jax.models import build

# Constructor arguments of the reference model, read from ``config.model``.
TORCH_MODEL_FIELDS = (
  "in_channels",
  "img_size",
  "patch_size",
  "embed_dim",
  "depth",
  "num_heads",
  "mlp_ratio",
  "num_classes",
  "drop_rate",
  "drop_path_rate",
  "lcm_kernel",
)


def _no_scope(_: str) -> ContextManager:
  return contextlib.nullcontext()


class TorchTrainer:
  """The reference's train step and inference on ``batch`` (``ours.fake_batch``), run once each.

  ``scope(name)`` wraps the train step's 'loss' (forward and loss) and 'optimizer' parts: no-ops while
  timing; ``profiling.torch_scopes`` makes them profiler ranges named like ours.
  """

  def __init__(self, args, batch: dict[str, np.ndarray], dtype: str = "float32", device: str = "cpu"):
    torch = torch_reference.require_torch()
    self.torch = torch
    self.device = torch.device(device)
    self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    self.scope: Callable[[str], ContextManager] = _no_scope
    config = ours.bench_config(args, dtype)
    self.model = torch_reference.build_torch_l2vit(
      **{field: config.model[field] for field in TORCH_MODEL_FIELDS}
    ).to(self.device)
    groups = {"head": [], "backbone": []}
    for name, parameter in self.model.named_parameters():
      groups["head" if name.split(".")[0] in build.HEAD_NAMES else "backbone"].append(parameter)
    backbone_rate = config.backbone_learning_rate or config.learning_rate
    self.optimizer = torch.optim.AdamW(
      [
        {"params": groups["head"], "lr": config.learning_rate},
        {"params": groups["backbone"], "lr": backbone_rate},
      ],
      betas=(0.9, 0.999),
      eps=1e-8,
      weight_decay=config.weight_decay,
    )
    self.grad_clip_norm = config.grad_clip_norm
    self.loss_weights = (config.loss.classification_weight, config.loss.regression_weight)
    mean, std = ours.mass_statistics(batch)
    self.batch = len(batch["image"])
    self.images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(self.device)
    self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)
    self.mass = torch.from_numpy((batch["mass"] - mean) / std).to(self.device)
    self.run_train(1)
    self.run_inference(1)

  def _precision(self) -> ContextManager:
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return self.torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

  def _finish(self) -> None:
    if self.device.type == "cuda":  # kernels run asynchronously: the round's time needs them done
      self.torch.cuda.synchronize(self.device)

  def run_train(self, count: int) -> None:
    functional = self.torch.nn.functional
    classification, regression = self.loss_weights
    self.model.train()
    for _ in range(count):
      with self.scope("loss"), self._precision():
        logits, mass = self.model(self.images)
        loss = classification * functional.cross_entropy(
          logits.float(), self.labels
        ) + regression * functional.smooth_l1_loss(mass[:, 0].float(), self.mass)
      loss.backward()
      with self.scope("optimizer"):
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
    self._finish()

  def run_inference(self, count: int) -> None:
    self.model.eval()
    with self.torch.no_grad(), self._precision():
      for _ in range(count):
        self.model(self.images)
    self._finish()


def torch_device() -> str:
  """Where the PyTorch reference runs: on the GPU when ours does (and PyTorch sees one), else the CPU."""
  torch = torch_reference.require_torch()
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def fitting_torch_trainer(args, batch: dict[str, np.ndarray], dtype: str, device: str) -> TorchTrainer:
  """The PyTorch reference at our batch, or at half of it (and half again) where that runs out of the
  device's memory: eager PyTorch keeps more activations than XLA's plan for the same batch."""
  torch = torch_reference.require_torch()
  out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
  size = len(batch["image"])
  while True:
    try:
      return TorchTrainer(args, {key: value[:size] for key, value in batch.items()}, dtype, device)
    except out_of_memory:
      if size == 1:
        raise
      gc.collect()
      torch.cuda.empty_cache()
      size //= 2
      print(
        f"[benchmark] PyTorch ran out of device memory; retrying at batch {size}", file=sys.stderr, flush=True
      )
