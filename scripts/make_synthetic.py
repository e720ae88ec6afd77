"""Writes a synthetic CMS-like jet file with the real files' schema.

Stands in for the real data wherever it cannot be downloaded (tests, demos, CI). Examples:

  python scripts/make_synthetic.py --out data/synthetic_labelled.h5 --num 10000
  python scripts/make_synthetic.py --out data/synthetic_unlabelled.h5 --num 60000 --unlabelled
"""

from __future__ import annotations

import argparse
import os
import time

from l2vit_jax.data import detector, synthetic


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="HDF5 file to write (replaced only once complete)")
  parser.add_argument("--num", type=int, required=True, help="number of jet images")
  parser.add_argument("--unlabelled", action="store_true", help="write only 'jet', like the SimCLR file")
  parser.add_argument("--seed", type=int, default=0, help="the content depends only on seed, num, size")
  parser.add_argument(
    "--image-size",
    type=int,
    default=detector.REAL_IMAGE_SIZE,
    help="pixels per side; smaller sizes show the same window with coarser pixels",
  )
  parser.add_argument(
    "--chunk-size",
    type=int,
    default=256,
    help="images generated and written at a time (bounds memory, not content)",
  )
  args = parser.parse_args(argv)
  for name in ("num", "image_size", "chunk_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  start = time.time()
  # Without a progress callback the writer draws its own bar on a terminal (runtime.console.ProgressBar).
  synthetic.write_synthetic_hdf5(
    args.out,
    args.num,
    labelled=not args.unlabelled,
    seed=args.seed,
    image_size=args.image_size,
    chunk_size=args.chunk_size,
  )
  size = os.path.getsize(args.out)
  print(
    f"wrote {os.path.abspath(args.out)}: {args.num} images of {args.image_size}x{args.image_size}x"
    f"{detector.NUM_CHANNELS}, {'unlabelled' if args.unlabelled else 'labelled'}, "
    f"{size / 2**30:.2f} GiB ({size} bytes) in {time.time() - start:.1f} s"
  )


if __name__ == "__main__":
  main()
