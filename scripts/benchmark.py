"""Speed, memory and input-pipeline benchmark of l2vit_jax, with the PyTorch reference side by side.

  python scripts/benchmark.py --out runs/benchmark.json            # default model, batch 16, fp32
  python scripts/benchmark.py --tiny                                # seconds; what the tests run
  python scripts/benchmark.py --only=depthwise,attention --batch=16

Prints one JSON object (and writes it to ``--out``). Sections (``--only`` picks a subset):

* ``matmul``: a 10000×256×1024 float32 matmul, the machine's practical FLOP/s peak for this run.
* ``model``: the real jitted train step (``optimizer.make_optimizer`` + ``steps.make_train_step`` with the
  finetune ``DualHeadLoss``) and the jitted eval-mode forward, after compilation: img/s, compile time,
  FLOPs (XLA's cost analysis and an analytic count) and their rate as a fraction of the matmul peak,
  peak memory. With ``torch`` importable, the PyTorch reference model (same configuration and
  device, bf16 under autocast where ours is bf16; forward + backward + clipping + AdamW; inference
  under ``no_grad``) is timed interleaved with ours in ``--pairs`` rounds (each round runs ours and
  theirs once, the order reversed every other round so that a drift in machine speed hits both
  alike); every ours/PyTorch ratio is reported per round and as the median and min–max over rounds.
* ``precision``: float32 vs bfloat16 train-step img/s (paired the same way).
* ``profile`` (only when named in ``--only``): per-operation-category milliseconds of our train step
  and inference (a JAX profiler trace; each XLA thunk attributed through the named scope its HLO
  metadata carries) beside PyTorch's (torch.profiler self CPU time, attributed the same way):
  ``--only=profile --steps=2 --out docs/profile_cpu.json``.
* ``depthwise``: forward and gradient time of every ``depthwise_conv2d`` formulation on the LCM's
  (batch, 25, 25, 256) 7×7 case.
* ``attention``: linear vs softmax attention (the kernels alone, 4 heads of 64, batch 1) at growing
  token counts, and where softmax starts to cost more.
* ``pipeline``: the augmented training pipeline (``pipeline.make_train_dataset``, physics
  augmentation) from an HDF5 file and from its ``.sparse`` conversion, on synthetic jets; file sizes.

On a GPU (or TPU), ``python scripts/benchmark.py --accelerator`` is the command to run: the ``model``
section in bfloat16 at the largest power-of-two batch whose train step fits ``--fill-fraction`` of the
device's memory (``--batch=fill``, found from one compile at a small batch), its MFU against the chip's
published dense bf16 peak (``tpu.chips.spec_for_device_kind``), and the PyTorch reference on the same
device in bf16 autocast, interleaved as on the CPU. Its budget is 5 minutes of device time.

Single-implementation timings (matmul, depthwise, attention) are the minimum over repeats. Every
section records the machine's load around it (``load``): the 1-minute load average before and after,
and the CPU that *other* processes used while it ran (from /proc/stat minus this process's own
rusage). A section where other processes used more than ``LOADED_FRACTION`` of the cores is marked
``"loaded": true`` and a banner says so: load slowed PyTorch's thread pool far more than XLA's (the
ratios this script once reported on a busy machine, 1.7×, were 0.6–1.0× on a quiet one), so ratios
from a loaded run are not figures to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform as python_platform
import resource
import sys
import tempfile
import time
from typing import Callable


SECTIONS = ("matmul", "model", "precision", "profile", "depthwise", "attention", "pipeline")
# A section is 'loaded' when other processes used more than this fraction of the cores while it ran.
# Ours and PyTorch each spread a step over every core; a quarter of them taken by others is where the
# ratio stopped meaning anything in practice (docs/performance_log.md: at a load of ~4 on 2 cores the
# ratio read 1.7×, quiet 0.6–1.0×), while a quiet desktop stays well below it.
LOADED_FRACTION = 0.25
TINY_MODEL = dict(img_size=25, patch_size=5, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
PLAIN_DEFAULTS = dict(only=",".join(s for s in SECTIONS if s != "profile"), batch=16, dtype="float32",
                      steps=3)
# A GPU step of the default model at a filling batch takes tens of milliseconds: ten of them per round
# keep the Python dispatch and the synchronisation at each round's end out of the figures, and the
# three compiles (the fill probe, train, inference) plus 5 pairs inside 5 minutes of device time.
ACCELERATOR_DEFAULTS = dict(only="model", batch="fill", dtype="bfloat16", steps=10)


def _batch_size(text: str) -> int | str:
  if text == "fill":
    return text
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"--batch must be a positive integer or 'fill', got {text}")
  return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {SECTIONS} (default: all but 'profile')")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (tests, smoke runs)")
  parser.add_argument("--accelerator", action="store_true",
                      help="the GPU/TPU benchmark: --only=model --dtype=bfloat16 --batch=fill --steps=10 "
                           "(options given explicitly win)")
  parser.add_argument("--batch", type=_batch_size, default=None,
                      help="images per step, or 'fill': the largest power of two whose train step fits "
                           "--fill-fraction of the device's memory (default 16)")
  parser.add_argument("--fill-fraction", type=float, default=0.4,
                      help="share of the device's memory our train step may plan for with --batch=fill; "
                           "the rest is the PyTorch reference's, which shares the device")
  parser.add_argument("--max-batch", type=int, default=1024, help="upper bound of --batch=fill")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute dtype of the 'model' section (default float32; the PyTorch "
                           "reference runs bfloat16 under autocast)")
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
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per runner and round (default 3, 10 with --accelerator)")
  parser.add_argument("--pairs", "--repeats", dest="pairs", type=int, default=None,
                      help="paired rounds (ours then theirs, alternating order) behind each ratio; "
                           "default 5 (2 with --tiny)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--pipeline-images", type=int, default=1024)
  parser.add_argument("--pipeline-batches", type=int, default=30)
  parser.add_argument("--attention-tokens", default="64,256,625,2500,10000")
  args = parser.parse_args(argv)
  defaults = dict(ACCELERATOR_DEFAULTS if args.accelerator else PLAIN_DEFAULTS)
  if args.tiny:
    for key, value in TINY_MODEL.items():
      setattr(args, key, value)
    defaults.update(steps=1, batch=defaults["batch"] if args.accelerator else 4)
    args.pipeline_images, args.pipeline_batches = 32, 4
    args.attention_tokens = "16,64"
  for key, value in defaults.items():
    if getattr(args, key) is None:  # options given explicitly win
      setattr(args, key, value)
  args.sections = [s for s in args.only.split(",") if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  if args.pairs is None:
    args.pairs = 2 if args.tiny else 5
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


def _device_bytes_limit() -> int | None:
  import jax  # pylint: disable=import-outside-toplevel
  return (_device_memory(jax) or {}).get("bytes_limit")


def _chip():
  """The published figures of the chip we run on (``tpu.chips``); None on a CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  from l2vit_jax.tpu import chips  # pylint: disable=import-outside-toplevel
  return chips.spec_for_device_kind(jax.devices()[0].device_kind)


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
  if args.attention == "linear":  # kᵀv and q·(kᵀv) per head, the denominator q·Σk as one more column
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


