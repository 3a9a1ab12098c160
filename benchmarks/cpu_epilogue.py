"""The CPU element-wise passes, one thread, float32. Forward under no_grad at 4096x30->30, fused
against the eager composition and against the linear alone (the pass's cost is the
difference). Backward: the pass alone (the output gradient through the ReLU mask and the bias
gradient, no GEMMs) against eager's threshold_backward and sum, and a whole forward+backward of
add_relu, at widths 10 to 512. Writes <out>/cpu-epilogue-<date>.md.

    .venv/bin/python benchmarks/cpu_epilogue.py [--out benchmarks/results]
"""

import argparse
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


def backward_rows(m, k, n):
    """The backward pass alone, and a whole add_relu forward+backward, fused against eager."""
    x, w, b, r = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    grad = torch.randn(m, n)
    mask = torch.ops.fusedskip.fused_linear([x], w, b, r, True, True)[1]
    preact = F.linear(x, w, b) + r
    backward = torch.ops.fusedskip.fused_linear_backward.default
    pass_fused = median_us(lambda: backward(grad, [x], w, mask, True, [False, False, True, True]))
    pass_eager = median_us(lambda: torch.ops.aten.threshold_backward(grad, preact, 0).sum(0))
    params = [t.requires_grad_() for t in (w, b, r)]
    step_fused = median_us(lambda: torch.autograd.grad(
        fusedskip.linear_relu_residual(x, w, b, r, order="add_relu"), params, grad))
    step_eager = median_us(lambda: torch.autograd.grad(
        torch.relu(F.linear(x, w, b) + r), params, grad))
    return (f"| {m}x{k}->{n} | {pass_fused:.1f} | {pass_eager:.1f} | {step_fused:.1f} | "
            f"{step_eager:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    args = parser.parse_args()
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
    lines = ["# CPU element-wise passes, float32, 1 thread\n",
             f"device: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, commit {commit}, "
             f"{datetime.date.today().isoformat()}\n",
             f"Forward under no_grad, {m}x{k}->{n}:\n",
             "| form | fused (µs) | eager (µs) | linear alone (µs) |", "|---|---:|---:|---:|"]
    with torch.no_grad():
        linear = median_us(lambda: F.linear(x, w, b))
        for name, (fused, eager) in cases.items():
            lines.append(f"| {name} | {median_us(fused):.1f} | {median_us(eager):.1f} | "
                         f"{linear:.1f} |")
    lines += ["", "Backward: the pass alone (bias and pre-activation gradients), and add_relu's "
              "forward + autograd.grad of weight, bias and residual:", "",
              "| M×K->N | pass fused (µs) | threshold_backward + sum (µs) | step fused (µs) | "
              "step eager (µs) |", "|---|---:|---:|---:|---:|"]
    lines += [backward_rows(*size) for size in ((4096, 10, 10), (4096, 30, 30), (4096, 64, 64),
                                                (1024, 256, 256), (512, 512, 512))]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"cpu-epilogue-{datetime.date.today().isoformat()}.md")
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
