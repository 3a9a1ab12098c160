"""One line per kernel from Nsight Compute's raw CSV (`ncu --csv --page raw ...`): how long it
ran, how busy it kept the multiprocessors and memory, its occupancy, and what its warps waited
on most. What `scripts/gpu_profile.sh` writes for the native kernel's narrow layers, whose
device time is several times what their bytes and operations need (benchmarks/NOTES.md,
"Native kernel").

    python benchmarks/ncu_summary.py ncu-relu_add.csv [more.csv ...] [--out summary.md]

Metrics missing from a file (a section not collected, another ncu version's name) print as "-".
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

TIME_METRIC = "gpu__time_duration.sum"
# (column title, raw metric name, digits)
COLUMNS = [
    ("µs", TIME_METRIC, 1),
    ("blocks", "launch__grid_size", 0),
    ("regs", "launch__registers_per_thread", 0),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 0),
    ("memory %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", 0),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed", 0),
    ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active", 0),
    ("occupancy % (of possible)", "sm__warps_active.avg.pct_of_peak_sustained_active", 0),
    ("possible %", "sm__maximum_warps_per_active_cycle_pct", 0),
    ("instructions", "smsp__inst_executed.sum", 0),
]
# Cycles a warp spent stalled per instruction it issued, by reason (the Warp State section).
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
TOP_STALLS = 3


def number(text: str) -> Optional[float]:
    """ncu's value as a number: thousands separators dropped; None where it is not one."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


# The duration in µs from whichever unit ncu printed it in (base units: nanoseconds).
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}


def read_rows(path: str) -> List[Dict[str, str]]:
    """The kernels' rows of one raw CSV, the duration in µs. ncu prints its own lines (==PROF==,
    the program's output) before the table, and a row of units under the header: the units are
    read, the rest skipped."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    units = next((row for row in rows if not row.get("ID")), {})
    scale = TO_US.get(units.get(TIME_METRIC, "nsecond"), None)
    kernels = [row for row in rows if number(row.get("ID", "")) is not None]
    for row in kernels:
        value = number(row.get(TIME_METRIC, ""))
        row[TIME_METRIC] = "" if value is None or scale is None else str(value * scale)
    return kernels


def kernel_name(row: Dict[str, str], width: int = 70) -> str:
    name = row.get("Kernel Name", "?").replace("void ", "")
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    return name if len(name) <= width else name[:40] + "…" + name[-(width - 41):]


def summary_lines(rows: Sequence[Dict[str, str]]) -> List[str]:
    head = ["kernel"] + [title for title, _, _ in COLUMNS] + ["top stalls (cycles per instruction)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(COLUMNS) + "|---|"]
    for row in rows:
        cells = [f"`{kernel_name(row)}`"]
        for _, metric, digits in COLUMNS:
            value = number(row.get(metric, ""))
            cells.append("-" if value is None else f"{value:,.{digits}f}")
        stalls = sorted(((number(v), STALL.match(k).group(1)) for k, v in row.items()
                         if k and STALL.match(k) and number(v) is not None), reverse=True)
        cells.append(", ".join(f"{name} {value:.1f}" for value, name in stalls[:TOP_STALLS]) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--out", default=None,
                        help="also write the tables to this file (replacing it)")
    args = parser.parse_args(argv)
    # A shell glob that matched nothing arrives as itself: say so, not a traceback.
    missing = [path for path in args.csv if not os.path.isfile(path)]
    if missing:
        print(f"ncu_summary: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    text = []
    for path in args.csv:
        rows = read_rows(path)
        text += [f"\n### {path}\n", *(summary_lines(rows) if rows else ["no kernels profiled"])]
    print("\n".join(text))
    if args.out:
        # Written anew: the summary is of these files only, not of an earlier run's as well.
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