def _jax_model_and_train_step(args, dtype: str):
  """Our model as the finetune recipe trains it: the jitted train step (``DualHeadLoss``, the recipe's
  optimizer), its state [params, batch_stats, other, opt_state], and the eval-mode model split."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from l2vit_jax import config_lib, models  # pylint: disable=import-outside-toplevel
  from l2vit_jax.training import objectives, optimizer, steps  # pylint: disable=import-outside-toplevel
  model = models.L2ViT(**_model_kwargs(args), attention=args.attention,
                       dtype=None if dtype == "float32" else jnp.dtype(dtype),
                       rngs=nnx.Rngs(params=0, dropout=1))
  model.set_attributes(depthwise_implementation=args.depthwise_implementation,
                       raise_if_not_found=False)
  config = config_lib.base_config()
  config.learning_rate, config.backbone_learning_rate = 1e-4, 5e-5  # the finetune recipe
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedules(config, 100, 10_000))
  loss = objectives.DualHeadLoss(mass_mean=142.46, mass_std=50.58)
  model.eval()
  eval_graphdef, eval_state = nnx.split(model)
  # Copies: the train step donates (deletes) the parameter buffers it is given.
  eval_state = jax.tree.map(lambda a: a.copy(), eval_state)
  model.train()
  graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  state = [params, batch_stats, other, tx.init(params)]
  return steps.make_train_step(graphdef, loss, tx, jax.random.key(0)), state, (eval_graphdef, eval_state)


def choose_fill_batch(fixed_bytes: float, bytes_per_image: float, budget_bytes: float,
                      max_batch: int) -> int:
  """The largest power of two b ≤ ``max_batch`` with fixed + b · per-image bytes ≤ budget (at least 1).

  Powers of two: every common GPU and TPU tile divides them, so the figures are not a ragged batch's.
  (``tpu.compile_only.largest_fitting_batch`` instead compiles at each guess to pin down a slice's
  exact largest batch; a benchmark wants a round one from a single compile.)
  """
  batch = 1
  while batch * 2 <= max_batch and fixed_bytes + batch * 2 * bytes_per_image <= budget_bytes:
    batch *= 2
  return batch


def fill_batch(args, probe_batch: int = 8) -> dict:
  """``--batch=fill``: the batch whose train step fits ``--fill-fraction`` of the device's memory.

  One compile at ``probe_batch``: XLA's memory plan splits into arguments and outputs (parameters,
  optimizer state, the batch: nearly all fixed) and temporaries (activations and their gradients,
  per image). Scaling the temporaries from the probe slightly overstates what a larger batch needs,
  which errs on the side of fitting. On a CPU, which reports no memory limit, the batch is 16.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  limit = _device_bytes_limit()
  if not limit:
    return {"batch": PLAIN_DEFAULTS["batch"], "reason": "the device reports no memory limit"}
  step_fn, state, _ = _jax_model_and_train_step(args, args.dtype)
  _, probe = _fake_batch(args, probe_batch)
  memory = step_fn.lower(*state, jnp.int32(0), probe).compile().memory_analysis()
  fixed = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
  per_image = memory.temp_size_in_bytes / probe_batch
  budget = args.fill_fraction * limit
  return {"batch": choose_fill_batch(fixed, per_image, budget, args.max_batch),
          "device_bytes_limit": limit, "fill_fraction": args.fill_fraction,
          "probe_batch": probe_batch, "fixed_bytes": fixed, "temp_bytes_per_image": per_image,
          "max_batch": args.max_batch}


