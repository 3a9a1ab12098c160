"""The `cutlass` backend's kernel at several tile and cluster shapes, against cuBLAS.

For each configuration: the fused relu_add layer (bias, ReLU, 1-bit mask and residual inside the
GEMM's epilogue) and the same mainloop with an epilogue that only converts the accumulators
(for the two "source" configurations, which change only the residual's pipeline, that plain GEMM
is the base 128x256 one: compare their fused rows with its fused row), beside torch.mm (cuBLAS, the GEMM alone) and the library's two forward paths (cuBLAS + the
element-wise pass, and the `cutlass` backend). It answers two questions the large-size bar turns
on (benchmarks/NOTES.md, "The epilogue inside the GEMM"): does any configuration's mainloop match
cuBLAS, and what does the fused epilogue add to it.

Every configuration is first checked against the library's cuBLAS path, bit for bit, on integer
inputs whose sums are exact (a NaN row too); one that differs is reported and not timed, and the
run exits 1.

Then, at the first size, the two fastest configurations again under every tile order the
persistent scheduler offers (swizzle 1/2/4/8 x raster heuristic/along M/along N): the order
decides which operand tiles the tiles in flight share in L2, which a mainloop that trails
cuBLAS by a few percent may be losing there.

Needs an sm_90 GPU and fusedskip._cutlass_configs, which a build with FUSEDSKIP_CUTLASS_CONFIGS=1
adds (setup.py):

    FUSEDSKIP_CUTLASS_CONFIGS=1 pip install --no-build-isolation -e .
    python benchmarks/cutlass_configs.py [--sizes 8192x4096x4096,4096x1024x1024,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fusedskip
from fusedskip.bench import append_markdown, parse_sizes, time_queued_us

DTYPE = torch.bfloat16


def load():
    try:
        from fusedskip import _cutlass_configs
    except ImportError as error:
        raise SystemExit("cutlass_configs: fusedskip._cutlass_configs is not built; rebuild with "
                         f"FUSEDSKIP_CUTLASS_CONFIGS=1 ({error})")
    return _cutlass_configs


def library(backend: str, x, w, b, r):
    with fusedskip.use_backend(backend):
        return torch.ops.fusedskip.fused_linear([x], w, b, r, True, False)


def integer_operands(m: int, k: int, n: int, density: float):
    """Values in {-1, 0, 1}, sparse enough that every pre-activation is an integer of magnitude
    at most 256: exact in float32 and in bfloat16, so every path's result is the same bits."""
    def ints(*shape, p=1.0):
        values = torch.randint(-1, 2, shape, device="cuda")
        keep = torch.rand(shape, device="cuda") < p
        return (values * keep).to(DTYPE)

    x, w = ints(m, k, p=density), ints(n, k)
    b, r = ints(n), ints(m, n)
    x[m // 3, 5] = float("nan")  # a NaN row: NaN out, every bit set
    return x, w, b, r


ORDERS = [(swizzle, raster) for swizzle in (1, 2, 4, 8)
          for raster in ("heuristic", "along_m", "along_n")]


def check(configs, name: str, m: int, k: int, n: int, swizzle: int = 1,
          raster: str = "heuristic") -> str:
    """Empty where the configuration's output and mask equal the cuBLAS path's and its plain
    GEMM equals torch.mm; else what differs."""
    order = dict(swizzle=swizzle, raster=raster)
    x, w, b, r = integer_operands(m, k, n, density=min(1.0, 128 / k))
    out = torch.full((m, n), float("nan"), device="cuda", dtype=DTYPE)
    mask = torch.full((m, n // 8), 0xA5, device="cuda", dtype=torch.uint8)
    if not configs.relu_add(name, x, w, b, r, out, mask, **order):
        return "the fused kernel does not take this shape"
    ref_out, ref_mask = library("gemm_epilogue", x, w, b, r)
    if not torch.equal(mask, ref_mask):
        return f"mask differs from the cuBLAS path's in {(mask != ref_mask).sum().item()} bytes"
    if not torch.equal(out.isnan(), ref_out.isnan()) or not torch.equal(
            out.nan_to_num(), ref_out.nan_to_num()):
        return "output differs from the cuBLAS path's"
    plain = torch.full((m, n), float("nan"), device="cuda", dtype=DTYPE)
    if not configs.gemm(name, x, w, plain, **order):
        return "the plain GEMM does not take this shape"
    if not torch.equal(plain.nan_to_num(), (x @ w.T).nan_to_num()):
        return "plain GEMM differs from torch.mm"
    return ""


def time_per_call(fn: Callable[[], object], calls: int) -> Tuple[float, float]:
    """(queued, kernels) µs per call: over `calls` back-to-back launches between two events (what
    a training step sees), and the device time of the kernels they ran (torch.profiler; without
    host time, which at the smaller sizes can exceed a kernel's)."""
    for _ in range(3):
        fn()
    queued = time_queued_us(fn, calls)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device = sum(getattr(event, "self_device_time_total", 0) for event in prof.key_averages())
    return queued, device / calls


def operands(m: int, k: int, n: int):
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    w = torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=DTYPE)
    r = torch.randn(m, n, device="cuda", dtype=DTYPE)
    out = torch.empty(m, n, device="cuda", dtype=DTYPE)
    mask = torch.empty(m, n // 8, device="cuda", dtype=torch.uint8)
    return x, w, b, r, out, mask


Providers = Dict[str, Tuple[Optional[str], Callable[[], object]]]


def best_of(providers: Providers, size: Tuple[int, int, int], calls: int, rounds: int,
            reference: str) -> List[dict]:
    """Each provider's best (queued, kernels) µs over `rounds` interleaved rounds, so that clocks
    and heat even out; relative to `reference`'s kernel time."""
    m, k, n = size
    best = {label: (float("inf"), float("inf")) for label in providers}
    for _ in range(rounds):
        for label, (backend, fn) in providers.items():
            with fusedskip.use_backend(backend) if backend else contextlib.nullcontext():
                queued, kernels = time_per_call(fn, calls)
            best[label] = (min(best[label][0], queued), min(best[label][1], kernels))
    ref = best[reference][1]
    return [{"size": f"{m}x{k}x{n}", "provider": label, "queued_us": queued,
             "kernels_us": kernels, "vs_ref": kernels / ref,
             "tflops": 2 * m * k * n / kernels / 1e6}
            for label, (queued, kernels) in best.items()]


MM = "torch.mm (cuBLAS, GEMM alone)"


def measure(configs, names: List[str], m: int, k: int, n: int, calls: int,
            rounds: int) -> List[dict]:
    x, w, b, r, out, mask = operands(m, k, n)
    op = torch.ops.fusedskip.fused_linear
    # label -> (the library backend it runs under, or None; the call)
    providers: Providers = {
        MM: (None, lambda: torch.mm(x, w.T, out=out)),
        "library: cuBLAS + pass (gemm_epilogue)": (
            "gemm_epilogue", lambda: op([x], w, b, r, True, False)),
        "library: cutlass backend": ("cutlass", lambda: op([x], w, b, r, True, False)),
    }
    for name in names:
        providers[f"{name}: fused relu_add"] = (
            None, lambda name=name: configs.relu_add(name, x, w, b, r, out, mask))
        providers[f"{name}: GEMM alone"] = (None, lambda name=name: configs.gemm(name, x, w, out))
    return best_of(providers, (m, k, n), calls, rounds, MM)


def measure_orders(configs, names: List[str], m: int, k: int, n: int, calls: int,
                   rounds: int) -> List[dict]:
    """`names` under every tile order, fused and plain, beside torch.mm."""
    x, w, b, r, out, mask = operands(m, k, n)
    providers: Providers = {MM: (None, lambda: torch.mm(x, w.T, out=out))}
    for name in names:
        for swizzle, raster in ORDERS:
            order = dict(swizzle=swizzle, raster=raster)
            label = f"{name}, swizzle {swizzle}, {raster}"
            providers[f"{label}: fused relu_add"] = (
                None, lambda name=name, order=order: configs.relu_add(name, x, w, b, r, out, mask,
                                                                      **order))
            providers[f"{label}: GEMM alone"] = (
                None, lambda name=name, order=order: configs.gemm(name, x, w, out, **order))
    return best_of(providers, (m, k, n), calls, rounds, MM)


def table_row(row: dict) -> str:
    return (f"| {row['size']} | {row['provider']} | {row['kernels_us']:.1f} | "
            f"{row['vs_ref']:.3f} | {row['tflops']:.0f} | {row['queued_us']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 65536x1024x1024: 16 K steps a tile, so the epilogue (residual in, output and mask out) is a
    # larger share of each tile than at K = 4096, where a ping-pong schedule's overlap of one
    # tile's epilogue with the next one's mainloop should show if it pays anywhere; the
    # library's kernel ran at 1.26-1.41x the GEMM alone there (results/h100-2026-11-28/4-sweep).
    parser.add_argument("--sizes", default="8192x4096x4096,4096x1024x1024,65536x1024x1024",
                        help="MxKxN[,MxKxN...]: N a multiple of 128, K of 8")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    configs = load()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("cutlass_configs: needs an sm_90 GPU (H100 / H200)")
    torch.manual_seed(0)

    lines = ["| configuration | mask layout (host) | bit-exact vs cuBLAS path |", "|---|---|---|"]
    names = []
    failed = []  # "configuration: what failed", for the exit status and the closing lines
    for name in configs.names():
        layout = configs.mask_layout_error(name) or "ok"
        exact = (check(configs, name, 300, 64, 384) or check(configs, name, 2048, 4096, 1024)
                 or "ok")
        lines.append(f"| {name} | {layout} | {exact} |")
        if layout == "ok" and exact == "ok":
            names.append(name)
        else:
            failed.append(f"{name}: {exact if layout == 'ok' else layout}")
    # Printed as it goes, so that a run cut short by a time limit still leaves what it measured.
    print("\n".join(lines), flush=True)
    lines += ["", "| size | provider | kernels µs/call | × torch.mm | TFLOP/s | "
                  "queued µs/call |", "|---|---|---:|---:|---:|---:|"]
    print("\n".join(lines[-3:]), flush=True)
    sizes = parse_sizes(args.sizes)
    first = []
    for m, k, n in sizes:
        rows = measure(configs, names, m, k, n, args.calls, args.rounds)
        first = first or rows
        for row in rows:
            lines.append(table_row(row))
            print(lines[-1], flush=True)

    # The two fastest fused kernels at the first size, under every tile order.
    fused = sorted((row["kernels_us"], row["provider"].split(":")[0]) for row in first
                   if row["provider"].split(":")[0] in names and "fused" in row["provider"])
    fastest = [name for _, name in fused[:2]]
    if fastest:
        m, k, n = sizes[0]
        start = len(lines)
        lines += ["", f"Tile orders at {m}x{k}x{n} (bit-exact check per configuration at "
                      "swizzle 8, along N):", ""]
        # 1536x1536: at least 6 tiles each way, which swizzle 8 needs to take effect.
        exact_orders = []
        for name in fastest:
            error = check(configs, name, 1536, 64, 1536, 8, "along_n")
            lines.append(f"- {name}: {error or 'ok'}" + (", not timed" if error else ""))
            if error:
                failed.append(f"{name} at swizzle 8, along N: {error}")
            else:
                exact_orders.append(name)
        print("\n".join(lines[start:]), flush=True)
        # Only what gave the right bits is timed: a wrong result's speed means nothing.
        if exact_orders:
            start = len(lines)
            lines += ["", "| size | provider | kernels µs/call | × torch.mm | TFLOP/s | "
                          "queued µs/call |", "|---|---|---:|---:|---:|---:|"]
            print("\n".join(lines[start:]), flush=True)
            for row in measure_orders(configs, exact_orders, m, k, n, args.calls, args.rounds):
                lines.append(table_row(row))
                print(lines[-1], flush=True)
    if failed:
        start = len(lines)
        lines += ["", "Failed a check (not timed):", ""] + [f"- {failure}" for failure in failed]
        print("\n".join(lines[start:]), flush=True)
    text = "\n".join(lines)
    if args.out:
        path = append_markdown(
            args.out, "cutlass-configs", "The cutlass kernel's configurations, relu_add bfloat16",
            f"Per call: the device time of its kernels (torch.profiler) and the time of "
            f"{args.calls} back-to-back calls between two events; each the best of "
            f"{args.rounds} interleaved rounds.\n\n{text}")
        print("wrote", path)
    if failed:
        # The table says it too, but a run that only looks at the exit status must see it.
        print("cutlass_configs: failed a check: " + "; ".join(failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
