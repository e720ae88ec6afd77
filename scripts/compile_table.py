"""Markdown rows of the compile table of docs/compile_only.md from ``scripts/compile_tpu.py --out`` JSON files.

python scripts/compile_table.py runs/compile/*.json            # rows, one per file, sorted
python scripts/compile_table.py --header runs/compile/*.json   # with the table's header
"""

from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30
MIB = 2**20
HEADER = (
  "| task | topology | global batch | dtype | peak GiB | GFLOP | GFLOP/image | GB accessed | "
  "of them HBM | collectives | roofline ms (bound) | img/s ≤ | MFU at bound | "
  "from HBM bytes: ms (bound), MFU | max global batch | compile s |\n"
  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _collectives(collectives: dict) -> str:
  return ", ".join(
    f"{kind} {entry['count']}×, {entry['bytes'] / MIB:.1f} MiB" for kind, entry in sorted(collectives.items())
  )


def _max_batch(report: dict) -> str:
  search = report.get("max_global_batch")
  if not search:
    return "not searched"
  value = search["largest_fitting"]
  return f"{value}" if search["exact"] else f"{value} (≥, search stopped)"


def _hbm_roofline(roofline: dict | None) -> str:
  if not roofline:  # reports written before HBM traffic was counted
    return "—"
  return (
    f"{roofline['step_seconds_lower_bound'] * 1e3:.1f} ({roofline['bound_by']}), "
    f"{roofline['mfu_at_bound']:.2f}"
  )


def table_row(report: dict) -> str:
  """One row: per-chip memory, FLOPs and traffic of the train step, its collectives and roofline."""
  step, roofline = report["train_step"], report["roofline"]
  cells = [
    report["task"],
    report["topology"],
    str(report["global_batch"]),
    report["dtype"],
    f"{step['peak_memory_bytes'] / GIB:.2f}",
    f"{step['flops'] / 1e9:.0f}",
    f"{report['flops_per_image'] / 1e9:.1f}",
    f"{step['bytes_accessed'] / 1e9:.1f}",
    f"{step['hbm_bytes'] / 1e9:.2f}" if "hbm_bytes" in step else "—",
    _collectives(step["collectives"]),
    f"{roofline['step_seconds_lower_bound'] * 1e3:.1f} ({roofline['bound_by']})",
    f"{roofline['images_per_second_upper_bound']:.0f}",
    f"{roofline['mfu_at_bound']:.2f}",
    _hbm_roofline(report.get("roofline_hbm")),
    _max_batch(report),
    f"{report['train_compile_seconds']:.0f} / {report['train_compile_cpu_seconds']:.0f}",
  ]
  return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("reports", nargs="+", help="JSON files written by scripts/compile_tpu.py --out")
  parser.add_argument("--header", action="store_true", help="print the table's header first")
  args = parser.parse_args(argv)
  reports = []
  for path in args.reports:
    try:
      with open(path) as file:
        reports.append(json.load(file))
    except (OSError, ValueError) as error:
      print(f"error: {path}: not a compile_tpu.py report ({error})", file=sys.stderr)
      return 1
  order = {"simclr": 0, "finetune": 1, "mae": 2}
  reports.sort(key=lambda r: (order.get(r["task"], 9), r["topology"], r["global_batch"], r["dtype"]))
  if args.header:
    print(HEADER)
  for report in reports:
    print(table_row(report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
