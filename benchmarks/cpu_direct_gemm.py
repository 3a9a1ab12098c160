"""Where the CPU kernel's direct loops stop beating one BLAS call per input: forward+backward of
a two-input concat + ReLU, one thread, each implementation forced with FUSEDSKIP_BACKEND
(gemm_epilogue = ATen GEMMs, "aten" below; native = the direct loops, "direct").

    python benchmarks/cpu_direct_gemm.py [--out benchmarks/results]

The threshold it informs is kCpuLoopsMaxWork in csrc/backend.cpp.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

SHAPES = [(64, 10, 10), (128, 16, 16), (256, 16, 16), (64, 64, 64), (512, 32, 32),
          (128, 128, 128), (4096, 30, 30)]

CHILD = r"""
import json, sys, timeit, torch, fusedskip
torch.set_num_threads(1)
out = []
for rows, k, n in json.loads(sys.argv[1]):
    x = torch.randn(rows, k)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    step = lambda: fusedskip.linear_concat([x[:, :k // 2], x[:, k // 2:]], w, b,
                                           activation="relu").sum().backward()
    for _ in range(20):
        step()
    out.append(min(timeit.repeat(step, number=100, repeat=7)) / 100 * 1e6)
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    times = {}
    for mode, backend in (("aten", "gemm_epilogue"), ("direct", "native")):
        env = dict(os.environ, FUSEDSKIP_BACKEND=backend)
        result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES)], env=env,
                                capture_output=True, text=True, check=True)
        times[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    date = datetime.date.today().isoformat()
    lines = ["# CPU direct loops vs ATen GEMMs\n",
             f"forward+backward, concat of 2 inputs + ReLU, 1 thread, best of 7x100 calls; "
             f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, Python {platform.python_version()}, commit {commit}, "
             f"{date}\n",
             "| M, K, N | multiply-adds | aten (µs) | direct (µs) |", "|---|---:|---:|---:|"]
    rows = []
    for (m, k, n), aten_us, direct_us in zip(SHAPES, times["aten"], times["direct"]):
        rows.append({"M": m, "K": k, "N": n, "work": m * k * n, "aten_us": round(aten_us, 1),
                     "direct_us": round(direct_us, 1)})
        lines.append(f"| {m}, {k}, {n} | {m * k * n} | {aten_us:.1f} | {direct_us:.1f} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu-direct-gemm-{date}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"device": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "python": platform.python_version(), "commit": commit, "date": date,
                   "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
