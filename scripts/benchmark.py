"""Speed, memory and input-pipeline benchmark of l2vit_jax, with the PyTorch reference side by side.

  python scripts/benchmark.py --out runs/benchmark.json            # default model, batch 16, fp32
  python scripts/benchmark.py --tiny                                # seconds; what the tests run
  python scripts/benchmark.py --only=depthwise,attention --batch=16

Prints one JSON object (and writes it to ``--out``). Sections (``--only`` picks a subset):

* ``matmul``: a 10000×256×1024 float32 matmul, the machine's practical FLOP/s peak for this run.
* ``model``: the real jitted train step (the finetune recipe's, built as training builds it:
  ``recipes.build_model_and_loss`` + ``steps.build_steps``) and the jitted eval-mode forward, after
  compilation: img/s, compile time, FLOPs (XLA's cost analysis and an analytic count) and their rate
  as a fraction of the matmul peak, peak memory. With ``torch`` importable, the PyTorch reference
  model (same configuration and device, bf16 under autocast where ours is bf16; forward + backward +
  clipping + AdamW; inference under ``no_grad``) is timed interleaved with ours in ``--pairs`` rounds
  (each round runs ours and theirs once, the order reversed every other round so that a drift in
  machine speed hits both alike); every ours/PyTorch ratio is reported per round and as the median
  and min–max over rounds.
* ``precision``: float32 vs bfloat16 train-step img/s (paired the same way).
* ``profile`` (only when named in ``--only``): milliseconds per model part of our train step and
  inference (a JAX profiler trace; each XLA thunk attributed to the ``tpu/accounting.py`` part its
  instruction's named scope gives) beside PyTorch's (torch.profiler self CPU time, its submodules
  ranged as the same parts): ``--only=profile --steps=2 --out docs/profile_cpu.json``.
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
rusage). A section where other processes used more than ``bench.load.LOADED_FRACTION`` of the
cores is marked ``"loaded": true`` and a banner says so: load slowed PyTorch's thread pool far more
than XLA's (the ratios this script once reported on a busy machine, 1.7×, were 0.6–1.0× on a quiet
one), so ratios from a loaded run are not figures to quote.

The measuring lives in ``l2vit_jax/bench/`` (one job per module); this script parses the command line,
configures the host as ``l2vit_jax.main`` does, runs the sections from ``SECTIONS`` and writes the report.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform as python_platform
import sys
import time

from l2vit_jax.bench import load, timing
from l2vit_jax.runtime import process_setup

# Section name -> (module of l2vit_jax.bench, function(args, report so far) -> the section's record),
# in the order they run. The modules import JAX: they are imported once the host is configured.
SECTIONS = {
  "matmul": ("kernels", lambda module, args, report: module.bench_matmul(args)),
  "model": ("model", lambda module, args, report: module.bench_model(args, report.get("matmul"))),
  "precision": ("model", lambda module, args, report: module.bench_precision(args)),
  "profile": ("profiling", lambda module, args, report: module.bench_profile(args)),
  "depthwise": ("kernels", lambda module, args, report: module.bench_depthwise(args)),
  "attention": ("kernels", lambda module, args, report: module.bench_attention(args)),
  "pipeline": ("input_pipeline", lambda module, args, report: module.bench_pipeline(args)),
}
TINY_MODEL = dict(img_size=25, patch_size=5, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
PLAIN_DEFAULTS = dict(
  only=",".join(s for s in SECTIONS if s != "profile"), batch=16, dtype="float32", steps=3
)
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
  parser.add_argument(
    "--only", default=None, help=f"comma-separated subset of {tuple(SECTIONS)} (default: all but 'profile')"
  )
  parser.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (tests, smoke runs)")
  parser.add_argument(
    "--accelerator",
    action="store_true",
    help="the GPU/TPU benchmark: --only=model --dtype=bfloat16 --batch=fill --steps=10 "
    "(options given explicitly win)",
  )
  parser.add_argument(
    "--batch",
    type=_batch_size,
    default=None,
    help="images per step, or 'fill': the largest power of two whose train step fits "
    "--fill-fraction of the device's memory (default 16)",
  )
  parser.add_argument(
    "--fill-fraction",
    type=float,
    default=0.4,
    help="share of the device's memory our train step may plan for with --batch=fill; "
    "the rest is the PyTorch reference's, which shares the device",
  )
  parser.add_argument("--max-batch", type=int, default=1024, help="upper bound of --batch=fill")
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="compute dtype of the 'model' section (default float32; the PyTorch "
    "reference runs bfloat16 under autocast)",
  )
  parser.add_argument("--attention", choices=("linear", "softmax"), default="linear")
  parser.add_argument("--img-size", type=int, default=125)
  parser.add_argument("--patch-size", type=int, default=5)
  parser.add_argument("--embed-dim", type=int, default=256)
  parser.add_argument("--depth", type=int, default=6)
  parser.add_argument("--num-heads", type=int, default=4)
  parser.add_argument("--mlp-ratio", type=float, default=4.0)
  parser.add_argument("--depthwise-implementation", default="auto")
  parser.add_argument(
    "--max-patch-mib",
    type=int,
    default=128,
    help="skip the 'patches' depthwise formulation when its patch tensor is larger",
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="timed steps per runner and round (default 3, 10 with --accelerator)",
  )
  parser.add_argument(
    "--pairs",
    "--repeats",
    dest="pairs",
    type=int,
    default=None,
    help="paired rounds (ours then theirs, alternating order) behind each ratio; default 5 (2 with --tiny)",
  )
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
    parser.error(f"unknown sections {sorted(unknown)}; choose from {tuple(SECTIONS)}")
  if args.pairs is None:
    args.pairs = 2 if args.tiny else 5
  return args


def run_section(name: str, args, report: dict) -> dict:
  """One section's record (``SECTIONS``), with the machine's load while it ran."""
  module_name, measure = SECTIONS[name]
  module = importlib.import_module(f"l2vit_jax.bench.{module_name}")
  monitor = load.LoadMonitor()
  result = measure(module, args, report)
  result["load"] = monitor.finish()
  result["loaded"] = result["load"]["loaded"]
  return result


def _print_ratios(section: str, result: dict) -> None:
  """One stderr line per ratio (median and range over rounds), and a banner for a loaded machine."""
  for key, ratio in result.items():
    if key.endswith("_rounds") and ("ratio" in key or "speedup" in key):
      print(
        f"[benchmark] {key[: -len('_rounds')]}: median {ratio['median']:.2f}x "
        f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}, {len(ratio['rounds'])} pairs)",
        file=sys.stderr,
        flush=True,
      )
  record = result["load"]
  if record["loaded"]:
    other = record.get("other_processes_cpu_fraction")
    print(
      f"[benchmark] !!! LOADED MACHINE during '{section}': other processes used "
      f"{'?' if other is None else f'{other:.0%}'} of {record['cpu_count']} cores "
      f"(threshold {record['loaded_fraction_threshold']:.0%}; 1-min load "
      f"{record['loadavg_1min_before']:.2f} before, {record['loadavg_1min_after']:.2f} after). "
      "Its ratios are not figures to quote.",
      file=sys.stderr,
      flush=True,
    )


def _header(argv: list[str] | None, applied_flags: list[str], allocator_tuned: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  return {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
    "hardware": {
      "cpu_count": os.cpu_count(),
      "processor": python_platform.processor() or python_platform.machine(),
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
    },
    "versions": {"python": python_platform.python_version(), "jax": jax.__version__},
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "xla_flags_added_by_l2vit": applied_flags,
    # glibc keeps freed memory for reuse (runtime/process_setup.py); L2VIT_NO_MALLOC_TUNING=1 is off.
    "allocator_tuned": allocator_tuned,
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  process_setup.configure_platforms()  # no libtpu start-up noise off a TPU VM, as in main.py
  # JAX takes 75 % of a GPU's memory at start-up by default; the PyTorch reference shares the device.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  report = _header(argv, process_setup.configure_xla_flags(), process_setup.configure_allocator())
  if args.batch == "fill":
    from l2vit_jax.bench import fill  # pylint: disable=import-outside-toplevel

    report["batch_fill"] = fill.fill_batch(args, default_batch=PLAIN_DEFAULTS["batch"])
    args.batch = report["batch_fill"]["batch"]
    print(f"[benchmark] --batch=fill: {args.batch} images per step", file=sys.stderr, flush=True)
  timings = {}
  for section in (s for s in SECTIONS if s in args.sections):
    start = time.perf_counter()
    report[section] = run_section(section, args, report)
    timings[section] = time.perf_counter() - start
    print(f"[benchmark] {section}: {timings[section]:.0f} s", file=sys.stderr, flush=True)
    _print_ratios(section, report[section])
  report["section_seconds"] = timings
  report["loaded"] = any(report[s]["loaded"] for s in timings)
  report["peak_rss_mib"] = timing.max_rss_mib()
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    from l2vit_jax.runtime import paths  # pylint: disable=import-outside-toplevel

    paths.write_text(args.out, text + "\n")
  return report


if __name__ == "__main__":
  main()
