"""Fused vs eager, forward and forward+backward, on whatever device is present.

    python -m fusedskip.bench [--device cpu|cuda] [--dtype float32] [--quick] [--out DIR]

A short demonstration sweep: the seed MLP's widths (10-30) and a few larger layers, for
linear+ReLU+residual and a two-input concat. Every fused result is checked against the reference
before it is timed. Prints a table; with --out, writes the rows as JSON next to a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.utils.benchmark as benchmark

import fusedskip
from fusedskip import reference

CPU_SHAPES = [(64, 10, 10), (4096, 30, 30), (4096, 256, 256), (1024, 1024, 1024)]
CUDA_SHAPES = [(64, 10, 10), (65536, 30, 30), (8192, 1024, 1024), (8192, 4096, 4096)]


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=root,
                           text=True, capture_output=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def make_case(op, rows, k, n, device, dtype):
    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    w, b = rand(n, k, grad=True), rand(n, grad=True)
    if op == "relu_add":
        x, r = rand(rows, k, grad=True), rand(rows, n)
        return ((x, w, b, r),
                lambda: fusedskip.linear_relu_residual(x, w, b, r),
                lambda: reference.linear_relu_residual(x, w, b, r))
    x1, x2 = rand(rows, k // 2, grad=True), rand(rows, k - k // 2, grad=True)
    return ((x1, x2, w, b),
            lambda: fusedskip.linear_concat([x1, x2], w, b),
            lambda: reference.linear_concat([x1, x2], w, b))


def time_us(fn, mode, min_run_time):
    if mode == "forward+backward":
        def stmt():
            fn().sum().backward()
    else:
        stmt = fn
    return benchmark.Timer("stmt()", globals={"stmt": stmt}).blocked_autorange(
        min_run_time=min_run_time).median * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if fusedskip.cuda_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="two shapes, short timings")
    parser.add_argument("--out", default=None, help="folder for the rows (JSON) and table (md)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    min_run_time = 0.05 if args.quick else 0.3
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())

    rows = []
    total = len(shapes) * 2 * 2
    print(f"fusedskip {fusedskip.__version__} on {name} ({device.type}), {dtype}, "
          f"torch {torch.__version__}", flush=True)
    header = f"{'op':9s} {'shape (M, K, N)':20s} {'mode':17s} {'eager µs':>10s} {'fused µs':>10s}  speedup"
    print(header)
    for op in ("relu_add", "concat2"):
        for rows_, k, n in shapes:
            tensors, fused, eager = make_case(op, rows_, k, n, device, dtype)
            out, ref = fused(), eager()
            err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
            for mode in ("forward", "forward+backward"):
                row = {"op": op, "M": rows_, "K": k, "N": n, "mode": mode, "dtype": str(dtype),
                       "device": name, "rel_err": err, "correct": err <= tolerance}
                if row["correct"]:
                    row["eager_us"] = time_us(eager, mode, min_run_time)
                    row["fused_us"] = time_us(fused, mode, min_run_time)
                    row["speedup"] = row["eager_us"] / row["fused_us"]
                    print(f"{op:9s} {str((rows_, k, n)):20s} {mode:17s} {row['eager_us']:10.1f} "
                          f"{row['fused_us']:10.1f}  x{row['speedup']:.2f}   "
                          f"[{len(rows) + 1}/{total}]", flush=True)
                else:
                    print(f"{op:9s} {str((rows_, k, n)):20s} {mode:17s} MISMATCH: relative "
                          f"error {err:.3g} > {tolerance:g}, not timed", flush=True)
                rows.append(row)

    if args.out:
        meta = {"device": name, "dtype": str(dtype), "torch": torch.__version__,
                "cuda": torch.version.cuda, "python": sys.version.split()[0],
                "commit": git_commit(), "date": datetime.date.today().isoformat()}
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"bench-{device.type}-{meta['date']}")
        with open(path + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(path + ".md", "w") as f:
            f.write(f"# fused vs eager on {name}\n\n{json.dumps(meta)}\n\n")
            f.write("| op | M, K, N | mode | eager µs | fused µs | speedup |\n")
            f.write("|---|---|---|---:|---:|---:|\n")
            for r in rows:
                if r["correct"]:
                    f.write(f"| {r['op']} | {r['M']}, {r['K']}, {r['N']} | {r['mode']} | "
                            f"{r['eager_us']:.1f} | {r['fused_us']:.1f} | {r['speedup']:.2f} |\n")
        print(f"wrote {path}.json and .md")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
