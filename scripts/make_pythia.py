"""Writes a jet file of Pythia 8 top and QCD jets through the CMS-like detector model (real files' schema).

Physics and detector: l2vit_jax/data/pythia.py and detector.py; files, resume and determinism:
l2vit_jax/data/jet_files.py. A killed run continues where it stopped when rerun with the same
arguments. Examples:

  python scripts/make_pythia.py --out data/pythia_labelled.h5 --num 10000 --sparse
  python scripts/make_pythia.py --out data/pythia_unlabelled.h5 --num 60000 --unlabelled --seed 1

Bad arguments print one ``error: ...`` line and exit with status 2, before any event is generated.
"""

from __future__ import annotations

import argparse
import os
import sys

from l2vit_jax import errors
from l2vit_jax.data import detector, jet_files


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, like every other bad argument, instead of usage + error
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = _Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="HDF5 file to write (replaced only once complete)")
  parser.add_argument("--num", type=int, required=True, help="number of jets")
  parser.add_argument("--unlabelled", action="store_true", help="write only 'jet', like the SimCLR file")
  parser.add_argument("--seed", type=int, default=0, help="the content depends only on seed and settings")
  parser.add_argument(
    "--image-size",
    type=int,
    default=detector.REAL_IMAGE_SIZE,
    help="pixels per side, a multiple of 25; smaller sizes show the same window coarser",
  )
  parser.add_argument(
    "--workers",
    type=int,
    default=None,
    help="processes (default: one per core); the content does not depend on it",
  )
  parser.add_argument("--pt-min", type=float, default=jet_files.DEFAULT_PT_RANGE[0], help="GeV")
  parser.add_argument("--pt-max", type=float, default=jet_files.DEFAULT_PT_RANGE[1], help="GeV")
  parser.add_argument(
    "--signal-fraction", type=float, default=0.5, help="fraction of top jets (0.5: balanced classes)"
  )
  parser.add_argument(
    "--chunk-size",
    type=int,
    default=jet_files.DEFAULT_CHUNK_SIZE,
    help="jets per resumable unit of work (part of the content's identity)",
  )
  parser.add_argument("--sparse", action="store_true", help="also write NAME.sparse")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    summary = jet_files.write_pythia_hdf5(
      args.out,
      args.num,
      labelled=not args.unlabelled,
      seed=args.seed,
      image_size=args.image_size,
      workers=args.workers,
      pt_range=(args.pt_min, args.pt_max),
      signal_fraction=args.signal_fraction,
      chunk_size=args.chunk_size,
      sparse=args.sparse,
      progress=not args.no_progress,
    )
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  size = os.path.getsize(args.out)
  written = [summary["path"], summary["sidecar"]] + ([summary["sparse"]] if summary["sparse"] else [])
  print(
    f"wrote {', '.join(os.path.abspath(p) for p in written)}: {args.num} jets of "
    f"{args.image_size}x{args.image_size}x{detector.NUM_CHANNELS}, "
    f"{'unlabelled' if args.unlabelled else 'labelled'}, {size / 2**30:.2f} GiB; "
    f"{summary['generated']} generated at {summary['jets_per_second']:.1f} jets/s"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