class _JaxTrainer:
  """Our real train step and inference forward for one model configuration."""

  def __init__(self, args, dtype: str, batch: dict):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from l2vit_jax.training import steps  # pylint: disable=import-outside-toplevel
    self.jax = jax
    step_fn, self.state, (eval_graphdef, eval_state) = _jax_model_and_train_step(args, dtype)
    self.batch = batch
    self.step_count = 0
    self.one_step_in_flight = steps.keeps_one_step_in_flight()  # as the train loop dispatches
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
      if self.one_step_in_flight:
        self.jax.block_until_ready(metrics)
      self.step_count += 1
    self.jax.block_until_ready((params, metrics))
    self.state = [params, batch_stats, other, opt_state]

  def run_inference(self, steps: int) -> None:
    for _ in range(steps):
      outputs = self.jax.block_until_ready(self.forward(self.eval_state, self.batch["image"]))


class _TorchTrainer:
  """The PyTorch reference: forward + backward + grad-norm clip + AdamW, and no_grad inference.

  On the device our JAX runs on (CUDA when JAX runs on a GPU, else the CPU); in bfloat16 under
  ``torch.autocast`` when ``dtype`` is bfloat16, the way a PyTorch user runs mixed precision (float32
  parameters and optimizer, as ours).
  """

  def __init__(self, args, images_nhwc, dtype: str = "float32", device: str = "cpu"):
    import torch  # pylint: disable=import-outside-toplevel
    from l2vit_jax.interop import torch_reference  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.device = torch.device(device)
    self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    self.model = torch_reference.build_torch_l2vit(**_model_kwargs(args)).to(self.device)
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
    self.images = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).to(self.device)
    self.batch = len(images_nhwc)
    self.labels = (torch.arange(self.batch) % 2).to(self.device)
    self.mass = torch.linspace(-1.0, 1.0, self.batch).to(self.device)
    self.run_train(1)
    self.run_inference(1)

  def _precision(self):
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return self.torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

  def _finish(self) -> None:
    if self.device.type == "cuda":  # kernels run asynchronously: the round's time needs them done
      self.torch.cuda.synchronize(self.device)

  def run_train(self, steps: int) -> None:
    functional = self.torch.nn.functional
    self.model.train()
    for _ in range(steps):
      with self._precision():
        logits, mass = self.model(self.images)
        loss = (functional.cross_entropy(logits.float(), self.labels)
                + functional.smooth_l1_loss(mass[:, 0].float(), self.mass))
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.optimizer.step()
    self._finish()

  def run_inference(self, steps: int) -> None:
    self.model.eval()
    with self.torch.no_grad(), self._precision():
      for _ in range(steps):
        self.model(self.images)
    self._finish()


def _fitting_torch_trainer(args, images_nhwc, dtype: str, device: str) -> _TorchTrainer:
  """The PyTorch reference at our batch, or at half of it (and half again) where that runs out of the
  device's memory: eager PyTorch keeps more activations than XLA's plan for the same batch."""
  import torch  # pylint: disable=import-outside-toplevel
  out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
  batch = len(images_nhwc)
  while True:
    try:
      return _TorchTrainer(args, images_nhwc[:batch], dtype, device)
    except out_of_memory:
      if batch == 1:
        raise
      gc.collect()
      torch.cuda.empty_cache()
      batch //= 2
      print(f"[benchmark] PyTorch ran out of device memory; retrying at batch {batch}",
            file=sys.stderr, flush=True)


