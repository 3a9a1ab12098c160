"""The library path's concat backward on CPU: the weight gradient as one GEMM per aligned block
(each column block written in place) against one GEMM over the concatenation (the fallback), at
the same commit. (Before 2026-11-28 the inputs' gradients were split the same way; since then
both take one GEMM over the whole width for them.)

Both run the fused op with the `gemm_epilogue` backend and the same values; the fallback is
reached by handing it inputs that start one element into a wider buffer (off a 16-byte
boundary, so library_gemm_per_block in csrc/backend.cpp says no). Eager is
`F.linear(torch.cat(xs, -1), w, b)`. Forward+backward of `.sum()`, float32, two threads.
Writes benchmarks/results/cpu-concat-blocks-<date>.md.

    .venv/bin/python benchmarks/cpu_concat_blocks.py
"""

import datetime
import os
import platform
import subprocess

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fusedskip

SHAPES = ((1024, (80, 176), 256), (4096, (128, 256), 384), (4096, (64, 64, 64, 64), 256),
          (16384, (64, 128), 64))


def median_us(fn):
    # Timer runs on one thread unless told: on the two main set.
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                           ).blocked_autorange(min_run_time=1).median * 1e6


def off_boundary(t):
    wide = torch.empty(t.shape[0], t.shape[1] + 1)
    wide[:, 1:] = t
    return wide[:, 1:].requires_grad_()


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip()
    lines = ["# CPU concat backward: one GEMM per block or one over the concatenation\n",
             f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, Python {platform.python_version()}, commit {commit}, "
             f"{datetime.date.today().isoformat()}; forward+backward, float32, 2 threads, "
             "`torch.utils.benchmark` medians (µs)\n",
             "| M | widths | N | per block | over the cat | eager | cat / per block |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for m, widths, n in SHAPES:
        xs = [torch.randn(m, k).requires_grad_() for k in widths]
        shifted = [off_boundary(x.detach()) for x in xs]
        w = torch.randn(n, sum(widths), requires_grad=True)
        b = torch.randn(n, requires_grad=True)

        def fused(inputs):
            return lambda: fusedskip.linear_concat(inputs, w, b).sum().backward()

        with fusedskip.use_backend("gemm_epilogue"):
            per_block, over_cat = median_us(fused(xs)), median_us(fused(shifted))
        eager = median_us(lambda: F.linear(torch.cat(xs, -1), w, b).sum().backward())
        lines.append(f"| {m} | {list(widths)} | {n} | {per_block:.0f} | {over_cat:.0f} | "
                     f"{eager:.0f} | {over_cat / per_block:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = os.path.join(here, "results", f"cpu-concat-blocks-{datetime.date.today().isoformat()}.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
