"""The 'model' and 'precision' sections: our real train step and eval-mode forward (``ours``), timed
in paired rounds against the PyTorch reference (``pytorch``) or float32 against bfloat16.

Every ours/theirs ratio is per round and summarized over rounds (``timing``); with a chip's published
peak (``fill.chip``), the analytic FLOPs' rate is reported as MFU.
"""

from __future__ import annotations

import jax

from l2vit_jax.bench import fill, ours, pytorch, timing


def _torch_record(theirs: pytorch.TorchTrainer, rounds: dict, seconds: dict) -> dict:
  torch = theirs.torch
  batch = theirs.batch  # ours unless PyTorch ran out of memory at it
  return {
    "version": torch.__version__,
    "threads": torch.get_num_threads(),
    "device": str(theirs.device),
    "batch": batch,
    "autocast_dtype": str(theirs.autocast_dtype) if theirs.autocast_dtype else None,
    "train_img_per_s": batch / seconds["torch_train"],
    "inference_img_per_s": batch / seconds["torch_inference"],
    "train_img_per_s_rounds": timing.rates(batch, rounds["torch_train"]),
    "inference_img_per_s_rounds": timing.rates(batch, rounds["torch_inference"]),
  }


def bench_model(args, matmul: dict | None) -> dict:
  """Ours (and PyTorch's, unless ``--no-torch`` or softmax attention) img/s, compile time, FLOPs,
  memory; ``matmul`` (the 'matmul' section, if it ran) gives the machine's practical peak."""
  batch = ours.fake_batch(args)
  mine = ours.JaxTrainer(args, args.dtype, batch)
  rss_after_jax = timing.max_rss_mib()
  runners = {"jax_train": mine.run_train, "jax_inference": mine.run_inference}
  torch_error = None
  use_torch = not args.no_torch and args.attention == "linear"
  if use_torch:
    try:
      theirs = pytorch.fitting_torch_trainer(args, batch, args.dtype, pytorch.torch_device())
      runners.update(torch_train=theirs.run_train, torch_inference=theirs.run_inference)
    except ImportError as error:
      torch_error = str(error)
  # An untimed round first: the heap settles once both models have allocated beside each other.
  timing.paired_rounds(runners, 1, 1)
  page_faults: dict[str, list[float]] = {}
  rounds = timing.paired_rounds(runners, args.steps, args.pairs, page_faults)
  seconds = {name: timing.summarize(values)["median"] for name, values in rounds.items()}
  forward_flops = ours.analytic_forward_flops(args)
  train_flop_rate = 3 * forward_flops * args.batch / seconds["jax_train"]
  result = {
    "config": {
      **ours.model_record(args),
      "batch": args.batch,
      "dtype": args.dtype,
      "attention": args.attention,
      "depthwise_implementation": args.depthwise_implementation,
      "depthwise_resolved": mine.depthwise_implementation,
    },
    "pairs": args.pairs,
    "steps_per_round": args.steps,
    "train_img_per_s": args.batch / seconds["jax_train"],  # medians over rounds
    "inference_img_per_s": args.batch / seconds["jax_inference"],
    "train_img_per_s_rounds": timing.rates(args.batch, rounds["jax_train"]),
    "inference_img_per_s_rounds": timing.rates(args.batch, rounds["jax_inference"]),
    "train_step_seconds": seconds["jax_train"],
    # Faulting in fresh pages every step cost ~1 s before the allocator was tuned (runtime/process_setup.py).
    "minor_page_faults_per_step": {name: timing.summarize(v) for name, v in page_faults.items()},
    "train_compile_seconds": mine.compile_seconds,
    "inference_compile_seconds": mine.forward_compile_seconds,
    "analytic_train_gflop_per_image": 3 * forward_flops / 1e9,
    "analytic_inference_gflop_per_image": forward_flops / 1e9,
    "xla_cost_analysis_gflop_per_train_step": (mine.xla_flops_per_step or 0) / 1e9,
    "xla_cost_analysis_gflop_per_forward": (mine.xla_flops_per_forward or 0) / 1e9,
    "train_gflop_per_s": train_flop_rate / 1e9,
    "inference_gflop_per_s": forward_flops * args.batch / seconds["jax_inference"] / 1e9,
    "peak_rss_mib_after_jax": rss_after_jax,
    "peak_rss_mib": timing.max_rss_mib(),
    "device_memory": fill.device_memory(),
    "backend": jax.default_backend(),
  }
  if matmul:
    result["train_fraction_of_matmul_peak"] = train_flop_rate / matmul["flop_per_s"]
    result["inference_fraction_of_matmul_peak"] = result["inference_gflop_per_s"] * 1e9 / matmul["flop_per_s"]
  chip = fill.chip()
  if chip:  # MFU: the analytic FLOPs' rate over the chip's published dense bf16 peak
    result["published_peak_bf16_flops"] = chip.peak_bf16_flops
    result["published_peak_source"] = chip.source
    result["train_mfu"] = train_flop_rate / chip.peak_bf16_flops
    result["inference_mfu"] = result["inference_gflop_per_s"] * 1e9 / chip.peak_bf16_flops
  if "torch_train" in seconds:
    result["torch"] = _torch_record(theirs, rounds, seconds)
    if chip:
      for kind, passes in (("train", 3), ("inference", 1)):
        result["torch"][f"{kind}_mfu"] = (
          passes * forward_flops * result["torch"][f"{kind}_img_per_s"] / chip.peak_bf16_flops
        )
    for kind in ("train", "inference"):
      # Per image, so that the ratio stays a throughput ratio where PyTorch ran at a smaller batch.
      ratio = timing.ratio_summary(
        [t / theirs.batch for t in rounds[f"torch_{kind}"]], [t / args.batch for t in rounds[f"jax_{kind}"]]
      )
      result[f"ratio_{kind}_ours_over_torch"] = ratio["median"]
      result[f"ratio_{kind}_ours_over_torch_rounds"] = ratio
  elif use_torch:
    result["torch"] = {"skipped": torch_error}
  return result


def bench_precision(args) -> dict:
  """float32 against bfloat16 img/s of our train step and inference, in paired rounds."""
  batch = ours.fake_batch(args)
  trainers = {dtype: ours.JaxTrainer(args, dtype, batch) for dtype in ("float32", "bfloat16")}
  result = {"pairs": args.pairs, "train_compile_seconds": {d: t.compile_seconds for d, t in trainers.items()}}
  for kind in ("train", "inference"):
    rounds = timing.paired_rounds(
      {d: getattr(t, f"run_{kind}") for d, t in trainers.items()}, args.steps, args.pairs
    )
    result[f"{kind}_img_per_s"] = {d: timing.rates(args.batch, s)["median"] for d, s in rounds.items()}
    ratio = timing.ratio_summary(rounds["float32"], rounds["bfloat16"])
    result[f"{kind}_speedup_bf16_over_f32"] = ratio["median"]
    result[f"{kind}_speedup_bf16_over_f32_rounds"] = ratio
  return result
