"""One ordered pass of a jitted function over every record of a source, gathered on every process.

Shared by ``evaluate.predict`` (class and mass outputs) and ``probes.extract_features`` (pooled
backbone features): both need each record exactly once, in index order, from a sharded forward pass.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from l2vit_jax.runtime import console, sharding
from l2vit_jax.data import pipeline


def map_source(
  forward: Callable[[jax.Array], dict[str, jax.Array]],
  source: Sequence[dict],
  *,
  pixel_scale: float,
  batch_size: int,
  mesh,
  description: str = "inference",
) -> dict[str, np.ndarray]:
  """Applies ``forward`` to the images of ``source`` and returns its outputs per record.

  Args:
    forward: global image batch (B, H, W, C), sharded along ``data`` → dict of per-example arrays
      (leading axis B). Usually a jitted closure over replicated model state.
    source: records with ``image`` and ``index`` (an ``HDF5Source`` or ``SparseSource``).
    pixel_scale: images are divided by this, as in training.
    batch_size: global batch; the pass is padded to whole global batches (padding is dropped here).
    mesh: the device mesh; every process must call this together (the forward is collective).
    description: names the pass in its progress bar (a terminal on process 0) and in the line that
      logs its rate at the end (``runtime.console.ProgressBar``).

  Returns:
    ``{"index": (N,) int64, **forward outputs (N, ...)}`` for every record of ``source`` exactly
    once, sorted by index, identical on every process.
  """
  per_process = batch_size // jax.process_count()
  dataset = pipeline.make_eval_dataset(
    source,
    batch_size=per_process,
    pixel_scale=pixel_scale,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  gathered: dict[str, list[np.ndarray]] = {}
  with console.ProgressBar(len(source), description, "jet") as bar:
    for batch in dataset:
      device = sharding.global_batch({k: batch[k] for k in ("image", "index", "mask")}, mesh)
      outputs = {"index": device["index"], "mask": device["mask"], **forward(device["image"])}
      for key, value in outputs.items():
        gathered.setdefault(key, []).append(sharding.to_host(value))
      bar.update(min(batch_size, len(source) - bar.done))  # every process walks the same global batches
  out = {k: np.concatenate(v) for k, v in gathered.items()}
  keep = out.pop("mask") == 1
  order = np.argsort(out["index"][keep], kind="stable")
  return {k: v[keep][order] for k, v in out.items()}
