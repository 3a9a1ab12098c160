"""Host time per call of the layers fuse() puts in a model, against the plain fusedskip layers,
at 64x10 on a CPU with one thread (where a layer's host time is all of its cost): what checking
each call's operands, to send a call the example did not show to the model's own ops, costs the
calls that need none. Also that check alone.

    python benchmarks/fuse_guard_cost.py > benchmarks/results/<device>-<date>/fuse-guard/host-time.md
"""
import subprocess
import sys

import torch
import torch.utils.benchmark as benchmark

import fusedskip

fuse_module = sys.modules["fusedskip.fuse"]


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, r = torch.randn(64, 10), torch.randn(64, 10)
    plain = fusedskip.LinearReLUResidual(10, 10)
    fused = fuse_module._FusedLinearReLUResidual.from_linear(torch.nn.Linear(10, 10))
    concat = fusedskip.ConcatLinear([10, 10], 10)
    fused_concat = fuse_module._FusedConcatLinear.from_linear(torch.nn.Linear(20, 10), [10, 10])
    cases = [("LinearReLUResidual(x, r)", "m(x, r)", plain, fused),
             ("ConcatLinear(x, r)", "m(x, r)", concat, fused_concat)]
    best = {}
    for _ in range(5):  # alternating rounds, the smallest median of each: a shared machine
        for name, stmt, *layers in cases:
            for which, layer in zip(("plain", "fuse"), layers):
                t = benchmark.Timer(stmt, globals={"m": layer, "x": x, "r": r})
                us = t.blocked_autorange(min_run_time=0.5).median * 1e6
                best[name, which] = min(best.get((name, which), float("inf")), us)
        t = benchmark.Timer("check(x, w, r)", globals={
            "check": fuse_module._relu_residual_fits, "x": x, "r": r, "w": plain.weight})
        us = t.blocked_autorange(min_run_time=0.5).median * 1e6
        best["check"] = min(best.get("check", float("inf")), us)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, commit {commit}, "
          "CPU, one thread; smallest median of 5 alternating rounds (us per call)\n")
    print("| layer | fusedskip's | fuse()'s |")
    print("|---|---:|---:|")
    for name, *_ in cases:
        print(f"| {name} | {best[name, 'plain']:.2f} | {best[name, 'fuse']:.2f} |")
    print(f"\nLinearReLUResidual's check alone: {best['check']:.2f} us")


if __name__ == "__main__":
    main()