def _fake_batch(args, size: int | None = None):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  size = size or args.batch
  rng = np.random.default_rng(0)
  images = np.zeros((size, args.img_size, args.img_size, 8), np.float32)
  hits = rng.random(images.shape) < 0.01  # about as sparse as the real jets
  images[hits] = rng.exponential(5.0, int(hits.sum()))
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(np.arange(size) % 2, jnp.int32),
           "mass": jnp.asarray(rng.uniform(50, 300, size).astype(np.float32))}
  return images, batch


def _paired_rounds(runners: dict[str, Callable[[int], None]], steps: int, pairs: int,
                   page_faults: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
  """Seconds per step of every runner in each of ``pairs`` rounds. A round runs each runner once,
  in reverse order every other round, so that a drift in machine speed hits ours and theirs alike.
  ``page_faults``, if given, receives each runner's minor page faults per step, round by round."""
  seconds = {name: [] for name in runners}
  for round_index in range(pairs):
    for name in (list(runners) if round_index % 2 == 0 else list(runners)[::-1]):
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      runners[name](steps)
      seconds[name].append((time.perf_counter() - start) / steps)
      if page_faults is not None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        page_faults.setdefault(name, []).append(faults / steps)
  return seconds


def summarize(values: list[float]) -> dict:
  """Median and range of per-round figures (the median: one disturbed round cannot move it)."""
  ordered = sorted(values)
  middle = len(ordered) // 2
  median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
  return {"median": median, "min": ordered[0], "max": ordered[-1], "rounds": list(values)}


def _ratio_summary(reference_seconds: list[float], our_seconds: list[float]) -> dict:
  """ours/reference speed ratio per round (reference time over ours), summarized."""
  return summarize([theirs / ours for theirs, ours in zip(reference_seconds, our_seconds)])


def _rates(batch: int, seconds: list[float]) -> dict:
  return summarize([batch / s for s in seconds])


class LoadMonitor:
  """The machine's load around one measurement: load averages, and CPU used by other processes."""

  def __init__(self):
    self.load_before = os.getloadavg()
    self.busy_before, self.own_before = _machine_busy_seconds(), _own_cpu_seconds()
    self.start = time.perf_counter()

  def finish(self) -> dict:
    wall = time.perf_counter() - self.start
    cores = os.cpu_count() or 1
    result = {"loadavg_1min_before": self.load_before[0], "loadavg_1min_after": os.getloadavg()[0],
              "cpu_count": cores, "loaded_fraction_threshold": LOADED_FRACTION}
    busy_after = _machine_busy_seconds()
    if self.busy_before is not None and busy_after is not None and wall > 0:
      other = (busy_after - self.busy_before) - (_own_cpu_seconds() - self.own_before)
      result["other_processes_cpu_fraction"] = max(0.0, other) / (wall * cores)
      result["loaded"] = result["other_processes_cpu_fraction"] > LOADED_FRACTION
    else:  # no /proc/stat: the load average taken before we added our own load
      result["loaded"] = self.load_before[0] > LOADED_FRACTION * cores
    return result


def _machine_busy_seconds() -> float | None:
  """CPU-seconds every process on the machine has spent busy since boot (Linux /proc/stat)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  guest = sum(fields[8:10])  # already counted in user/nice
  return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
  """CPU-seconds of this process (every thread) and of its waited-for children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _torch_device(jax) -> str:
  """Where the PyTorch reference runs: on the GPU when ours does (and PyTorch sees one), else the CPU."""
  import torch  # pylint: disable=import-outside-toplevel
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


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
      theirs = _fitting_torch_trainer(args, images, args.dtype, _torch_device(jax))
      runners.update(torch_train=theirs.run_train, torch_inference=theirs.run_inference)
    except ImportError as error:
      torch_error = str(error)
  # An untimed round first: the heap settles once both models have allocated beside each other.
  _paired_rounds(runners, 1, 1)
  page_faults: dict[str, list[float]] = {}
  rounds = _paired_rounds(runners, args.steps, args.pairs, page_faults)
  seconds = {name: summarize(values)["median"] for name, values in rounds.items()}
  forward_flops = analytic_forward_flops(args)
  train_flop_rate = 3 * forward_flops * args.batch / seconds["jax_train"]
  result = {
      "config": {**_model_kwargs(args), "batch": args.batch, "dtype": args.dtype,
                 "attention": args.attention,
                 "depthwise_implementation": args.depthwise_implementation,
                 "depthwise_resolved": __import__("l2vit_jax.models.depthwise", fromlist=["_"])
                 .resolve_implementation(args.depthwise_implementation)},
      "pairs": args.pairs, "steps_per_round": args.steps,
      "train_img_per_s": args.batch / seconds["jax_train"],  # medians over rounds
      "inference_img_per_s": args.batch / seconds["jax_inference"],
      "train_img_per_s_rounds": _rates(args.batch, rounds["jax_train"]),
      "inference_img_per_s_rounds": _rates(args.batch, rounds["jax_inference"]),
      "train_step_seconds": seconds["jax_train"],
      # Faulting in fresh pages every step cost ~1 s before the allocator was tuned (runtime/host.py).
      "minor_page_faults_per_step": {name: summarize(values) for name, values in page_faults.items()},
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
  chip = _chip()
  if chip:  # MFU: the analytic FLOPs' rate over the chip's published dense bf16 peak
    result["published_peak_bf16_flops"] = chip.peak_bf16_flops
    result["published_peak_source"] = chip.source
    result["train_mfu"] = train_flop_rate / chip.peak_bf16_flops
    result["inference_mfu"] = result["inference_gflop_per_s"] * 1e9 / chip.peak_bf16_flops
  if "torch_train" in seconds:
    import torch  # pylint: disable=import-outside-toplevel
    torch_batch = theirs.batch  # ours unless PyTorch ran out of memory at it
    result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                       "device": str(theirs.device), "batch": torch_batch,
                       "autocast_dtype": str(theirs.autocast_dtype) if theirs.autocast_dtype else None,
                       "train_img_per_s": torch_batch / seconds["torch_train"],
                       "inference_img_per_s": torch_batch / seconds["torch_inference"],
                       "train_img_per_s_rounds": _rates(torch_batch, rounds["torch_train"]),
                       "inference_img_per_s_rounds": _rates(torch_batch, rounds["torch_inference"])}
    if chip:
      for kind, passes in (("train", 3), ("inference", 1)):
        result["torch"][f"{kind}_mfu"] = (
            passes * forward_flops * result["torch"][f"{kind}_img_per_s"] / chip.peak_bf16_flops)
    for kind in ("train", "inference"):
      # Per image, so that the ratio stays a throughput ratio where PyTorch ran at a smaller batch.
      ratio = _ratio_summary([t / torch_batch for t in rounds[f"torch_{kind}"]],
                             [t / args.batch for t in rounds[f"jax_{kind}"]])
      result[f"ratio_{kind}_ours_over_torch"] = ratio["median"]
      result[f"ratio_{kind}_ours_over_torch_rounds"] = ratio
  elif use_torch:
    result["torch"] = {"skipped": torch_error}
  return result


def bench_precision(args) -> dict:
  _, batch = _fake_batch(args)
  trainers = {dtype: _JaxTrainer(args, dtype, batch) for dtype in ("float32", "bfloat16")}
  result = {"pairs": args.pairs, "train_compile_seconds": {d: t.compile_seconds for d, t in trainers.items()}}
  for kind in ("train", "inference"):
    rounds = _paired_rounds({d: getattr(t, f"run_{kind}") for d, t in trainers.items()}, args.steps,
                            args.pairs)
    result[f"{kind}_img_per_s"] = {d: _rates(args.batch, s)["median"] for d, s in rounds.items()}
    ratio = _ratio_summary(rounds["float32"], rounds["bfloat16"])
    result[f"{kind}_speedup_bf16_over_f32"] = ratio["median"]
    result[f"{kind}_speedup_bf16_over_f32_rounds"] = ratio
  return result


# Operation categories of the per-operation profile, attributed by wrapping these callables in a
# named scope (JAX) or record_function (PyTorch) while the profiled step is traced; the innermost
# scope wins, so a Linear inside the attention module counts as a matmul, not as attention.
PROFILE_CATEGORIES = ("patch_embed", "linear_matmuls", "attention_kernel", "layernorm", "gelu",
                      "depthwise_lcm", "batchnorm", "dropout_droppath", "optimizer", "other")


def _jax_scope_targets():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from l2vit_jax.models import l2vit  # pylint: disable=import-outside-toplevel
  return [(l2vit.PatchEmbed, "__call__", "patch_embed"), (nnx.Linear, "__call__", "linear_matmuls"),
          (nnx.LayerNorm, "__call__", "layernorm"), (nnx.BatchNorm, "__call__", "batchnorm"),
          (l2vit, "gelu", "gelu"), (l2vit.DepthwiseConv, "__call__", "depthwise_lcm"),
          (l2vit.Dropout, "__call__", "dropout_droppath"), (l2vit.DropPath, "__call__", "dropout_droppath"),
          (l2vit.ATTENTION_FNS, "linear", "attention_kernel")]


class _Wrapped:
  """Temporarily replaces ``owner.name`` (attribute or dict item) by ``wrap(category, original)``."""

  def __init__(self, targets, wrap):
    self.targets, self.wrap, self.saved = targets, wrap, []

  def __enter__(self):
    for owner, name, category in self.targets:
      is_dict = isinstance(owner, dict)
      original = owner[name] if is_dict else getattr(owner, name)
      self.saved.append((owner, name, original, is_dict))
      wrapped = self.wrap(category, original)
      if is_dict:
        owner[name] = wrapped
      else:
        setattr(owner, name, wrapped)
    return self

  def __exit__(self, *exc):
    for owner, name, original, is_dict in reversed(self.saved):
      if is_dict:
        owner[name] = original
      else:
        setattr(owner, name, original)


def _jax_scoped(category, fn):
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  @functools.wraps(fn)
  def scoped(*a, **k):
    with jax.named_scope(f"cat_{category}"):
      return fn(*a, **k)
  return scoped


def _hlo_frames(hlo_text: str) -> dict[str, str]:
  """stack_frame_id -> 'file:function' of the innermost frame (the HLO's frame tables)."""
  import re  # pylint: disable=import-outside-toplevel
  tables: dict[str, dict[str, str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and re.match(r"^\d+ ", line):
      key, value = line.split(" ", 1)
      current[key] = value.strip().strip('"')
    else:
      current = None
  fields = lambda table, key: dict(re.findall(r"(\w+)=(\d+)", tables.get(table, {}).get(key, "")))
  frames = {}
  for frame in tables.get("StackFrames", {}):
    location = fields("FileLocations", fields("StackFrames", frame).get("file_location_id"))
    frames[frame] = (f'{tables["FileNames"].get(location.get("file_name_id"), "?")}:'
                     f'{tables["FunctionNames"].get(location.get("function_name_id"), "?")}')
  return frames


def _hlo_categories(hlo_text: str) -> dict[str, tuple[str, bool]]:
  """HLO instruction name -> (category, backward?) from each instruction's metadata: the innermost
  cat_ scope in its op_name; else 'optimizer' for ops traced directly in the train step's body
  (clipping, AdamW, the update), outside the loss."""
  import re  # pylint: disable=import-outside-toplevel
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*metadata=\{([^}]*)\}')
  frames = _hlo_frames(hlo_text)
  result = {}
  for line in hlo_text.splitlines():
    match = pattern.match(line)
    if not match:
      continue
    meta = match.group(2)
    op_name = re.search(r'op_name="([^"]*)"', meta)
    op_name = op_name.group(1) if op_name else ""
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    innermost = frames.get(frame.group(1), "?") if frame else "?"
    scopes = re.findall(r"cat_(\w+)", op_name)
    if scopes:
      category = scopes[-1]
    elif "/optax/" in innermost or innermost.endswith(":make_train_step.<locals>.train_step"):
      category = "optimizer"
    else:
      category = "other"
    result[match.group(1)] = (category, "transpose(" in op_name)
  return result


def _jax_profile(trainer, run: Callable[[int], None], compiled, steps: int, directory: str) -> dict:
  """ms per step by (category, forward/backward) from a JAX profiler trace of ``run(steps)``."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  names = _hlo_categories(compiled.as_text())
  start = time.perf_counter()
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run(steps)
  wall = (time.perf_counter() - start) / steps
  [path] = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals: dict[str, float] = {}
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    # Control flow (while loops) encloses thunks that are traced themselves: count leaves only.
    if event.get("ph") != "X" or not op or event["name"].startswith("end: ") or op.startswith(
        ("while", "conditional", "call")):
      continue
    category, backward = names.get(op, ("other", False))
    key = f"{category}/{'bwd' if backward else 'fwd'}"
    totals[key] = totals.get(key, 0.0) + event["dur"] / 1e3 / steps
  return {"ms_per_step": totals, "wall_ms_per_step_traced": 1e3 * wall}


def _torch_profile(theirs, run: Callable[[int], None], steps: int) -> dict:
  """ms per step by (category, forward/backward) from torch.profiler (self CPU time)."""
  import torch  # pylint: disable=import-outside-toplevel
  from l2vit_jax.interop import torch_reference  # pylint: disable=import-outside-toplevel
  nn, modules = torch.nn, torch_reference.torch_modules()

  def scoped(category, fn):
    def wrapped(self, *a, **k):
      if category == "conv":  # grouped = the LCM's depthwise convs; the other is the patch embedding
        name = "depthwise_lcm" if self.groups > 1 else "patch_embed"
      else:
        name = category
      with torch.profiler.record_function(f"cat_{name}"):
        return fn(self, *a, **k)
    return wrapped

  targets = [(nn.Conv2d, "forward", "conv"), (nn.Linear, "forward", "linear_matmuls"),
             (nn.LayerNorm, "forward", "layernorm"), (nn.BatchNorm2d, "forward", "batchnorm"),
             (nn.GELU, "forward", "gelu"), (nn.Dropout, "forward", "dropout_droppath"),
             (modules.DropPath, "forward", "dropout_droppath"),
             (torch.optim.AdamW, "step", "optimizer")]
  # clip_grad_norm_ and the reference's einsums (only its attention kernel uses einsum) are functions.
  clip, einsum = torch.nn.utils.clip_grad_norm_, torch.einsum
  torch.nn.utils.clip_grad_norm_ = lambda *a, **k: _torch_scoped_call(torch, "optimizer", clip, a, k)
  torch.einsum = lambda *a, **k: _torch_scoped_call(torch, "attention_kernel", einsum, a, k)
  try:
    with _Wrapped(targets, scoped):
      start = time.perf_counter()
      with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
      wall = (time.perf_counter() - start) / steps
  finally:
    torch.nn.utils.clip_grad_norm_, torch.einsum = clip, einsum
  return {"ms_per_step": _torch_categories(prof.events(), steps), "wall_ms_per_step_traced": 1e3 * wall}


def _torch_scoped_call(torch, category, fn, args, kwargs):
  with torch.profiler.record_function(f"cat_{category}"):
    return fn(*args, **kwargs)


def _torch_categories(events, steps: int) -> dict[str, float]:
  """Self CPU time per category: forward ops by their enclosing cat_ scope; backward ops by the scope
  of the forward op whose autograd node (same sequence number) they run. The attention kernel's relu,
  clamp and division sit unscoped in LinearAttention.forward and count as 'other'."""
  def scope_of(event):
    while event is not None:
      if event.name.startswith("cat_"):
        return event.name[4:]
      event = event.cpu_parent
    return None

  forward_scope = {}
  for event in events:
    if getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::"):
      scope = scope_of(event)
      if scope and event.sequence_nr not in forward_scope:
        forward_scope[event.sequence_nr] = scope
  totals: dict[str, float] = {}
  for event in events:
    if event.name.startswith("cat_"):
      continue
    node, backward = event, False
    while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
      node = node.cpu_parent
    if node is not None:
      backward = True
      category = forward_scope.get(getattr(node, "sequence_nr", -1)) or scope_of(event) or "other"
    else:
      category = scope_of(event) or "other"
    key = f"{category}/{'bwd' if backward else 'fwd'}"
    totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
  return totals


def bench_profile(args) -> dict:
  """Per-operation-category breakdown of one train step and one inference forward, ours (JAX profiler
  trace, thunk times by HLO metadata) beside PyTorch's (torch.profiler self CPU time). Times are
  summed over threads, so they can exceed the wall time per step."""
  images, batch = _fake_batch(args)
  with _Wrapped(_jax_scope_targets(), _jax_scoped):
    ours = _JaxTrainer(args, args.dtype, batch)
  result = {"categories": list(PROFILE_CATEGORIES), "steps": args.steps}
  with tempfile.TemporaryDirectory(prefix="l2vit_profile_") as directory:
    result["ours"] = {
        "train": _jax_profile(ours, ours.run_train, ours.train_step, args.steps,
                              os.path.join(directory, "train")),
        "inference": _jax_profile(ours, ours.run_inference, ours.forward, args.steps,
                                  os.path.join(directory, "inference"))}
  if not args.no_torch:
    theirs = _TorchTrainer(args, images, args.dtype)
    result["torch"] = {"train": _torch_profile(theirs, theirs.run_train, args.steps),
                       "inference": _torch_profile(theirs, theirs.run_inference, args.steps)}
  return result


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


def _wait_until_idle(poll: float = 0.2) -> None:
  """Returns once this process's threads (Grain's read-ahead) have stopped using CPU."""
  while True:
    cpu = time.process_time()
    time.sleep(poll)
    if time.process_time() - cpu < 0.01 * poll:
      return


def _time_input_path(dataset, keys: tuple[str, ...], batches: int, batch: int) -> tuple[dict, dict]:
  """Images/s, host CPU per image (process_time: every thread, Grain's included) and host→device bytes
  per image of one training input path; also returns its last batch.

  CPU time runs from an idle process with a full read-ahead buffer to the same state again, so it
  counts exactly the batches taken (and nothing of an earlier path's leftover read-ahead).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  iterator = iter(dataset)
  for _ in range(3):  # warm-up: threads, page cache, first memory maps
    last = next(iterator)
  _wait_until_idle()
  cpu, start = time.process_time(), time.perf_counter()
  for _ in range(batches):
    last = next(iterator)
  seconds = time.perf_counter() - start
  _wait_until_idle()
  cpu = time.process_time() - cpu
  images = batches * batch
  return {"img_per_s": images / seconds, "host_cpu_us_per_image": 1e6 * cpu / images,
          "host_to_device_bytes_per_image": sum(np.asarray(last[k]).nbytes for k in keys) / batch}, last


def _time_device_augmentation(augmentation: str, image_shape, shipped: dict, batch: int) -> float:
  """Microseconds per image of the jitted densify + augment (``device_augment.prepare_batch``)."""
  import jax  # pylint: disable=import-outside-toplevel
  from l2vit_jax.data import device_augment  # pylint: disable=import-outside-toplevel
  prepare = jax.jit(device_augment.prepare_batch(augmentation, image_shape))
  arrays = jax.device_put(shipped)
  jax.block_until_ready(prepare(arrays))
  repeats = 10
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(prepare(arrays))
  return 1e6 * (time.perf_counter() - start) / (repeats * batch)


def bench_pipeline(args) -> dict:
  """Training input paths, physics (finetuning) and SimCLR augmentation: HDF5 and ``.sparse`` read and
  augmented densely on the host ('formats'), and ``.sparse`` shipped sparse and densified + augmented
  inside the step ('sparse_device', whose images are bit-identical)."""
  from l2vit_jax.training import recipes  # pylint: disable=import-outside-toplevel
  from l2vit_jax.data import device_augment, pipeline, sources, sparse, synthetic  # pylint: disable=import-outside-toplevel
  batch = args.batch if args.tiny else 64  # the finetuning recipe's batch: per-batch costs amortise
  results = {"images": args.pipeline_images, "image_size": args.img_size, "batch": batch,
             "timed_batches": args.pipeline_batches}
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
      paths = {"hdf5": (h5_path, False, keys), "sparse": (sparse_path, False, keys),
               "sparse_device": (sparse_path, True, device_augment.batch_keys(keys, augmentation))}
      measured = {}
      for name, (path, on_device, shipped_keys) in paths.items():
        source = sources.open_source(path, labelled=True)
        dataset = pipeline.make_train_dataset(source, batch_size=batch, seed=0, augmentation=augmentation,
                                              device_augmentation=on_device)
        measured[name], last = _time_input_path(dataset, shipped_keys, args.pipeline_batches, batch)
        if on_device:
          measured[name]["device_densify_augment_us_per_image"] = _time_device_augmentation(
              augmentation, source.image_shape, {k: last[k] for k in shipped_keys}, batch)
      device = measured.pop("sparse_device")
      device["bytes_fraction_of_dense"] = (device["host_to_device_bytes_per_image"]
                                           / measured["sparse"]["host_to_device_bytes_per_image"])
      if augmentation == "physics":  # 'formats' keeps the layout earlier reports had
        results.update(augmentation=augmentation, formats=measured, sparse_device=device)
      else:
        results[augmentation] = {**measured, "sparse_device": device}
  results["sparse_speedup_over_hdf5"] = (results["formats"]["sparse"]["img_per_s"]
                                         / results["formats"]["hdf5"]["img_per_s"])
  return results


# --- main -------------------------------------------------------------------------------------------

def _print_ratios(section: str, result: dict) -> None:
  """One stderr line per ratio (median and range over rounds), and a banner for a loaded machine."""
  for key, ratio in result.items():
    if key.endswith("_rounds") and ("ratio" in key or "speedup" in key):
      print(f"[benchmark] {key[:-len('_rounds')]}: median {ratio['median']:.2f}x "
            f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}, {len(ratio['rounds'])} pairs)",
            file=sys.stderr, flush=True)
  load = result["load"]
  if load["loaded"]:
    other = load.get("other_processes_cpu_fraction")
    print(f"[benchmark] !!! LOADED MACHINE during '{section}': other processes used "
          f"{'?' if other is None else f'{other:.0%}'} of {load['cpu_count']} cores "
          f"(threshold {LOADED_FRACTION:.0%}; 1-min load {load['loadavg_1min_before']:.2f} before, "
          f"{load['loadavg_1min_after']:.2f} after). Its ratios are not figures to quote.",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  from l2vit_jax.runtime import host  # pylint: disable=import-outside-toplevel
  host.configure_platforms()  # no libtpu start-up noise off a TPU VM, as in main.py
  # JAX takes 75 % of a GPU's memory at start-up by default; the PyTorch reference shares the device.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  applied_flags = host.configure_xla_flags()
  allocator_tuned = host.configure_allocator()
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
      # glibc keeps freed memory for reuse (l2vit_jax/runtime/host.py); L2VIT_NO_MALLOC_TUNING=1 is off.
      "allocator_tuned": allocator_tuned,
  }
  if args.batch == "fill":
    report["batch_fill"] = fill_batch(args)
    args.batch = report["batch_fill"]["batch"]
    print(f"[benchmark] --batch=fill: {args.batch} images per step", file=sys.stderr, flush=True)
  timings = {}
  for section in SECTIONS:
    if section not in args.sections:
      continue
    start, monitor = time.perf_counter(), LoadMonitor()
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
    elif section == "profile":
      report["profile"] = bench_profile(args)
    timings[section] = time.perf_counter() - start
    report[section]["load"] = monitor.finish()
    report[section]["loaded"] = report[section]["load"]["loaded"]
    print(f"[benchmark] {section}: {timings[section]:.0f} s", file=sys.stderr, flush=True)
    _print_ratios(section, report[section])
  report["section_seconds"] = timings
  report["loaded"] = any(report[s]["loaded"] for s in timings)
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
