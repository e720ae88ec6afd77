"""Speed, memory and input-pipeline benchmark of l2vit_jax, with the PyTorch reference side by side.

  python scripts/benchmark.py --out runs/benchmark.json            # default model, batch 16, fp32
  python scripts/benchmark.py --tiny                                # seconds; what the tests run
  python scripts/benchmark.py --only=depthwise,attention --batch=16

Prints one JSON object (and writes it to ``--out``). Sections (``--only`` picks a subset):

* ``matmul``: a 10000×256×1024 float32 matmul, the machine's practical FLOP/s peak for this run.
* ``model``: the real jitted train step (``train.make_optimizer`` + ``train.make_train_step`` with the
  finetune ``DualHeadLoss``) and the jitted eval-mode forward, after compilation: img/s, compile time,
  FLOPs (XLA's cost analysis and an analytic count) and their rate as a fraction of the matmul peak,
  peak memory. With ``torch`` importable, the PyTorch reference model (same configuration, fp32,
  forward + backward + clipping + AdamW; inference under ``no_grad``) is timed interleaved with ours
  — repeat by repeat, so load from other processes hits both alike — and the ratios reported.
* ``precision``: float32 vs bfloat16 train-step img/s (interleaved).
* ``depthwise``: forward and gradient time of every ``depthwise_conv2d`` formulation on the LCM's
  (batch, 25, 25, 256) 7×7 case.
* ``attention``: linear vs softmax attention (the kernels alone, 4 heads of 64, batch 1) at growing
  token counts, and where softmax starts to cost more.
* ``pipeline``: the augmented training pipeline (``pipeline.make_train_dataset``, physics
  augmentation) from an HDF5 file and from its ``.sparse`` conversion, on synthetic jets; file sizes.

Timings are the minimum over repeats (the least-disturbed run) and are only comparable within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as python_platform
import resource
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ("matmul", "model", "precision", "depthwise", "attention", "pipeline")
TINY_MODEL = dict(img_size=25, patch_size=5, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (tests, smoke runs)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of the 'model' section")
  parser.add_argument("--attention", choices=("linear", "softmax"), default="linear")
  parser.add_argument("--img-size", type=int, default=125)
  parser.add_argument("--patch-size", type=int, default=5)
  parser.add_argument("--embed-dim", type=int, default=256)
  parser.add_argument("--depth", type=int, default=6)
  parser.add_argument("--num-heads", type=int, default=4)
  parser.add_argument("--mlp-ratio", type=float, default=4.0)
  parser.add_argument("--depthwise-implementation", default="auto")
  parser.add_argument("--max-patch-mib", type=int, default=128,
                      help="skip the 'patches' depthwise formulation when its patch tensor is larger")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (ours, torch, ...)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--pipeline-images", type=int, default=1024)
  parser.add_argument("--pipeline-batches", type=int, default=30)
  parser.add_argument("--attention-tokens", default="64,256,625,2500,10000")
  args = parser.parse_args(argv)
  args.sections = [s for s in args.only.split(",") if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  if args.tiny:
    for key, value in TINY_MODEL.items():
      setattr(args, key, value)
    args.batch, args.steps, args.repeats = 4, 1, 1
    args.pipeline_images, args.pipeline_batches = 32, 4
    args.attention_tokens = "16,64"
  return args


# --- helpers ----------------------------------------------------------------------------------------

def _best_time(fn: Callable[[], object], repeats: int) -> float:
  """Minimum wall time of ``fn()`` (which must block until its work is done) over ``repeats``."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _device_memory(jax) -> dict | None:
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def _xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def analytic_forward_flops(args) -> float:
  """Multiply-adds ×2 of the matmuls and convolutions of one image's forward pass."""
  grid = args.img_size // args.patch_size
  tokens, dim = grid * grid, args.embed_dim
  head_dim = dim // args.num_heads
  hidden = int(dim * args.mlp_ratio)
  patch = 2 * tokens * (8 * args.patch_size**2) * dim
  qkv_proj_mlp = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
  if args.attention == "linear":  # kᵀ[v, 1] and q·(kᵀ[v, 1]) per head
    attention = 2 * 2 * args.num_heads * tokens * head_dim * (head_dim + 1)
  else:
    attention = 2 * 2 * args.num_heads * tokens * tokens * head_dim
  depthwise = 2 * 2 * tokens * 49 * dim
  return patch + args.depth * (qkv_proj_mlp + attention + depthwise)


