"""Host time per call at launch-bound sizes: the fused functional API and modules against the
eager composition they replace, on tiny CPU tensors (where the maths costs almost nothing, so
the time is dispatch, autograd bookkeeping and Python).

    python benchmarks/host_overhead.py [--out benchmarks/results] [--threads 1]

Writes <out>/host-overhead-<device>-<date>.json (+ .md) with versions and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import fusedskip
from fusedskip.bench import environment


def cases(rows, width):
    x = torch.randn(rows, width)
    w = torch.randn(width, width, requires_grad=True)
    b = torch.randn(width, requires_grad=True)
    r = torch.randn(rows, width)
    x1, x2 = torch.randn(rows, width // 2), torch.randn(rows, width - width // 2)
    wc = torch.randn(width, width, requires_grad=True)
    return {
        "relu_add": (
            lambda: torch.relu(F.linear(x, w, b)) + r,
            lambda: fusedskip.linear_relu_residual(x, w, b, r),
        ),
        "add_relu": (
            lambda: torch.relu(F.linear(x, w, b) + r),
            lambda: fusedskip.linear_relu_residual(x, w, b, r, order="add_relu"),
        ),
        "concat2": (
            lambda: F.linear(torch.cat([x1, x2], -1), wc, b),
            lambda: fusedskip.linear_concat([x1, x2], wc, b),
        ),
        "concat2_relu": (
            lambda: torch.relu(F.linear(torch.cat([x1, x2], -1), wc, b)),
            lambda: fusedskip.linear_concat([x1, x2], wc, b, activation="relu"),
        ),
    }


class _EagerReLUResidual(torch.nn.Module):
    """What a user writes without fusedskip: relu(linear(x)) + r, the Linear a submodule."""

    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x, r):
        return torch.relu(self.linear(x)) + r


class _EagerConcat(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x1, x2):
        return self.linear(torch.cat([x1, x2], -1))


def module_cases(rows, width):
    """The layers as modules (what fuse() puts in a model): off the GPU, the fused modules run the
    reference ops behind the op's argument checks."""
    x, r = torch.randn(rows, width), torch.randn(rows, width)
    x1, x2 = torch.randn(rows, width // 2), torch.randn(rows, width - width // 2)
    eager_add, eager_cat = _EagerReLUResidual(width), _EagerConcat(width)
    fused_add = fusedskip.LinearReLUResidual.from_linear(eager_add.linear)
    widths = (width // 2, width - width // 2)
    fused_cat = fusedskip.ConcatLinear.from_linear(eager_cat.linear, widths)
    return {
        "relu_add module": (lambda: eager_add(x, r), lambda: fused_add(x, r)),
        "concat2 module": (lambda: eager_cat(x1, x2), lambda: fused_cat(x1, x2)),
    }


def components(rows, width):
    """Single costs behind the totals: how an op is entered, and the element-wise pass."""
    x = torch.randn(rows, width)
    w = torch.randn(width, width, requires_grad=True)
    b = torch.randn(width, requires_grad=True)
    r = torch.randn(rows, width)
    grad = torch.randn(rows, width)
    op = torch.ops.fusedskip.fused_linear.default
    backward_op = torch.ops.fusedskip.fused_linear_backward.default
    mask = op([x], w.detach(), b.detach(), r, True, False)[1]
    big_x, big_w, big_r = torch.randn(4096, 30), torch.randn(30, 30), torch.randn(4096, 30)
    return {
        # The benchmark's eager provider called the reference function until 3b27fdc: the same
        # ops behind fusedskip's Python argument checks.
        "relu_add forward: eager ops": lambda: torch.relu(F.linear(x, w, b)) + r,
        "relu_add forward: reference function": lambda: fusedskip.reference.linear_relu_residual(
            x, w, b, r),
        # The reference path's argument checks: in Python, and as it runs them (the op's C++).
        "argument checks: reference.check_args": lambda: fusedskip.reference.check_args(
            [x], w, b, r),
        "argument checks: reference.check_call": lambda: fusedskip.reference.check_call(
            [x], w, b, r),
        "Tensor.view (native binding)": lambda: x.view(rows, width),
        "torch.ops.aten.view": lambda: torch.ops.aten.view.default(x, [rows, width]),
        "fused forward via torch.ops": lambda: op([x], w, b, r, True, False),
        "fused forward via _C.fused_linear": lambda: fusedskip._C.fused_linear(
            [x], w, b, r, True, False),
        # The floor under any backward here: autograd.grad through a graph of one node.
        "autograd.grad of w.sum()": lambda: torch.autograd.grad(w.sum(), (w,)),
        "fused backward op via torch.ops": lambda: backward_op(
            grad, [x], w.detach(), mask, True, [False, True, True, False]),
        "autograd.grad eager": lambda: torch.autograd.grad(
            torch.relu(F.linear(x, w, b)) + r, (w, b), grad),
        "autograd.grad fused": lambda: torch.autograd.grad(
            fusedskip.linear_relu_residual(x, w, b, r), (w, b), grad),
        "4096x30->30 no_grad eager": lambda: _no_grad(
            lambda: torch.relu(F.linear(big_x, big_w)) + big_r),
        "4096x30->30 no_grad fused": lambda: _no_grad(
            lambda: fusedskip.linear_relu_residual(big_x, big_w, None, big_r)),
    }


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def measure(fn, mode, min_run_time):
    if mode == "forward":
        stmt = lambda: fn()  # noqa: E731
    elif mode == "forward+backward":
        stmt = lambda: fn().sum().backward()  # noqa: E731
    else:  # no_grad
        def stmt():
            with torch.no_grad():
                fn()
    # Timer runs on one thread unless told: on the --threads that main set.
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds per measurement, split over the rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # This machine is shared: a median can be inflated by a neighbour. Each provider is measured
    # in `rounds` alternating rounds and the smallest median kept (interference only adds time).
    def best_of(fn, mode):
        return min(measure(fn, mode, args.min_run_time / args.rounds)
                   for _ in range(args.rounds))

    rows = []
    compared = {**cases(args.rows, args.width), **module_cases(args.rows, args.width)}
    for op, (eager, fused) in compared.items():
        for mode in ("forward", "forward+backward", "no_grad"):
            eager_us, fused_us = float("inf"), float("inf")
            for _ in range(args.rounds):
                eager_us = min(eager_us, measure(eager, mode, args.min_run_time / args.rounds))
                fused_us = min(fused_us, measure(fused, mode, args.min_run_time / args.rounds))
            rows.append({"op": op, "mode": mode, "eager_us": round(eager_us, 2),
                         "fused_us": round(fused_us, 2),
                         "speedup": round(eager_us / fused_us, 3)})
            print(f"{op:12s} {mode:17s} eager {eager_us:7.2f} us   fused {fused_us:7.2f} us   "
                  f"x{eager_us / fused_us:.2f}", flush=True)

    parts = []
    for name, fn in components(args.rows, args.width).items():
        us = best_of(fn, "forward")
        parts.append({"what": name, "us": round(us, 2)})
        print(f"{name:40s} {us:8.2f} us", flush=True)

    env = environment("cpu")
    meta = {
        "what": f"host time per call, CPU, {args.rows}x{args.width}->{args.width}, "
                f"{args.threads} thread(s), torch.utils.benchmark median, smallest of "
                f"{args.rounds} alternating rounds",
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "commit": env["commit"],
        "date": env["date"],
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"host-overhead-cpu-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "components": parts}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Host time per call\n\n{meta['what']}\n\n")
        f.write(f"torch {meta['torch']}, Python {meta['python']}, {meta['cpu_count']} cores, "
                f"commit {meta['commit']}, {meta['date']}\n\n")
        f.write("| op | mode | eager (µs) | fused (µs) | eager / fused |\n|---|---|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['op']} | {r['mode']} | {r['eager_us']} | {r['fused_us']} | "
                    f"{r['speedup']} |\n")
        f.write("\n| component | µs |\n|---|---:|\n")
        for part in parts:
            f.write(f"| {part['what']} | {part['us']} |\n")
    print(f"wrote {stem}.json and .md")
    return rows


if __name__ == "__main__":
    main()
