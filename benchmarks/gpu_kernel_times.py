"""Where a call's time goes on the GPU: for each provider, the device time of every kernel it
launches (torch.profiler), the time per call when calls queue back to back (what a training step
sees), and the host time per call. Separates a slow kernel from a slow launch path, which the
benchmark's per-call timing (fusedskip.bench) cannot.

    python benchmarks/gpu_kernel_times.py --op relu_add --sizes 8192x4096x4096 \
        --providers fused-cutlass,fused-gemm_epilogue,gemm [--dtype bfloat16] [--out DIR]

Prints a table; with --out also writes kernel-times-<date>.md there with versions and commit.
Under ncu, with --once: `ncu -k regex:"device_kernel|nvjet" ...` (every CUTLASS kernel is a
`cutlass::device_kernel`, and ncu matches the bare function name).
"""

from __future__ import annotations

import argparse
import time

import torch

from fusedskip.bench import (OPS, Case, append_markdown, parse_sizes, provider_backend,
                             provider_fn, step_fn)


def short(name: str, head: int = 50, tail: int = 45) -> str:
    """Kernel names from templates run to kilobytes: keep the head, which says what it is, and
    the tail, which tells apart instantiations of one template (the native kernel's forward and
    backward differ only in their last template arguments)."""
    name = name.replace("void ", "")
    return name if len(name) <= head + tail + 1 else name[:head] + "…" + name[-tail:]


def prepared_step(case: Case, provider: str, mode: str):
    """One call of `mode` on fresh inputs (the output gradient from one untimed forward), or None
    where the provider has no such form. Call it, and the step, under provider_backend."""
    fn = provider_fn(provider, case.op, mode)
    if fn is None:
        return None
    args = case.make_inputs(requires_grad=mode != "no_grad")
    grad = None
    if mode == "forward+backward":
        with torch.no_grad():
            grad = torch.randn_like(fn(*args))
    return step_fn(fn, mode, args, grad)


def measure(case: Case, provider: str, mode: str, calls: int):
    with provider_backend(provider):
        run = prepared_step(case, provider, mode)
        if run is None:
            return None
        for _ in range(3):
            run()
        torch.cuda.synchronize()

        start = time.perf_counter()
        for _ in range(calls):
            run()
        host_us = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        queued_us = (time.perf_counter() - start) / calls * 1e6

        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                run()
            torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = event.self_cuda_time_total
        if device_us > 0:
            kernels.append((short(event.key), event.count / calls, device_us / calls))
    kernels.sort(key=lambda k: -k[2])
    return host_us, queued_us, kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--op", default="relu_add", choices=list(OPS))
    parser.add_argument("--sizes", default="8192x4096x4096", help="MxKxN[,MxKxN...]")
    parser.add_argument("--providers", default="fused-cutlass,fused-gemm_epilogue,gemm")
    parser.add_argument("--mode", default="forward",
                        choices=["no_grad", "forward", "forward+backward"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--once", action="store_true",
                        help="only one call per provider and size, no timing: for running under "
                             "ncu (whose counters and torch.profiler's cannot be read together)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_times: needs a CUDA GPU")
    if args.once:
        for m, k, n in parse_sizes(args.sizes):
            case = Case(args.op, m, k, n, getattr(torch, args.dtype), "cuda")
            for provider in args.providers.split(","):
                with provider_backend(provider):
                    run = prepared_step(case, provider, args.mode)
                    if run is not None:
                        run()
        torch.cuda.synchronize()
        return 0

    lines = []
    for m, k, n in parse_sizes(args.sizes):
        case = Case(args.op, m, k, n, getattr(torch, args.dtype), "cuda")
        for provider in args.providers.split(","):
            result = measure(case, provider, args.mode, args.calls)
            if result is None:
                continue
            host_us, queued_us, kernels = result
            total = sum(k[2] for k in kernels)
            lines.append(f"\n### {args.op} {args.mode} {args.dtype} {m}x{k}x{n}: {provider}\n")
            lines.append(f"host {host_us:.1f} µs/call, queued {queued_us:.1f} µs/call, "
                         f"kernels {total:.1f} µs/call\n")
            lines.append("| kernel | launches/call | µs/call |\n|---|---:|---:|")
            lines += [f"| `{name}` | {count:.0f} | {us:.1f} |" for name, count, us in kernels]
    text = "\n".join(lines)
    print(text)
    if args.out:
        print("wrote", append_markdown(args.out, "kernel-times", "Kernel times", text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
