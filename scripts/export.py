r"""Exports a finetuned checkpoint as a jax.export artifact and an ONNX model (l2vit_jax/interop/export.py).

  python scripts/export.py --workdir=runs/finetune --output=runs/finetune/export [--formats=jax,onnx]

Writes OUTPUT/model.jax_export, OUTPUT/model.onnx and OUTPUT/model.json (the meta, the input and
output names, and the ONNX model's largest difference from the JAX function on fixed images). Both
models take raw pixels (batch, H, W, 8) float32 and return the class-1 probability and the jet mass
in GeV, any batch size. The ONNX export needs the export extra: pip install -e ".[export]".
Failures are one line on stderr (``error: ...``) with exit status 1.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # exporting needs no accelerator

from l2vit_jax import errors  # pylint: disable=wrong-import-position
from l2vit_jax.interop import export  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="run directory (or checkpoint) to export")
  parser.add_argument("--output", help="directory for the files (default: WORKDIR/export)")
  parser.add_argument(
    "--formats",
    default=",".join(export.FORMATS),
    help=f"comma-separated, from {','.join(export.FORMATS)} (default: both)",
  )
  parser.add_argument("--opset", type=int, default=export.ONNX_OPSET, help="ONNX opset version")
  args = parser.parse_args(argv)
  output = args.output or os.path.join(args.workdir, "export")
  try:
    sidecar = export.export_checkpoint(
      args.workdir,
      output,
      opset=args.opset,
      formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
    )
  except errors.UserError as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 1
  for name, entry in sidecar["files"].items():
    extra = entry.get("max_abs_difference_to_jax")
    note = f" (largest difference to JAX: {extra:.2e})" if extra is not None else ""
    print(f"{name}: {os.path.join(output, entry['file'])}{note}")
  print(f"meta: {os.path.join(output, export.SIDECAR_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