def _model_kwargs(args) -> dict:
  return dict(in_channels=8, img_size=args.img_size, patch_size=args.patch_size,
              embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
              mlp_ratio=args.mlp_ratio)


# --- sections ---------------------------------------------------------------------------------------

def bench_matmul(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  m, k, n = (1000, 256, 1024) if args.tiny else (10000, 256, 1024)
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds = _best_time(lambda: matmul(a, b).block_until_ready(), 5 if args.tiny else 10)
  return {"shape": [m, k, n], "seconds": seconds, "flop_per_s": 2 * m * k * n / seconds}


class _JaxTrainer:
  """Our real train step and inference forward for one model configuration."""

  def __init__(self, args, dtype: str, batch: dict):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from l2vit_jax import config_lib, models, objectives, train  # pylint: disable=import-outside-toplevel
    self.jax = jax
    model = models.L2ViT(**_model_kwargs(args), attention=args.attention,
                         dtype=None if dtype == "float32" else jnp.dtype(dtype),
                         rngs=nnx.Rngs(params=0, dropout=1))
    model.set_attributes(depthwise_implementation=args.depthwise_implementation,
                         raise_if_not_found=False)
    config = config_lib.base_config()
    config.learning_rate, config.backbone_learning_rate = 1e-4, 5e-5  # the finetune recipe
    tx = train.make_optimizer(config, train.learning_rate_schedules(config, 100, 10_000))
    loss = objectives.DualHeadLoss(mass_mean=142.46, mass_std=50.58)
    model.eval()
    eval_graphdef, eval_state = nnx.split(model)
    # Copies: the train step donates (deletes) the parameter buffers it is given.
    eval_state = jax.tree.map(lambda a: a.copy(), eval_state)
    model.train()
    graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    self.state = [params, batch_stats, other, tx.init(params)]
    self.batch = batch
    self.step_count = 0
    step_fn = train.make_train_step(graphdef, loss, tx, jax.random.key(0))
    start = time.perf_counter()
    self.train_step = step_fn.lower(*self.state, jnp.int32(0), batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.xla_flops_per_step = _xla_flops(self.train_step)

    def forward(state, images):
      return nnx.merge(eval_graphdef, state)(images)

    self.eval_state = eval_state
    start = time.perf_counter()
    self.forward = jax.jit(forward).lower(eval_state, batch["image"]).compile()
    self.forward_compile_seconds = time.perf_counter() - start
    self.xla_flops_per_forward = _xla_flops(self.forward)
    self.run_train(1)  # first run: buffer allocation, thread pools
    self.run_inference(1)

  def run_train(self, steps: int) -> None:
    params, batch_stats, other, opt_state = self.state
    for _ in range(steps):
      params, batch_stats, opt_state, metrics = self.train_step(
          params, batch_stats, other, opt_state, self.jax.numpy.int32(self.step_count), self.batch)
      self.step_count += 1
    self.jax.block_until_ready((params, metrics))
    self.state = [params, batch_stats, other, opt_state]

  def run_inference(self, steps: int) -> None:
    for _ in range(steps):
      outputs = self.forward(self.eval_state, self.batch["image"])
    self.jax.block_until_ready(outputs)


class _TorchTrainer:
  """The PyTorch reference: forward + backward + grad-norm clip + AdamW, and no_grad inference."""

  def __init__(self, args, images_nhwc):
    import torch  # pylint: disable=import-outside-toplevel
    from l2vit_jax import reference_torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.model = reference_torch.build_torch_l2vit(**_model_kwargs(args))
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
    self.images = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
    batch = len(images_nhwc)
    self.labels = torch.arange(batch) % 2
    self.mass = torch.linspace(-1.0, 1.0, batch)
    self.run_train(1)
    self.run_inference(1)

  def run_train(self, steps: int) -> None:
    functional = self.torch.nn.functional
    self.model.train()
    for _ in range(steps):
      logits, mass = self.model(self.images)
      loss = functional.cross_entropy(logits, self.labels) + functional.smooth_l1_loss(mass[:, 0], self.mass)
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.optimizer.step()

  def run_inference(self, steps: int) -> None:
    self.model.eval()
    with self.torch.no_grad():
      for _ in range(steps):
        self.model(self.images)


def _fake_batch(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = np.zeros((args.batch, args.img_size, args.img_size, 8), np.float32)
  hits = rng.random(images.shape) < 0.01  # about as sparse as the real jets
  images[hits] = rng.exponential(5.0, int(hits.sum()))
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(np.arange(args.batch) % 2, jnp.int32),
           "mass": jnp.asarray(rng.uniform(50, 300, args.batch).astype(np.float32))}
  return images, batch


def _interleaved(runners: dict[str, Callable[[int], None]], steps: int, repeats: int) -> dict[str, float]:
  """Seconds per step of each runner: the minimum over ``repeats`` rounds, runners alternating."""
  best = {name: float("inf") for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      start = time.perf_counter()
      run(steps)
      best[name] = min(best[name], (time.perf_counter() - start) / steps)
  return best


def bench_model(args, matmul: dict | None) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  images, batch = _fake_batch(args)
  ours = _JaxTrainer(args, args.dtype, batch)
  rss_after_jax = _max_rss_mib()
  runners = {"jax_train": ours.run_train, "jax_inference": ours.run_inference}
  torch_error = None
  use_torch = not args.no_torch and args.attention == "linear"
  if use_torch:
    try:
      theirs = _TorchTrainer(args, images)
      runners.update(torch_train=theirs.run_train, torch_inference=theirs.run_inference)
    except ImportError as error:
      torch_error = str(error)
  seconds = _interleaved(runners, args.steps, args.repeats)
  forward_flops = analytic_forward_flops(args)
  train_flop_rate = 3 * forward_flops * args.batch / seconds["jax_train"]
  result = {
      "config": {**_model_kwargs(args), "batch": args.batch, "dtype": args.dtype,
                 "attention": args.attention,
                 "depthwise_implementation": args.depthwise_implementation,
                 "depthwise_resolved": __import__("l2vit_jax.models.depthwise", fromlist=["_"])
                 .resolve_implementation(args.depthwise_implementation)},
      "train_img_per_s": args.batch / seconds["jax_train"],
      "inference_img_per_s": args.batch / seconds["jax_inference"],
      "train_step_seconds": seconds["jax_train"],
      "train_compile_seconds": ours.compile_seconds,
      "inference_compile_seconds": ours.forward_compile_seconds,
      "analytic_train_gflop_per_image": 3 * forward_flops / 1e9,
      "analytic_inference_gflop_per_image": forward_flops / 1e9,
      "xla_cost_analysis_gflop_per_train_step": (ours.xla_flops_per_step or 0) / 1e9,
      "xla_cost_analysis_gflop_per_forward": (ours.xla_flops_per_forward or 0) / 1e9,
      "train_gflop_per_s": train_flop_rate / 1e9,
      "inference_gflop_per_s": forward_flops * args.batch / seconds["jax_inference"] / 1e9,
      "peak_rss_mib_after_jax": rss_after_jax,
      "peak_rss_mib": _max_rss_mib(),
      "device_memory": _device_memory(jax),
      "backend": jax.default_backend(),
  }
  if matmul:
    result["train_fraction_of_matmul_peak"] = train_flop_rate / matmul["flop_per_s"]
    result["inference_fraction_of_matmul_peak"] = (
        result["inference_gflop_per_s"] * 1e9 / matmul["flop_per_s"])
  if "torch_train" in seconds:
    import torch  # pylint: disable=import-outside-toplevel
    result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                       "train_img_per_s": args.batch / seconds["torch_train"],
                       "inference_img_per_s": args.batch / seconds["torch_inference"]}
    result["ratio_train_ours_over_torch"] = seconds["torch_train"] / seconds["jax_train"]
    result["ratio_inference_ours_over_torch"] = seconds["torch_inference"] / seconds["jax_inference"]
  elif use_torch:
    result["torch"] = {"skipped": torch_error}
  return result


def bench_precision(args) -> dict:
  _, batch = _fake_batch(args)
  trainers = {dtype: _JaxTrainer(args, dtype, batch) for dtype in ("float32", "bfloat16")}
  seconds = _interleaved({d: t.run_train for d, t in trainers.items()}, args.steps, args.repeats)
  inference = _interleaved({d: t.run_inference for d, t in trainers.items()}, args.steps, args.repeats)
  return {"train_img_per_s": {d: args.batch / s for d, s in seconds.items()},
          "inference_img_per_s": {d: args.batch / s for d, s in inference.items()},
          "train_speedup_bf16_over_f32": seconds["float32"] / seconds["bfloat16"],
          "inference_speedup_bf16_over_f32": inference["float32"] / inference["bfloat16"],
          "train_compile_seconds": {d: t.compile_seconds for d, t in trainers.items()}}


def bench_depthwise(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from l2vit_jax.models import depthwise  # pylint: disable=import-outside-toplevel
  grid = args.img_size // args.patch_size
  shape = (args.batch, grid, grid, args.embed_dim)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (7, 7, 1, args.embed_dim), jnp.float32)
  weights = jnp.cos(x)  # a non-trivial output cotangent
  results = {"shape": list(shape), "kernel": [7, 7], "auto_resolves_to": depthwise.resolve_implementation("auto"),
             "implementations": {}}
  patch_bytes = 4 * int(np.prod(shape)) * 49
  for name in depthwise.IMPLEMENTATIONS[1:]:
    if name == "patches" and patch_bytes > args.max_patch_mib * 2**20:
      # Its gradient holds several copies of the 49× patch tensor; at full size the process was
      # killed for memory on a 23 GB machine.
      results["implementations"][name] = {
          "skipped": f"patch tensor {patch_bytes / 2**20:.0f} MiB > --max-patch-mib={args.max_patch_mib}"}
      continue
    conv = lambda x, k, name=name: depthwise.depthwise_conv2d(x, k, None, implementation=name)
    forward = jax.jit(conv)
    gradient = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) * weights), argnums=(0, 1)))
    start = time.perf_counter()
    forward_compiled = forward.lower(x, kernel).compile()
    gradient_compiled = gradient.lower(x, kernel).compile()
    compile_seconds = time.perf_counter() - start
    forward_compiled(x, kernel).block_until_ready()
    jax.block_until_ready(gradient_compiled(x, kernel))
    slow = name in ("lax", "channel_batched")  # ≈1 s per call at full size: fewer repeats
    repeats = 2 if slow else 5
    results["implementations"][name] = {
        "forward_ms": 1e3 * _best_time(lambda: forward_compiled(x, kernel).block_until_ready(), repeats),
        "gradient_ms": 1e3 * _best_time(lambda: jax.block_until_ready(gradient_compiled(x, kernel)),
                                        repeats),
        "compile_seconds": compile_seconds,
    }
  return results


