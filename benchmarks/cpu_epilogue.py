"""The CPU element-wise pass at a mid size: forward under no_grad at 4096x30->30, one thread,
fused against the eager composition and against the linear alone (the pass's cost is the
difference). Writes benchmarks/results/cpu-epilogue-<date>.md.

    .venv/bin/python benchmarks/cpu_epilogue.py
"""

import datetime
import os
import platform
import subprocess

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fusedskip


def median_us(fn):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1).median * 1e6


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, k, n = 4096, 30, 30
    x, w, b, r = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    cases = {
        "relu_add": (lambda: fusedskip.linear_relu_residual(x, w, b, r),
                     lambda: torch.relu(F.linear(x, w, b)) + r),
        "add_relu": (lambda: fusedskip.linear_relu_residual(x, w, b, r, order="add_relu"),
                     lambda: torch.relu(F.linear(x, w, b) + r)),
        "linear_relu": (lambda: fusedskip.linear_concat([x], w, b, activation="relu"),
                        lambda: torch.relu(F.linear(x, w, b))),
    }
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip()
    lines = [f"# CPU element-wise pass, forward under no_grad, {m}x{k}->{n}, float32, 1 thread\n",
             f"device: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, commit {commit}, "
             f"{datetime.date.today().isoformat()}\n",
             "| form | fused (µs) | eager (µs) | linear alone (µs) |", "|---|---:|---:|---:|"]
    with torch.no_grad():
        linear = median_us(lambda: F.linear(x, w, b))
        for name, (fused, eager) in cases.items():
            lines.append(f"| {name} | {median_us(fused):.1f} | {median_us(eager):.1f} | "
                         f"{linear:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(here, "results", f"cpu-epilogue-{datetime.date.today().isoformat()}.md")
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
