"""Benchmark: the fused layers against what a user would write instead, on whatever device is here.

    python -m fusedskip.bench                     # the standard sweep (smaller on CPU)
    python -m fusedskip.bench --quick             # a smoke run
    python -m fusedskip.bench --op concat2 --mode forward --sizes 8192x4096x4096
    python -m fusedskip.bench --model             # training steps of two small models
    python -m fusedskip.bench --plot DIR          # redraw the plots from DIR/rows.jsonl

One row per (op, provider, mode, dtype, shape): p20/p50/p80 time, TFLOP/s, GB/s (each input
read once, each output written once), fraction of the roofline (peaks measured on the device at
the start of the run), speedup over eager, peak memory of forward+backward (GPU), and the device,
versions and commit. On a GPU the p20/p50/p80 are of single calls, each waited for; the row also
has the time per call with calls queued back to back, as a training loop issues them, and the
speedup over eager by that measure (see time_case). Every provider's output (and in
forward+backward its gradients) is checked against the float64 reference before it is timed; a
mismatch is recorded and the row is not timed. Results go to
benchmarks/results/<device>-<date>/ (rows.jsonl, rows.csv, table.md, speedup.png; with --model
models.jsonl, models.csv, models.png), replacing those an earlier run left there; Ctrl-C (or
TERM) stops the sweep and keeps the rows of the cases it finished.

The device is the GPU where torch sees one; there, a fused provider needs the extension's CUDA
kernels and a GPU that runs them (without them its calls would run the reference path, or
fail): --device cuda is refused where they are missing, and by default the run is then on the
CPU, with a note saying why. Exit status: 0; 1 where a row is a mismatch, a fused provider's
row is an error, or no row was timed; else 130 where the sweep was stopped before its end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fusedskip

# -------------------------------------------------------------------------------------------------
# What is measured

# op -> (number of concat inputs, ReLU, residual order or None)
OPS = {
    "relu_add": (1, True, "relu_add"),
    "add_relu": (1, True, "add_relu"),
    "linear_relu": (1, True, None),
    "concat2": (2, False, None),
    "concat2_relu": (2, True, None),
    "concat4": (4, False, None),
    "concat4_relu": (4, True, None),
}
MODES = ("forward", "forward+backward", "no_grad")
CPU_PROVIDERS = ("fused", "eager", "compile")
GPU_PROVIDERS = ("fused", "eager", "compile", "compile-max-autotune", "cublaslt", "gemm")
# The fused op with its backend forced (fusedskip.use_backend) instead of chosen per shape: the
# measurements behind the choice (`--providers fused-native,fused-gemm_epilogue,gemm`).
# fused-cutlass runs its sm_90 GEMMs only where they apply (csrc/cuda/fused_gemm_sm90.cu, and for
# concat layers csrc/cuda/concat_gemm_sm90.cu and csrc/cuda/grouped_gemm_sm90.cu).
FORCED_PROVIDERS = ("fused-native", "fused-gemm_epilogue", "fused-cutlass")
KNOWN_PROVIDERS = GPU_PROVIDERS + FORCED_PROVIDERS


def provider_backend(provider: str):
    """The context a provider's calls run in: its backend forced, or left to `auto`."""
    if provider in FORCED_PROVIDERS:
        return fusedskip.use_backend(provider.split("-", 1)[1])
    return contextlib.nullcontext()


def cutlass_launches() -> int:
    """How many times the `cutlass` backend's GEMMs have run, forward, concat forward and grouped
    backward (0 without the extension)."""
    if not fusedskip.extension_loaded():
        return 0
    c = fusedskip._ops._C
    return c._fused_gemm_launches() + c._concat_gemm_launches() + c._grouped_gemm_launches()


