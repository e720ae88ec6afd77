"""Converts an HDF5 jet file into the compact, lossless ``.sparse`` format (l2vit_jax.data.sparse).

  python scripts/prepare_data.py --input data/Dataset_Specific_labelled_full_only_for_2i.h5 \
      --output data/Dataset_Specific_labelled_full_only_for_2i.sparse

Streams ``--chunk-size`` images at a time (memory stays near that many dense images), writes under a
temporary name and renames when complete. Point ``config.data.labelled_path`` /
``config.data.unlabelled_path`` at the result: sources are picked by file extension.
"""

from __future__ import annotations

import argparse
import sys
import time

from l2vit_jax.data import sparse
from l2vit_jax import errors


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="HDF5 jet file (labelled or unlabelled)")
  parser.add_argument("--output", required=True, help=f"output path, ending in {sparse.SUFFIX}")
  parser.add_argument("--chunk-size", type=int, default=256, help="images converted at a time")
  labels = parser.add_mutually_exclusive_group()
  labels.add_argument(
    "--labelled",
    dest="labelled",
    action="store_true",
    default=None,
    help="require and carry Y/m/pT (default: carry them if present)",
  )
  labels.add_argument(
    "--unlabelled", dest="labelled", action="store_false", help="drop labels even if present"
  )
  args = parser.parse_args(argv)
  if not args.output.endswith(sparse.SUFFIX):
    parser.error(f"--output must end in {sparse.SUFFIX} (sources are picked by extension)")
  start = time.perf_counter()
  try:
    # Without a progress callback the conversion draws its own bar on a terminal (console.ProgressBar).
    summary = sparse.convert_hdf5(args.input, args.output, labelled=args.labelled, chunk_size=args.chunk_size)
  except errors.DataError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  ratio = summary["input_bytes"] / max(summary["output_bytes"], 1)
  print(
    f"{args.output}: {summary['num_examples']} images "
    f"({'labelled' if summary['labelled'] else 'unlabelled'}), {summary['nonzeros']} non-zero pixels, "
    f"{summary['output_bytes'] / 2**20:.1f} MiB ({ratio:.1f}× smaller than the HDF5 file) in "
    f"{time.perf_counter() - start:.1f} s",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
