"""Where a call's time goes on the GPU: for each provider, the device time of every kernel it
launches (torch.profiler), the time per call when calls queue back to back (what a training step
sees), the host time per call, and one call's kernels in the order the GPU started them, with
the gaps between them (where the GPU runs nothing between kernels, or runs two at once).
Separates a slow kernel from a slow launch path, which the benchmark's per-call timing
(fusedskip.bench) cannot.

    python benchmarks/gpu_kernel_times.py --op relu_add --sizes 8192x4096x4096 \
        --providers fused-cutlass,fused-gemm_epilogue,gemm [--dtype bfloat16] [--out DIR]

Prints a table; with --out also writes kernel-times-<date>.md there with versions and commit.
Under ncu, with --once: `ncu -k regex:"device_kernel|nvjet" ...` (every CUTLASS kernel is a
`cutlass::device_kernel`, and ncu matches the bare function name).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

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
    """One call of `mode` on fresh inputs, or None where the provider has no such form. Call it,
    and the step, under provider_backend."""
    fn = provider_fn(provider, case.op, mode)
    if fn is None:
        return None
    args = case.make_inputs(requires_grad=mode != "no_grad")
    grad = None
    if mode == "forward+backward":
        # The output gradient made from the shapes, not from an extra forward: under ncu
        # (--once) that forward's kernels would be profiled too, alike in name to the step's.
        # A linear layer's output has its input's leading dims and out_features columns.
        xs, w = args[0], args[1]
        grad = torch.randn(*xs[0].shape[:-1], w.shape[0], device=w.device, dtype=w.dtype)
    return step_fn(fn, mode, args, grad)


def gpu_intervals(prof) -> List[Tuple[str, float, float]]:
    """(name, start µs, end µs) of everything the GPU ran under `prof` (kernels, memsets,
    copies), in the order it started them."""
    cuda = torch.autograd.DeviceType.CUDA
    return sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == cuda and not getattr(e, "is_user_annotation", False)),
                  key=lambda interval: interval[1])


class Timeline(NamedTuple):
    """One call as the GPU ran it, medians over calls that each ran the same sequence.

    period: from the start of a call's first kernel to the start of the next call's first;
    busy: how much of that period some kernel ran, of any call; idle: the rest; rows: each
    kernel in the order started, with its device time and the gap before it: from the moment
    every kernel started before it had ended, to its own start (positive: the GPU ran nothing
    for that long; negative: it started that long before the last of them ended). A kernel
    placed early (programmatic dependent launch) counts from its placement, its wait for the
    kernel before included: judge paths by the queued time per call, and this for where the
    time goes."""
    period_us: float
    busy_us: float
    idle_us: float
    rows: List[Tuple[str, float, float]]


def call_timeline(intervals: Sequence[Tuple[str, float, float]], calls: int) -> Optional[Timeline]:
    """The Timeline of `calls` back-to-back calls' intervals (gpu_intervals), or None where they do
    not split into calls alike (the kernels started in a different order in some call)."""
    per_call, left = divmod(len(intervals), calls)
    if calls < 2 or per_call == 0 or left:
        return None
    names = [name for name, _, _ in intervals[:per_call]]
    if any(intervals[c * per_call + j][0] != names[j]
           for c in range(calls) for j in range(per_call)):
        return None
    # The union of every interval, as disjoint spans in order; and before each interval, the
    # latest end of those started before it.
    spans: List[List[float]] = []
    ended_before, latest = [], float("-inf")
    for _, start, end in intervals:
        ended_before.append(latest)
        latest = max(latest, end)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    periods, busy, idle = [], [], []
    for c in range(calls - 1):
        first, following = intervals[c * per_call][1], intervals[(c + 1) * per_call][1]
        periods.append(following - first)
        busy.append(sum(max(0.0, min(end, following) - max(start, first)) for start, end in spans))
        idle.append(periods[-1] - busy[-1])
    rows = []
    for j in range(per_call):
        # Gaps before a call's first kernel come from the call before; the first call has none.
        members = [c * per_call + j for c in range(calls) if c * per_call + j > 0]
        gaps = [intervals[i][1] - ended_before[i] for i in members]
        durations = [intervals[c * per_call + j][2] - intervals[c * per_call + j][1]
                     for c in range(calls)]
        rows.append((names[j], statistics.median(durations), statistics.median(gaps)))
    return Timeline(statistics.median(periods), statistics.median(busy), statistics.median(idle),
                    rows)


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
    timeline = call_timeline(gpu_intervals(prof), calls)
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = event.self_cuda_time_total
        if device_us > 0:
            kernels.append((short(event.key), event.count / calls, device_us / calls))
    kernels.sort(key=lambda k: -k[2])
    return host_us, queued_us, kernels, timeline


def timeline_lines(timeline: Optional[Timeline]) -> List[str]:
    if timeline is None:
        return ["\nTimeline: the calls' kernels did not start in one order every call."]
    lines = [f"\nOne call on the GPU, in the order started (medians): a call every "
             f"{timeline.period_us:.1f} µs, some kernel running for {timeline.busy_us:.1f} of "
             f"them, none for {timeline.idle_us:.1f}.\n",
             "| # | kernel | µs | gap before, µs |\n|---:|---|---:|---:|"]
    lines += [f"| {i} | `{short(name)}` | {us:.1f} | {gap:+.1f} |"
              for i, (name, us, gap) in enumerate(timeline.rows, 1)]
    return lines


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

    # The library's kernels wait for and let in their neighbours on the stream (programmatic
    # dependent launch, csrc/cuda/launch.cuh) unless FUSEDSKIP_PDL=0: name the runs without.
    launch_note = " (FUSEDSKIP_PDL=0)" if os.environ.get("FUSEDSKIP_PDL") == "0" else ""
    lines = []
    for m, k, n in parse_sizes(args.sizes):
        case = Case(args.op, m, k, n, getattr(torch, args.dtype), "cuda")
        for provider in args.providers.split(","):
            result = measure(case, provider, args.mode, args.calls)
            if result is None:
                continue
            host_us, queued_us, kernels, timeline = result
            total = sum(k[2] for k in kernels)
            lines.append(f"\n### {args.op} {args.mode} {args.dtype} {m}x{k}x{n}: {provider}"
                         f"{launch_note}\n")
            lines.append(f"host {host_us:.1f} µs/call, queued {queued_us:.1f} µs/call, "
                         f"kernels {total:.1f} µs/call\n")
            lines.append("| kernel | launches/call | µs/call |\n|---|---:|---:|")
            lines += [f"| `{name}` | {count:.0f} | {us:.1f} |" for name, count, us in kernels]
            lines += timeline_lines(timeline)
    text = "\n".join(lines)
    print(text)
    if args.out:
        print("wrote", append_markdown(args.out, "kernel-times", "Kernel times", text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