def bench_attention(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from l2vit_jax.models import attention  # pylint: disable=import-outside-toplevel
  heads, head_dim = args.num_heads, args.embed_dim // args.num_heads
  temperature = jnp.full((heads, 1, 1), head_dim**-0.5, jnp.float32)
  rows = []
  for tokens in (int(t) for t in args.attention_tokens.split(",")):
    keys = jax.random.split(jax.random.key(tokens), 3)
    q, k, v = (jax.random.normal(key, (1, heads, tokens, head_dim), jnp.float32) for key in keys)
    row = {"tokens": tokens}
    for kind, fn in (("linear", attention.linear_attention), ("softmax", attention.softmax_attention)):
      compiled = jax.jit(fn).lower(q, k, v, temperature).compile()
      compiled(q, k, v, temperature).block_until_ready()
      row[f"{kind}_ms"] = 1e3 * _best_time(lambda c=compiled: c(q, k, v, temperature).block_until_ready(), 3)
    row["softmax_over_linear"] = row["softmax_ms"] / row["linear_ms"]
    rows.append(row)
  # First token count at which softmax is slower (None if it never is in the measured range).
  slower = [r["tokens"] for r in rows if r["softmax_ms"] > r["linear_ms"]]
  return {"batch": 1, "heads": heads, "head_dim": head_dim, "forward": rows,
          "softmax_slower_from_tokens": slower[0] if slower else None}


def bench_pipeline(args) -> dict:
  from l2vit_jax.data import pipeline, sources, sparse, synthetic  # pylint: disable=import-outside-toplevel
  results = {"images": args.pipeline_images, "image_size": args.img_size, "batch": args.batch,
             "augmentation": "physics", "formats": {}}
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
    for name, path in (("hdf5", h5_path), ("sparse", sparse_path)):
      dataset = pipeline.make_train_dataset(sources.open_source(path, labelled=True),
                                            batch_size=args.batch, seed=0, augmentation="physics")
      iterator = iter(dataset)
      for _ in range(3):  # warm-up: threads, page cache, first memory maps
        next(iterator)
      start = time.perf_counter()
      for _ in range(args.pipeline_batches):
        next(iterator)
      seconds = time.perf_counter() - start
      results["formats"][name] = {"img_per_s": args.pipeline_batches * args.batch / seconds}
  results["sparse_speedup_over_hdf5"] = (results["formats"]["sparse"]["img_per_s"]
                                         / results["formats"]["hdf5"]["img_per_s"])
  return results


# --- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  from l2vit_jax import platform as l2vit_platform  # pylint: disable=import-outside-toplevel
  applied_flags = l2vit_platform.configure_xla_flags()
  import jax  # pylint: disable=import-outside-toplevel
  report = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "hardware": {"cpu_count": os.cpu_count(), "processor": python_platform.processor() or
                   python_platform.machine(), "device": str(jax.devices()[0].device_kind),
                   "backend": jax.default_backend()},
      "versions": {"python": python_platform.python_version(), "jax": jax.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "xla_flags_added_by_l2vit": applied_flags,
  }
  timings = {}
  for section in SECTIONS:
    if section not in args.sections:
      continue
    start = time.perf_counter()
    if section == "matmul":
      report["matmul"] = bench_matmul(args)
    elif section == "model":
      report["model"] = bench_model(args, report.get("matmul"))
    elif section == "precision":
      report["precision"] = bench_precision(args)
    elif section == "depthwise":
      report["depthwise"] = bench_depthwise(args)
    elif section == "attention":
      report["attention"] = bench_attention(args)
    elif section == "pipeline":
      report["pipeline"] = bench_pipeline(args)
    timings[section] = time.perf_counter() - start
    print(f"[benchmark] {section}: {timings[section]:.0f} s", file=sys.stderr, flush=True)
  report["section_seconds"] = timings
  report["peak_rss_mib"] = _max_rss_mib()
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return report


if __name__ == "__main__":
  main()