def split_widths(k: int, parts: int) -> Tuple[int, ...]:
    """Unequal widths summing to k (4 parts of 1024 -> 96, 200, 304, 424; 2 of 30 -> 10, 20).

    Where every part can be 64 or more, each is a multiple of 8, as the layers of real models
    are (the GEMM libraries' fast kernels need 16-byte aligned blocks); the example MLP's tiny
    widths stay odd."""
    if parts == 1:
        return (k,)
    weights = [1 + i for i in range(parts)] if parts > 2 else [1, 2]
    total = sum(weights)
    widths = [max(1, k * w // total) for w in weights]
    if k % 8 == 0 and min(widths) >= 64:
        widths = [w - w % 8 for w in widths]
    widths[-1] = k - sum(widths[:-1])
    return tuple(widths)


def standard_sizes(device: str, quick: bool) -> List[Tuple[int, int, int]]:
    """(M, K, N): the example MLP's widths at small to large batches, mid-size layers, one large."""
    if quick:
        return [(64, 10, 10), (1024, 30, 30)]
    if device == "cuda":
        tiny = [(m, w, w) for m in (64, 1024, 65536) for w in (10, 30)]
        mid = [(m, w, w) for m in (4096, 65536) for w in (256, 1024)]
        return tiny + mid + [(8192, 4096, 4096)]
    # CPU: a smaller sweep (every torch.compile graph costs seconds to build on two cores).
    return [(64, 10, 10), (4096, 30, 30), (1024, 256, 256)]


def parse_sizes(text: str) -> List[Tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", item)
        if not match:
            raise SystemExit(f"--sizes: expected MxKxN[,MxKxN...], got {item!r}")
        size = tuple(int(v) for v in match.groups())
        if 0 in size:
            raise SystemExit(f"--sizes: M, K and N must be positive, got {item.strip()!r}")
        sizes.append(size)
    return sizes


# -------------------------------------------------------------------------------------------------
# Counting (unit-tested in tests/test_bench.py)


def count_flops(m: int, k: int, n: int, mode: str) -> int:
    """Forward: one GEMM, 2*M*K*N. Forward+backward: plus the input and weight gradients."""
    return 2 * m * k * n * (3 if mode == "forward+backward" else 1)


def count_bytes(m: int, k: int, n: int, mode: str, element: int, bias: bool = True,
                residual: bool = False) -> int:
    """The fewest bytes any implementation must move: each input read once, each output written
    once. Forward reads x (M*K), W (N*K), b, r (M*N) and writes y (M*N). Backward reads the output
    gradient, x and W, and writes dx, dW, db and dr."""
    forward = (m * k + n * k + (n if bias else 0) + (m * n if residual else 0) + m * n) * element
    if mode != "forward+backward":
        return forward
    backward = (m * n + m * k + n * k + m * k + n * k + (n if bias else 0)
                + (m * n if residual else 0)) * element
    return forward + backward


def quantiles(times: Sequence[float]) -> Tuple[float, float, float]:
    ordered = sorted(times)

    def at(q):
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return at(0.2), at(0.5), at(0.8)


# -------------------------------------------------------------------------------------------------
# Cases and providers


@dataclasses.dataclass
class Case:
    op: str
    m: int
    k: int
    n: int
    dtype: torch.dtype
    device: str

    @property
    def widths(self):
        return split_widths(self.k, OPS[self.op][0])

    def make_inputs(self, requires_grad: bool, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0):
            t = torch.randn(*shape, generator=generator) * scale
            return t.to(self.device, self.dtype).requires_grad_(requires_grad)

        order = OPS[self.op][2]
        xs = [rand(self.m, w) for w in self.widths]
        w = rand(self.n, self.k, scale=self.k ** -0.5)
        b = rand(self.n)
        r = rand(self.m, self.n) if order else None
        return xs, w, b, r


def eager_fn(op: str) -> Callable:
    """What a user writes without fusedskip: ATen ops and nothing else. (Not the reference
    functions: they check their arguments in Python first, which a user's own layer does not pay
    and which at launch-bound sizes would flatter the fused op.)"""
    count, relu, order = OPS[op]

    def fn(xs, w, b, r):
        out = F.linear(xs[0] if count == 1 else torch.cat(xs, -1), w, b)
        if order == "add_relu":
            return torch.relu(out + r)
        if relu:
            out = torch.relu(out)
        return out + r if order == "relu_add" else out

    return fn


def fused_fn(op: str) -> Callable:
    count, relu, order = OPS[op]

    def fn(xs, w, b, r):
        if count == 1 and relu:
            return fusedskip.linear_relu_residual(xs[0], w, b, r, order=order or "relu_add")
        return fusedskip.linear_concat(xs, w, b, activation="relu" if relu else None)

    return fn


def cublaslt_fn(op: str) -> Optional[Callable]:
    """cuBLASLt's bias+ReLU epilogue through torch._addmm_activation (+ the residual after it):
    the strongest unfused ATen path for relu(x W^T + b) (+ r). None where it does not apply."""
    count, relu, order = OPS[op]
    if not relu or order == "add_relu":
        return None

    def fn(xs, w, b, r):
        x = xs[0] if count == 1 else torch.cat(xs, -1)
        out = torch._addmm_activation(b, x, w.t())
        return out if r is None else out + r

    return fn


def gemm_fn(op: str) -> Callable:
    """GEMM alone on the same operands: the floor a fused epilogue should cost nothing over. The
    timed calls get a concat op's inputs already concatenated (gemm_operands), so no cat is in
    its time; the check's call, untimed, concatenates here."""

    def fn(xs, w, b, r):
        x = xs[0] if len(xs) == 1 else torch.cat(xs, -1)
        return torch.mm(x, w.t())

    return fn


def gemm_operands(args):
    """A set of arguments for the GEMM alone's timed calls: the concatenation made once,
    beforehand (a cat in each call copies the whole input, which is no part of the floor)."""
    xs, w, b, r = args
    return ([xs[0] if len(xs) == 1 else torch.cat([x.detach() for x in xs], -1)], w, b, r)


_compiled: Dict[Tuple[str, str], Callable] = {}


def provider_fn(provider: str, op: str, mode: str = "forward") -> Optional[Callable]:
    """The provider's layer for `op`; None where it has no meaningful form for op and mode (the
    GEMM alone has no backward to compare; cuBLASLt's epilogue covers only some ops, and has no
    derivative in ATen, so it runs under no_grad only)."""
    if provider == "gemm" and mode != "forward":
        return None
    if provider == "cublaslt" and mode != "no_grad":
        return None
    if provider == "fused" or provider in FORCED_PROVIDERS:
        return fused_fn(op)
    if provider == "eager":
        return eager_fn(op)
    if provider in ("compile", "compile-max-autotune"):
        key = (provider, op)
        if key not in _compiled:
            # One static graph per shape, as a model compiled for its shape gets: under the
            # default automatic dynamic shapes every size after an op's first would be timed on
            # a symbolic graph, so a row would depend on which sizes ran before it.
            mode = "max-autotune" if provider == "compile-max-autotune" else None
            _compiled[key] = torch.compile(eager_fn(op), mode=mode, dynamic=False)
        return _compiled[key]
    if provider == "cublaslt":
        return cublaslt_fn(op)
    if provider == "gemm":
        return gemm_fn(op)
    raise SystemExit(f"unknown provider {provider!r}")


# Wider than the tests' bounds (tests/conftest.py, REL_TOL: 1e-5 and 1e-2), which come with a
# mask-aware reference and a rounding scale per element: here the sums run over up to 65536 rows
# and a half-precision ReLU may take the other side within rounding of zero. A correct bfloat16
# result is off by a few 1e-3 (relu_add 2048x1024x1024 here: 6e-3 in its worst element); a
# wrong kernel by far more.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The larger of the error's norm relative to the reference's, and the largest element's
    error relative to its own size plus the reference's RMS: in a norm over N elements a wrong
    tile or column weighs only its share, and a localised kernel bug would pass."""
    error = got.double() - want
    norm = (error.norm() / want.norm().clamp_min(1e-30)).item()
    rms = want.norm() / max(1, want.numel()) ** 0.5
    scale = want.abs() + rms + torch.finfo(got.dtype).smallest_normal
    return max(norm, (error.abs() / scale).max().item() if want.numel() else 0.0)


def check(case: Case, provider: str, fn: Callable, mode: str = "forward") -> float:
    """Relative error of the provider's output against float64 (GEMM alone: against x W^T); in
    forward+backward mode the largest of that and each gradient's. On the path that is timed:
    in forward mode with autograd recording (a training step's forward, which for the fused op
    also saves the mask), under no_grad in no_grad mode."""
    recording = mode != "no_grad"
    with_grad = mode == "forward+backward"
    xs, w, b, r = case.make_inputs(requires_grad=recording, seed=1)
    tensors = [t for t in (*xs, w, b, r) if t is not None]
    x64, w64, b64, r64 = [[x.detach().double().requires_grad_(with_grad) for x in xs]] + [
        None if t is None else t.detach().double().requires_grad_(with_grad) for t in (w, b, r)]
    with torch.set_grad_enabled(recording):
        out = fn(xs, w, b, r)
        ref = (torch.cat(x64, -1) @ w64.t() if provider == "gemm" else
               eager_fn(case.op)(x64, w64, b64, r64))
    errors = [relative_error(out, ref.detach())]
    if with_grad:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        _, relu, order = OPS[case.op]
        if relu and provider != "gemm":
            # Where the ReLU's input is within rounding of zero, a provider may take either side
            # (eager's add_relu rounds x W^T + b to the dtype before adding r), and each such
            # element would move the gradients by a whole term: no gradient flows from there.
            # Rounding is measured against the sum of the terms' sizes.
            with torch.no_grad():
                x_cat = torch.cat(x64, -1)
                side = x_cat @ w64.t() + b64 + (r64 if order == "add_relu" else 0)
                scale = x_cat.abs() @ w64.abs().t() + b64.abs() + (
                    r64.abs() if order == "add_relu" else 0)
                ambiguous = side.abs() <= 2 * torch.finfo(case.dtype).eps * scale
            grad = grad.masked_fill(ambiguous, 0)
        tensors64 = [t for t in (*x64, w64, b64, r64) if t is not None]
        errors += [relative_error(got, want) for got, want in zip(
            torch.autograd.grad(out, tensors, grad),
            torch.autograd.grad(ref, tensors64, grad.double()))]
    return max(errors)


# -------------------------------------------------------------------------------------------------
# Timing


def step_fn(fn: Callable, mode: str, args, grad: Optional[torch.Tensor]) -> Callable:
    xs, w, b, r = args
    if mode == "no_grad":
        def run():
            with torch.no_grad():
                fn(xs, w, b, r)
    elif mode == "forward":
        def run():
            fn(xs, w, b, r)
    else:
        tensors = [t for t in (*xs, w, b, r) if t is not None]

        def run():
            torch.autograd.grad(fn(xs, w, b, r), tensors, grad)
    return run


def time_cuda(steps: List[Callable], repeats: int, warm_up: bool = True,
              first: int = 0) -> List[float]:
    """CUDA events around each call, inputs rotated (from set `first`) so small shapes do not
    run from cache."""
    if warm_up:
        for run in steps:
            run()
    torch.cuda.synchronize()
    times = []
    for i in range(first, first + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps[i % len(steps)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def rotation(steps: List[Callable], first: int = 0) -> Callable[[], object]:
    """One call per invocation, through the steps (input sets) in turn from `first`."""
    turn = itertools.count(first)
    return lambda: steps[next(turn) % len(steps)]()


def time_queued_us(fn: Callable[[], object], calls: int, device: str = "cuda") -> float:
    """µs per call over `calls` calls queued back to back between two CUDA events (what a
    training step sees, overlaps and gaps between calls included); on a CPU the wall clock."""
    if device != "cuda":
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) * 1e6 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def time_cpu(steps: List[Callable], min_run_time: float) -> List[float]:
    import torch.utils.benchmark as benchmark

    rotate = {"i": 0}

    def stmt():
        steps[rotate["i"] % len(steps)]()
        rotate["i"] += 1

    # Timer runs on one thread unless told otherwise; the sweep is meant to use the machine's.
    measurement = benchmark.Timer("stmt()", globals={"stmt": stmt},
                                  num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return [t * 1e6 for t in measurement.times]


def peak_memory_mb(step: Callable[[], Any]) -> float:
    """Peak of torch.cuda.max_memory_allocated over one call of `step`, above what was allocated
    before it (inputs and parameters excluded)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_peaks(device: str, dtypes: Sequence[torch.dtype]) -> Dict[str, Any]:
    """The device's copy bandwidth and its matmul rate in each dtype of the sweep, measured once
    per run: {"gbps": ..., "tflops": {dtype name: ...}}. One large square matmul stands for the
    peak, so a case whose GEMM runs faster than it (a CPU's shapes, say) reaches past 1.0."""
    if device == "cuda":
        size, src = 8192, torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)

        def best_us(fn):
            return min(time_cuda([fn], 20))
    else:
        size, src = 1024, torch.randn(2**25)
        dst = torch.empty_like(src)

        def best_us(fn):
            return min(time_cpu([fn], 0.3))
    tflops = {}
    for dtype in dtypes:
        a = torch.randn(size, size, device=device).to(dtype)
        tflops[str(dtype).split(".")[-1]] = 2 * size**3 / best_us(lambda: torch.mm(a, a)) / 1e6
    return {"tflops": tflops, "gbps": 2 * src.nbytes / best_us(lambda: dst.copy_(src)) / 1e3}


# -------------------------------------------------------------------------------------------------
# The run


def cpu_name() -> str:
    """The CPU's model name where Linux says it (platform.processor() is only "x86_64" there)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> Dict[str, object]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=root, text=True,
                               capture_output=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    # Which build ran: a row of "fused" without the extension (or, on a GPU, without its CUDA
    # kernels) timed the reference path, and one of "fused-cutlass" without the cutlass backend
    # never reaches its kernel.
    return {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "commit": commit,
            "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "extension_loaded": fusedskip.extension_loaded(),
            "extension_cuda_kernels": bool(fusedskip._ops.HAS_CUDA_KERNELS),
            "cutlass_built": bool(fusedskip.cutlass_built())}


def fused_cuda_problem() -> Optional[str]:
    """Why the fused op cannot run CUDA kernels here, or None where it can: without them its
    calls on a GPU compute through the reference PyTorch path, which a row named fused must not
    pass off as the kernels' time."""
    if not fusedskip.extension_loaded():
        return f"the compiled extension did not load ({fusedskip._ops.LOAD_ERROR})"
    if not fusedskip._ops.HAS_CUDA_KERNELS:
        return ("the compiled extension was built without CUDA kernels (FUSEDSKIP_FORCE_CPU=1, "
                "or no CUDA toolkit at build time)")
    index = torch.cuda.current_device()
    if not fusedskip._ops.gpu_runs_kernels(index):
        major, minor = torch.cuda.get_device_capability(index)
        return (f"{torch.cuda.get_device_name(index)} has compute capability {major}.{minor} and "
                f"the CUDA kernels need 8.0 or newer")
    return None


def append_markdown(out_dir: str, stem: str, title: str, body: str, device: str = "cuda") -> str:
    """Appends `body` under `title` and this run's environment (device, versions, commit) to
    <out_dir>/<stem>-<date>.md, for the benchmark scripts in benchmarks/; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}-{datetime.date.today()}.md")
    with open(path, "a") as f:
        f.write(f"# {title}\n\n{environment(device)}\n\n{body}\n")
    return path


class Progress:
    """One line on stderr, rewritten: done/total, elapsed, what runs now. Into a log (not a
    terminal) a line of its own at each tenth instead, not one ever longer line."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()
        self.terminal = sys.stderr.isatty()

    def update(self, what: str):
        self.done += 1
        bar = "#" * int(30 * self.done / self.total)
        line = (f"[{bar:<30s}] {self.done}/{self.total} {time.time() - self.start:5.0f}s "
                f"{what[:60]:<60s}")
        if self.terminal:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif self.done == 1 or 10 * self.done // self.total != 10 * (self.done - 1) // self.total:
            print(line.rstrip(), file=sys.stderr, flush=True)

    def close(self):
        if self.terminal:
            print(file=sys.stderr)


def prepare(case: Case, provider: str, fn: Callable, mode: str, arg_sets, grad,
            row: dict) -> Optional[List[Callable]]:
    """Check the provider's output against float64: the calls to time, or None with
    row["status"] saying why it is not timed."""
    launches = cutlass_launches()
    err = check(case, provider, fn, mode)  # in forward+backward its backward's kernels count too
    if provider == "fused-cutlass" and cutlass_launches() == launches:
        # Its kernels do not take this shape / device / dtype: the cuBLAS path ran, which the
        # fused-gemm_epilogue row already measures.
        row["status"] = "n/a: the cutlass kernel does not apply here"
        return None
    row["rel_err"] = err
    if not err <= TOLERANCE[case.dtype]:
        row["status"] = f"mismatch (relative error {err:.3g})"
        return None
    if provider == "gemm":
        arg_sets = [gemm_operands(a) for a in arg_sets]
    return [step_fn(fn, mode, a, grad) for a in arg_sets]


# A case's providers are timed in rounds, each round taking every provider in turn, so that a
# slow stretch of the machine (its clocks, another process) falls on all of them alike rather
# than on whichever was being timed then: one provider's 200 calls at a launch-bound size take
# ~10 ms. (Whole rows of a sweep timed one after the other had p20 above a neighbour's p80.)
TIMING_ROUNDS = 5


@dataclasses.dataclass
class Timings:
    """One provider's times on one case: µs of each single call (CUDA events around it on a
    GPU, waiting for it to finish; on a CPU, per call over torch.utils.benchmark's blocks), and
    on a GPU the µs per call of each round's calls queued back to back."""
    per_call: List[float] = dataclasses.field(default_factory=list)
    queued: List[float] = dataclasses.field(default_factory=list)


def time_interleaved(device: str, timed: Sequence[Tuple[str, List[Callable]]], repeats: int,
                     min_run_time: float) -> List[Any]:
    """Each entry's Timings over TIMING_ROUNDS rounds, in the order given, or the status saying
    why its calls stopped (it then sits out the later rounds)."""
    results: List[Any] = [Timings() for _ in timed]
    per_round = max(1, repeats // TIMING_ROUNDS)
    for round_index in range(TIMING_ROUNDS):
        for i, (provider, steps) in enumerate(timed):
            if isinstance(results[i], str):
                continue
            with provider_backend(provider):
                try:
                    if device == "cuda":
                        first = round_index * per_round
                        results[i].per_call += time_cuda(steps, per_round,
                                                         warm_up=round_index == 0, first=first)
                        results[i].queued.append(time_queued_us(rotation(steps, first),
                                                                per_round))
                    else:
                        results[i].per_call += time_cpu(steps, min_run_time / TIMING_ROUNDS)
                except Exception as error:  # e.g. no derivative: costs this provider's row only
                    # The message only: the exception's traceback would keep the failed call's
                    # tensors alive through the other providers' rounds.
                    results[i] = f"error: {type(error).__name__}: {str(error)[:200]}"
    return results


DTYPES = ("float16", "bfloat16", "float32", "float64")


def parse_dtypes(spec: str) -> List[torch.dtype]:
    names = [d.strip() for d in spec.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown or not names:
        raise SystemExit(f"--dtype: unknown {unknown or [spec]}; choose from {list(DTYPES)}")
    return [getattr(torch, d) for d in names]


@dataclasses.dataclass
class Plan:
    """What a sweep times, from the command line, checked before anything runs."""
    dtypes: List[torch.dtype]
    sizes: List[Tuple[int, int, int]]
    ops: List[str]
    modes: List[str]
    providers: List[str]


def split_list(text: str) -> List[str]:
    """A comma-separated option's items, each without the spaces around it, as --dtype and
    --sizes read theirs: "relu_add, concat2" names two ops."""
    return [item.strip() for item in text.split(",")]


def sweep_plan(args, device: str) -> Plan:
    dtypes = parse_dtypes(args.dtype)
    sizes = parse_sizes(args.sizes) if args.sizes else standard_sizes(device, args.quick)
    if args.op:
        ops = split_list(args.op)
    elif args.quick:
        ops = ["relu_add", "concat2"]
    else:
        ops = list(OPS) if device == "cuda" else ["relu_add", "add_relu", "concat2_relu", "concat4"]
    if args.mode:
        modes = split_list(args.mode)
    else:
        modes = list(MODES) if device == "cuda" and not args.quick else ["forward",
                                                                         "forward+backward"]
    if args.providers:
        providers = split_list(args.providers)
    elif device == "cuda":
        # max-autotune spends tens of seconds compiling each graph: not in a smoke run.
        providers = [p for p in GPU_PROVIDERS if not (args.quick and p == "compile-max-autotune")]
    else:
        providers = list(CPU_PROVIDERS)
    for name, values, known in (("--op", ops, OPS), ("--mode", modes, MODES),
                                ("--providers", providers, KNOWN_PROVIDERS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; choose from {list(known)}")
    for op in ops:
        narrow = [f"{m}x{k}x{n}" for m, k, n in sizes if k < OPS[op][0]]
        if narrow:
            raise SystemExit(f"--sizes: {op} concatenates {OPS[op][0]} inputs, so K must be at "
                             f"least {OPS[op][0]}; got {narrow}")
    return Plan(dtypes, sizes, ops, modes, providers)


def format_rate(rate: Optional[float]) -> str:
    """At least three significant digits, in plain notation: a CPU's matmul rate is a few
    hundredths of a TFLOP/s, which one decimal would show as 0.0. "n/a" where no rate was
    measured."""
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return "n/a"
    return f"{rate:.{max(0, 2 - math.floor(math.log10(rate)))}f}"


def run_sweep(plan: Plan, args, device: str, env: Dict[str, object]) -> Tuple[List[dict], bool]:
    """The rows, and whether Ctrl-C stopped the sweep (the rows are then those of the cases it
    finished)."""
    # Every (op, shape, mode) is its own graph; the default limit would silently fall back to
    # eager after eight of them.
    torch._dynamo.config.cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 4096
    peaks = measure_peaks(device, plan.dtypes)
    rates = ", ".join(f"{format_rate(rate)} TFLOP/s {name}"
                      for name, rate in peaks["tflops"].items())
    print(f"peaks on {env['device_name']}: matmul {rates}; copy {format_rate(peaks['gbps'])} "
          "GB/s", flush=True)
    repeats = 30 if args.quick else 200
    min_run_time = 0.05 if args.quick else 0.3
    cases = list(itertools.product(plan.dtypes, plan.sizes, plan.ops, plan.modes))
    progress = Progress(len(cases) * len(plan.providers))
    rows: List[dict] = []
    try:
        for dtype, size, op, mode in cases:
            rows += time_case(dtype, size, op, mode, plan.providers, device, env, peaks, progress,
                              repeats, min_run_time)
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted at {progress.done}/{progress.total}: keeping the {len(rows)} rows of "
              "the cases it finished", file=sys.stderr, flush=True)
        return rows, True
    progress.close()
    return rows, False


def time_case(dtype, size, op, mode, providers, device, env, peaks, progress, repeats,
              min_run_time) -> List[dict]:
    """Every provider's row for one (dtype, shape, op, mode): each speedup is against eager on
    this same case.

    On a GPU, two measures. A single call between CUDA events, waited for before the next, is
    what a call costs alone: its host time, then its kernels' (the p20/p50/p80). Queued back to
    back, one call's host work overlaps the kernels of the one before, as in a training loop:
    per call, the larger of host and device time (queued_us, the median of the rounds). Where
    the host work is the whole cost (the launch-bound sizes), the queued measure is the one a
    model sees."""
    m, k, n = size
    case = Case(op, m, k, n, dtype, device)
    order = OPS[op][2]
    element = torch.empty((), dtype=dtype).element_size()
    # Enough input sets that one rotation is larger than the last-level cache.
    one_set = count_bytes(m, case.k, n, "forward", element, residual=order is not None)
    sets = max(1, min(8, (64 << 20) // max(1, one_set))) if device == "cuda" else 1
    inputs_error = None
    arg_sets = grad = None
    try:
        arg_sets = [case.make_inputs(requires_grad=mode != "no_grad", seed=s)
                    for s in range(sets)]
        grad = torch.randn(m, n, device=device, dtype=dtype)
    except (RuntimeError, MemoryError) as error:  # a size this device cannot hold
        inputs_error = f"error: inputs: {type(error).__name__}: {str(error)[:200]}"
    eager_p50 = None
    case_rows = []  # this case's: each row's speedup is against eager on the same case
    timed = []  # (provider, row, calls) of the providers whose output checked out
    for provider in providers:
        progress.update(f"{op} {m}x{case.k}x{n} {mode} {provider}")
        fn = provider_fn(provider, op, mode)
        row = {"op": op, "provider": provider, "mode": mode, "dtype": str(dtype).split(".")[-1],
               "M": m, "K": list(case.widths), "N": n, **env,
               "flops": count_flops(m, case.k, n, mode),
               "bytes": count_bytes(m, case.k, n, mode, element,
                                    residual=order is not None)}
        if fn is None:
            continue  # not a meaningful comparison for this op / mode
        case_rows.append(row)
        if inputs_error:
            row.update(status=inputs_error)
            continue
        with provider_backend(provider):
            try:
                steps = prepare(case, provider, fn, mode, arg_sets, grad, row)
            except Exception as error:  # e.g. a compile failure: recorded, not fatal
                row.update(status=f"error: {type(error).__name__}: {str(error)[:200]}")
                continue
        if steps is not None:  # else row["status"] says why it is not timed
            timed.append((provider, row, steps))
    results = time_interleaved(device, [(p, steps) for p, _, steps in timed], repeats,
                               min_run_time)
    eager_queued = None
    for (provider, row, steps), times in zip(timed, results):
        if isinstance(times, str):
            row.update(status=times)
            continue
        if mode == "forward+backward":
            # Not for max-autotune's CUDA graphs: their memory is a private pool allocated while
            # warming up, before the measured call, which then allocates nothing.
            with provider_backend(provider):
                row["peak_mem_mb"] = (peak_memory_mb(steps[0]) if device == "cuda"
                                      and provider != "compile-max-autotune" else None)
        p20, p50, p80 = quantiles(times.per_call)
        row.update(status="ok", p20_us=p20, p50_us=p50, p80_us=p80,
                   tflops=row["flops"] / p50 / 1e6, gbps=row["bytes"] / p50 / 1e3)
        floor_us = max(row["flops"] / (peaks["tflops"][row["dtype"]] * 1e6),
                       row["bytes"] / (peaks["gbps"] * 1e3))
        row["roofline_fraction"] = floor_us / p50
        if times.queued:
            row["queued_us"] = quantiles(times.queued)[1]  # the median round
        if provider == "eager":
            eager_p50, eager_queued = p50, row.get("queued_us")
    for row in case_rows:
        if row.get("p50_us") and eager_p50:
            row["speedup_vs_eager"] = eager_p50 / row["p50_us"]
        if row.get("queued_us") and eager_queued:
            row["queued_speedup_vs_eager"] = eager_queued / row["queued_us"]
    return case_rows


# -------------------------------------------------------------------------------------------------
# Model level: training steps


def residual_mlp(fused: bool, width: int, blocks: int):
    """relu(linear(x)) + x, `blocks` times: fusedskip's layers, or nn.Linear and ATen ops."""

    class ResidualMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                fusedskip.LinearReLUResidual(width, width) if fused
                else torch.nn.Linear(width, width) for _ in range(blocks))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x, residual=x) if fused else torch.relu(layer(x)) + x
            return x

    return ResidualMLP()


def unet_mlp(fused: bool, width: int):
    """Three relu(linear) layers down, three relu(linear(cat(x, skip))) up."""

    class UNetMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.ModuleList(
                fusedskip.LinearReLUResidual(width, width) if fused
                else torch.nn.Linear(width, width) for _ in range(3))
            self.up = torch.nn.ModuleList(
                fusedskip.ConcatLinear([width, width], width, activation="relu") if fused
                else torch.nn.Linear(2 * width, width) for _ in range(3))

        def forward(self, x):
            skips = []
            for layer in self.down:
                x = layer(x) if fused else torch.relu(layer(x))
                skips.append(x)
            for layer, skip in zip(self.up, reversed(skips)):
                x = layer(x, skip) if fused else torch.relu(layer(torch.cat([x, skip], -1)))
            return x

    return UNetMLP()


MODEL_PROVIDERS = ("fused", "eager", "compile")


def run_models(args, device: str, env, plan: Plan) -> List[dict]:
    """Training steps of the two models in each dtype of the plan, as each of its providers the
    models come in."""
    batch, width = (256, 64) if args.quick else ((8192, 1024) if device == "cuda" else (1024, 128))
    rows = []
    # The models come in three forms; --providers picks among them (the plan's providers, with
    # their spaces stripped, are --providers' or else a default that has all three).
    providers = [p for p in plan.providers if p in MODEL_PROVIDERS]
    if not providers:
        print(f"note: --model times only {', '.join(MODEL_PROVIDERS)}, none of which --providers "
              "names: no model rows", flush=True)
        return rows
    if device != "cuda":
        print("note: on a CPU the fused modules compute through the reference path (README, "
              "'Where each path runs'), so 'fused' here times that path", flush=True)
    for dtype, model_name, provider in itertools.product(
            plan.dtypes, ("residual_mlp16", "unet_mlp"), providers):
        dtype_name = str(dtype).split(".")[-1]
        fused = provider == "fused"
        torch.manual_seed(0)
        model = (residual_mlp(fused, width, 16) if model_name == "residual_mlp16"
                 else unet_mlp(fused, width)).to(device, dtype)
        if provider == "compile":
            model = torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, width, device=device, dtype=dtype)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()

        steps = [step]
        try:
            times = time_cuda(steps, 30 if args.quick else 100) if device == "cuda" else \
                time_cpu(steps, 0.2 if args.quick else 1.0)
        except Exception as error:  # e.g. torch.compile unable to build: recorded, not fatal
            rows.append({"model": model_name, "provider": provider, "batch": batch,
                         "width": width, "dtype": dtype_name,
                         "status": f"error: {type(error).__name__}: {str(error)[:200]}",
                         **env})
            print(f"{model_name:15s} {provider:8s} {dtype_name:8s} {rows[-1]['status']}",
                  flush=True)
            continue
        p20, p50, p80 = quantiles(times)
        peak = peak_memory_mb(step) if device == "cuda" else None
        rows.append({"model": model_name, "provider": provider, "batch": batch, "width": width,
                     "dtype": dtype_name, "status": "ok", "p20_us": p20,
                     "p50_us": p50, "p80_us": p80, "peak_mem_mb": peak, **env})
        print(f"{model_name:15s} {provider:8s} {dtype_name:8s} step {p50:10.1f} us"
              + (f"  peak {peak:8.1f} MiB" if peak is not None else ""), flush=True)
    return rows


# -------------------------------------------------------------------------------------------------
# Output


# Every file a run writes into its folder. A run first removes those of them an earlier run left
# there (the default folder is one per device and day), so that none of an earlier run's plots
# or model rows sits beside this run's rows as if it were this run's; other files stay.
OUTPUTS = ("rows.jsonl", "rows.csv", "table.md", "speedup.png", "models.jsonl", "models.csv",
           "models.png")


def remove_outputs(out_dir: str):
    for name in OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)


def strict_json(row: dict) -> dict:
    """The row with each NaN or infinite number as None: json.dumps would write the bare token
    NaN, which strict JSON readers (jq, JavaScript) refuse. A NaN output's relative error is
    NaN; its row's status already says mismatch."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in row.items()}


def write_rows(rows: List[dict], out_dir: str, stem: str = "rows"):
    os.makedirs(out_dir, exist_ok=True)
    rows = [strict_json(row) for row in rows]
    with open(os.path.join(out_dir, f"{stem}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
    keys = sorted({key for row in rows for key in row})
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: List[dict]) -> str:
    def number(value, digits):  # none: no eager row for the case, or no queued timing (CPU)
        return f"{value:.{digits}f}" if value else "–"

    lines = ["| op | mode | dtype | M | K | N | provider | p50 µs | p20–p80 µs | TFLOP/s | GB/s | "
             "roofline | vs eager | queued µs | vs eager, queued | peak MiB | status |",
             "|---|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("status") == "ok":
            mem = f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else ""
            lines.append(
                f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['M']} | {r['K']} | {r['N']} | "
                f"{r['provider']} | {r['p50_us']:.1f} | {r['p20_us']:.1f}–{r['p80_us']:.1f} | "
                f"{r['tflops']:.3f} | {r['gbps']:.1f} | {r['roofline_fraction']:.3f} | "
                f"{number(r.get('speedup_vs_eager'), 2)} | {number(r.get('queued_us'), 1)} | "
                f"{number(r.get('queued_speedup_vs_eager'), 2)} | {mem} | ok |")
        else:
            lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['M']} | {r['K']} | "
                         f"{r['N']} | {r['provider']} | | | | | | | | | | {r.get('status')} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: str, model_rows: Optional[List[dict]] = None) -> List[str]:
    """Speedup over eager against problem size (M*K*N), one line per provider, one panel per
    (op, mode, dtype); with model rows, a second figure (models.png beside it) of training-step
    peak memory. Returns the names of the files written: none without rows to draw, or without
    matplotlib, which only the plots need."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or "
              "pip install 'fusedskip[bench]')", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup_vs_eager")]
    panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in ok})
    if panels:
        cols = min(3, len(panels))
        rows_n = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for provider in sorted({r["provider"] for r in ok}):
                points = sorted((r["M"] * sum(r["K"]) * r["N"], r["speedup_vs_eager"]) for r in ok
                                if (r["op"], r["mode"], r["dtype"], r["provider"]) ==
                                (*panel, provider))
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_title(", ".join(panel), fontsize=10)
            ax.set_xlabel("M·K·N")
            ax.set_ylabel("speedup over eager")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        first = ok[0]
        fig.suptitle(f"{first['device_name']}, torch {first['torch']}, commit {first['commit']}",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.basename(path))
    timed = [r for r in model_rows or [] if r.get("status", "ok") == "ok"]
    if timed:
        mem = [r for r in timed if r.get("peak_mem_mb") is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        several = len({r.get("dtype") for r in timed}) > 1  # then each bar names its dtype
        labels = [f"{r['model']}\n{r['provider']}" + (f" {r.get('dtype')}" if several else "")
                  for r in (mem or timed)]
        values = [r["peak_mem_mb"] if mem else r["p50_us"] for r in (mem or timed)]
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=25, ha="right")
        ax.set_ylabel("peak memory (MiB)" if mem else "training step (µs)")
        first = timed[0]
        ax.set_title(f"training steps: {first['device_name']}, torch {first['torch']}, commit "
                     f"{first['commit']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(path), "models.png"), dpi=110)
        plt.close(fig)
        written.append("models.png")
    return written


def read_jsonl(path: str) -> List[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}, line {number}: not a row a benchmark run writes "
                                     f"({error})") from None
    return rows


def failed_rows(rows: List[dict]) -> List[dict]:
    """The rows that fail a run: a mismatch (any provider's result wrong), and an error of a fused
    provider (the op under test raised: a kernel fault, say). A peer's error (torch.compile unable
    to build, say) costs its row only, as do inputs a size too large for the device cannot
    hold (every provider's row of that case says so)."""
    def failed(row):
        status = str(row.get("status", "ok"))
        fused = row.get("provider") == "fused" or row.get("provider") in FORCED_PROVIDERS
        return status.startswith("mismatch") or (
            fused and status.startswith("error:") and not status.startswith("error: inputs:"))

    return [row for row in rows if failed(row)]


def check_cuda_kernels(who: str) -> int:
    """For the GPU scripts, before they spend a GPU machine's time: one line saying whether the
    extension loaded, has CUDA kernels, and sees a GPU that runs them, and 0 where
    fusedskip.cuda_available(), else 1 with what to do."""
    gpu = torch.cuda.is_available()
    loaded = fusedskip._ops.LOAD_ERROR or fusedskip._C.__file__
    print(f"{who}: extension {loaded} | CUDA kernels: {fusedskip._ops.HAS_CUDA_KERNELS} | "
          f"torch sees a GPU: {gpu} | its compute capability: "
          f"{torch.cuda.get_device_capability() if gpu else None} (the kernels need (8, 0) on)",
          flush=True)
    if fusedskip.cuda_available():
        return 0
    print(f"{who}: fusedskip.cuda_available() is False here (the line above says why), so there "
          "are no CUDA kernels of the extension's to run: build them for this GPU first "
          "(scripts/gpu_check.sh; FUSEDSKIP_PREBUILT=1 for a carried build)", flush=True)
    return 1


def rows_verdict(paths: Sequence[str]) -> int:
    """For the GPU scripts, whose time limits stop a bench with timeout's status, not its own:
    a line per rows file there is (rows timed; failed, by failed_rows; not timed, each row's
    status says why), and 1 where a row fails the run, else 0."""
    failed_any = False
    for path in paths:
        if not os.path.isfile(path):
            continue
        rows = read_jsonl(path)
        failed = failed_rows(rows)
        timed = sum(r.get("status") == "ok" for r in rows)
        print(f"{path}: {timed} timed, {len(failed)} failed, {len(rows) - timed - len(failed)} "
              "not timed (each row's status says why)")
        for r in failed[:5]:
            print(f"  failed: {r.get('provider')} {r.get('op', r.get('model'))} {r['status']}")
        failed_any = failed_any or bool(failed)
    return 1 if failed_any else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default cuda where torch sees a GPU, else cpu")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated; default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="a smoke run: two ops, two sizes")
    parser.add_argument("--op", help=f"comma-separated from {list(OPS)}")
    parser.add_argument("--mode", help=f"comma-separated from {list(MODES)}")
    parser.add_argument("--providers", help=f"comma-separated from {list(KNOWN_PROVIDERS)}")
    parser.add_argument("--sizes", help="MxKxN[,MxKxN...]")
    parser.add_argument("--model", action="store_true", help="also time two models' training steps "
                        f"(as {', '.join(MODEL_PROVIDERS)}, or those --providers names)")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--plot", metavar="DIR", help="redraw DIR's plots from DIR/rows.jsonl")
    args = parser.parse_args(argv)

    if args.plot:
        if not os.path.isfile(os.path.join(args.plot, "rows.jsonl")):
            raise SystemExit(f"--plot: no rows.jsonl in {args.plot!r}; pass a folder a "
                             "benchmark run wrote")
        model_path = os.path.join(args.plot, "models.jsonl")
        drawn = plot(read_jsonl(os.path.join(args.plot, "rows.jsonl")),
                     os.path.join(args.plot, "speedup.png"),
                     read_jsonl(model_path) if os.path.exists(model_path) else None)
        if not drawn:
            print(f"--plot: nothing to draw from {args.plot!r} (no timed row has a speed-up "
                  "over eager)", file=sys.stderr)
            return 1
        print(f"redrew {', '.join(os.path.join(args.plot, name) for name in drawn)}")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch")
    if args.out is not None and not args.out.strip():
        raise SystemExit("--out: empty; name a folder (it is created if missing)")
    dtype_given = args.dtype

    def plan_for(device):  # every argument checked before anything runs
        args.dtype = dtype_given if dtype_given is not None else (
            "bfloat16" if device == "cuda" else "float32")
        return sweep_plan(args, device)

    plan = plan_for(device)
    # On a GPU the fused providers need the extension's CUDA kernels: without them their calls
    # would time the reference path. Asked for with --device cuda, that is refused; by default
    # (make bench, on a machine whose build has no CUDA kernels) the run is on the CPU, said so.
    fused = [p for p in plan.providers if p == "fused" or p in FORCED_PROVIDERS]
    problem = fused_cuda_problem() if device == "cuda" and fused else None
    if problem and args.device:
        raise SystemExit(
            f"--device cuda: {problem}, so {', '.join(dict.fromkeys(fused))} would time the "
            "reference PyTorch path, not the CUDA kernels. Build the extension for this torch "
            "and GPU (make build), or pass --device cpu, or --providers without the fused ones")
    if problem:
        print(f"note: torch sees a GPU, but {problem}: timing on the CPU instead (--device cuda "
              "would refuse to run)", file=sys.stderr, flush=True)
        device = "cpu"
        plan = plan_for(device)
    env = environment(device)
    # A checkout keeps its results in its own benchmarks/results; an installed package (no
    # benchmarks/ beside it) writes under the current directory, not into site-packages.
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = (os.path.join(checkout, "benchmarks", "results")
               if os.path.isdir(os.path.join(checkout, "benchmarks")) else
               os.path.join("benchmarks", "results"))
    out = args.out or os.path.join(
        results, f"{re.sub(r'[^A-Za-z0-9]+', '-', env['device_name']).strip('-').lower()}-"
                 f"{env['date']}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out: {out!r} exists and is not a folder; name a folder (it is "
                         "created if missing)")
    if not any(provider_fn(p, op, mode) for p in plan.providers for op in plan.ops
               for mode in plan.modes):
        raise SystemExit("nothing to time: no provider has a form for these ops and modes "
                         "(cublaslt runs under --mode no_grad only, gemm under forward only)")
    try:  # now, not after the sweep: a folder that cannot be made would lose every row
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--out: cannot create {out!r} ({error}); name a folder you can "
                         "write") from None
    print(f"fusedskip {fusedskip.__version__}, torch {env['torch']}, {env['device_name']}, "
          f"commit {env['commit']} -> {out}", flush=True)

    # timeout's TERM (scripts/gpu_check.sh cuts its steps so) keeps the finished cases' rows, as
    # Ctrl-C does.
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: no handler to set
        previous = None
    try:
        rows, interrupted = run_sweep(plan, args, device, env)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    remove_outputs(out)  # after the sweep: an earlier run's files are replaced, not mixed in
    write_rows(rows, out)
    written = ["rows.jsonl", "rows.csv"]
    table = markdown_table(rows)
    model_rows = run_models(args, device, env, plan) if args.model and not interrupted else None
    if model_rows:
        write_rows(model_rows, out, "models")
        written += ["models.jsonl", "models.csv"]
    cuda_note = f" (CUDA {env['cuda']})" if device == "cuda" else ""
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"# fusedskip benchmark: {env['device_name']}\n\n"
                f"torch {env['torch']}{cuda_note}, "
                f"Python {env['python']}, commit {env['commit']}, {env['date']}"
                f"{', interrupted: the cases it finished' if interrupted else ''}\n\n{table}\n")
        if model_rows:
            f.write("\n| model | provider | dtype | batch × width | p50 µs | peak MiB |\n"
                    "|---|---|---|---|---:|---:|\n")
            for r in model_rows:
                head = (f"| {r['model']} | {r['provider']} | {r['dtype']} | "
                        f"{r['batch']} × {r['width']} | ")
                if r.get("status", "ok") != "ok":
                    f.write(f"{head}{r['status']} | |\n")
                    continue
                mem = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else ""
                f.write(f"{head}{r['p50_us']:.1f} | {mem} |\n")
    written.append("table.md")
    written += plot(rows, os.path.join(out, "speedup.png"), model_rows)
    print(table)
    print(f"wrote {out}/{', '.join(written)}")
    # A wrong result, or the fused op failing, fails the run even where it was stopped early: 1,
    # not 130, so that a script can tell "stopped by its time limit" from "found a fault".
    failed = failed_rows(rows + (model_rows or []))
    if failed:
        print(f"{len(failed)} row(s) failed:", file=sys.stderr)
        for r in failed[:10]:
            what = (f"{r['op']} {r['M']}x{sum(r['K'])}x{r['N']} {r['mode']}" if "op" in r
                    else f"model {r['model']}")
            print(f"  {r['provider']} {what} {r['dtype']}: {r['status']}", file=sys.stderr)
        return 1
    if interrupted:
        return 130
    if all(r.get("status") != "ok" for r in rows):
        print("no row was timed: see each row's status", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
