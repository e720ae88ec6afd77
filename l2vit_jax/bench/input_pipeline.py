"""The 'pipeline' section: the training input paths, physics (finetuning) and SimCLR augmentation, on
synthetic jets: HDF5 and ``.sparse`` read and augmented densely on the host ('formats'), and
``.sparse`` shipped sparse and densified + augmented inside the step ('sparse_device', whose images
are bit-identical); the conversion's time and the files' sizes.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from l2vit_jax import config_lib
from l2vit_jax.data import device_augment, pipeline, sources, sparse, synthetic
from l2vit_jax.training import recipes

# Without --tiny, the finetuning recipe's batch: per-batch costs amortise as in training.
FULL_BATCH = config_lib.RECIPES["finetune"]["batch_size"]


def wait_until_idle(poll: float = 0.2) -> None:
  """Returns once this process's threads (Grain's read-ahead) have stopped using CPU."""
  while True:
    cpu = time.process_time()
    time.sleep(poll)
    if time.process_time() - cpu < 0.01 * poll:
      return


def time_input_path(dataset, keys: tuple[str, ...], batches: int, batch: int) -> tuple[dict, dict]:
  """Images/s, host CPU per image (process_time: every thread, Grain's included) and host→device bytes
  per image of one training input path; also returns its last batch.

  CPU time runs from an idle process with a full read-ahead buffer to the same state again, so it
  counts exactly the batches taken (and nothing of an earlier path's leftover read-ahead).
  """
  iterator = iter(dataset)
  for _ in range(3):  # warm-up: threads, page cache, first memory maps
    last = next(iterator)
  wait_until_idle()
  cpu, start = time.process_time(), time.perf_counter()
  for _ in range(batches):
    last = next(iterator)
  seconds = time.perf_counter() - start
  wait_until_idle()
  cpu = time.process_time() - cpu
  images = batches * batch
  return {
    "img_per_s": images / seconds,
    "host_cpu_us_per_image": 1e6 * cpu / images,
    "host_to_device_bytes_per_image": sum(np.asarray(last[k]).nbytes for k in keys) / batch,
  }, last


def time_device_augmentation(augmentation: str, image_shape, shipped: dict, batch: int) -> float:
  """Microseconds per image of the jitted densify + augment (``device_augment.prepare_batch``)."""
  prepare = jax.jit(device_augment.prepare_batch(augmentation, image_shape))
  arrays = jax.device_put(shipped)
  jax.block_until_ready(prepare(arrays))
  repeats = 10
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(prepare(arrays))
  return 1e6 * (time.perf_counter() - start) / (repeats * batch)


def bench_pipeline(args) -> dict:
  batch = args.batch if args.tiny else FULL_BATCH
  results = {
    "images": args.pipeline_images,
    "image_size": args.img_size,
    "batch": batch,
    "timed_batches": args.pipeline_batches,
  }
  with tempfile.TemporaryDirectory(prefix="l2vit_benchmark_") as directory:
    h5_path = os.path.join(directory, "jets.h5")
    sparse_path = os.path.join(directory, "jets" + sparse.SUFFIX)
    synthetic.write_synthetic_hdf5(h5_path, args.pipeline_images, image_size=args.img_size, seed=0)
    start = time.perf_counter()
    summary = sparse.convert_hdf5(h5_path, sparse_path)
    results["conversion_seconds"] = time.perf_counter() - start
    results["hdf5_bytes"], results["sparse_bytes"] = summary["input_bytes"], summary["output_bytes"]
    results["size_ratio_hdf5_over_sparse"] = summary["input_bytes"] / summary["output_bytes"]
    results["nonzero_fraction"] = summary["nonzeros"] / (args.pipeline_images * args.img_size**2 * 8)
    for task, augmentation in (("finetune", "physics"), ("simclr", "simclr")):
      keys = recipes.BATCH_KEYS[task]
      paths = {
        "hdf5": (h5_path, False, keys),
        "sparse": (sparse_path, False, keys),
        "sparse_device": (sparse_path, True, device_augment.batch_keys(keys, augmentation)),
      }
      measured = {}
      for name, (path, on_device, shipped_keys) in paths.items():
        source = sources.open_source(path, labelled=True)
        dataset = pipeline.make_train_dataset(
          source, batch_size=batch, seed=0, augmentation=augmentation, device_augmentation=on_device
        )
        measured[name], last = time_input_path(dataset, shipped_keys, args.pipeline_batches, batch)
        if on_device:
          measured[name]["device_densify_augment_us_per_image"] = time_device_augmentation(
            augmentation, source.image_shape, {k: last[k] for k in shipped_keys}, batch
          )
      device = measured.pop("sparse_device")
      device["bytes_fraction_of_dense"] = (
        device["host_to_device_bytes_per_image"] / measured["sparse"]["host_to_device_bytes_per_image"]
      )
      if augmentation == "physics":  # 'formats' keeps the layout earlier reports had
        results.update(augmentation=augmentation, formats=measured, sparse_device=device)
      else:
        results[augmentation] = {**measured, "sparse_device": device}
  results["sparse_speedup_over_hdf5"] = (
    results["formats"]["sparse"]["img_per_s"] / results["formats"]["hdf5"]["img_per_s"]
  )
  return results
