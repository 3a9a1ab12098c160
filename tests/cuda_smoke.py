"""Every CUDA kernel once, small: the workload compute-sanitizer runs (scripts/gpu_check.sh).

In this order, the least-run kernels first, so that a run cut off by its limit still covers
them: on an sm_90 GPU the `cutlass` backend's GEMMs (bf16 / fp16: the forward in every ReLU form,
the concat forward and backward; partial tiles); the native kernel's split-K weight gradient and
its TF32 path; then forward and backward of every form (bias or not, residual none / relu_add /
add_relu, concat of 1-3 inputs with and without ReLU, non-contiguous inputs, an empty batch) in
float32, bfloat16 and float64, through both other CUDA backends (the native kernel: SIMT for
float32 / float64, tensor cores for bfloat16; cuBLAS + the element-wise pass). Each is checked
against the float64 reference (conftest.check_against_reference), so a wrong result fails here
too.
"""

import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedskip  # noqa: E402
from conftest import check_against_reference, make_sample  # noqa: E402


def main(backends=("native", "gemm_epilogue", "cutlass"), small=False) -> int:
    assert fusedskip.cuda_available(), "needs a GPU and the CUDA kernels"
    torch.manual_seed(0)
    failures = cases = 0
    start = time.monotonic()

    def run(sample, dtype, what, tol=None):
        nonlocal failures, cases
        cases += 1
        try:
            check_against_reference(sample, dtype, tol)
        except AssertionError as error:
            failures += 1
            print(f"MISMATCH {what} {sample.name} {dtype}: {error}")

    if "cutlass" in backends and fusedskip.cutlass_built() and \
            torch.cuda.get_device_capability() == (9, 0):
        # The CUTLASS GEMM with its epilogue (sm_90 only): each form, partial tiles in M and N.
        # First, the kernels least run: a sanitizer run cut off by its limit still covers them.
        print("cuda_smoke: cutlass from case 1", flush=True)
        # Small: each kernel once (a residual position is a kernel; dtypes share their code).
        dtypes = (torch.bfloat16,) if small else (torch.bfloat16, torch.float16)
        with fusedskip.use_backend("cutlass"):
            for dtype, bias, residual, (rows, k, cols) in itertools.product(
                    dtypes, (True,) if small else (True, False), (None, "relu_add", "add_relu"),
                    ((130, 264, 384),) if small else ((1, 64, 128), (130, 264, 384))):
                sample = make_sample([k], cols, (rows,), bias=bias, residual=residual,
                                     dtype=dtype, device="cuda")
                run(sample, dtype, "cutlass")
            # Concat layers: the forward's K loop over the inputs (inputs ending inside a K
            # tile) and the backward's grouped GEMMs, partial tiles in every dimension, 2 to 4
            # blocks, with and without ReLU; inputs whose rows are further apart than their
            # width (as a split's views are).
            concats = [([8, 136], 256, 130, True, "contiguous"),
                       ([64, 200, 24], 264, 300, False, "contiguous")]
            if not small:
                concats.append(([8, 16, 24, 64], 128, 130, True, "padded"))
            for dtype, (widths, cols, rows, relu, layout) in itertools.product(dtypes, concats):
                sample = make_sample(widths, cols, (rows,), relu=relu, layout=layout, dtype=dtype,
                                     device="cuda")
                run(sample, dtype, "cutlass concat")
            if not small:  # Concat with a residual (the op's, not the public API's): the cat.
                xs = [torch.randn(130, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16) / 12
                r = torch.randn(130, 256, device="cuda", dtype=torch.bfloat16)
                out, _ = torch.ops.fusedskip.fused_linear(xs, w, None, r, True, False)
                ref = torch.relu(torch.cat(xs, 1).double() @ w.double().T) + r.double()
                cases += 1
                if not (out.double() - ref).norm() <= 1e-2 * ref.norm():
                    failures += 1
                    print("MISMATCH cutlass concat with a residual")
    if "native" in backends:
        print(f"cuda_smoke: native split-K and TF32 from case {cases + 1}", flush=True)
        with fusedskip.use_backend("native"):
            # Split-K of the weight gradient (rows >> outputs), in both tensor-core dtypes.
            for dtype in (torch.bfloat16, torch.float16):
                sample = make_sample([20, 45], 70, (1100,), dtype=dtype, device="cuda")
                run(sample, dtype, "split-K")
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                sample = make_sample([33], 65, (70,), residual="add_relu", dtype=torch.float32,
                                     device="cuda")
                run(sample, torch.float32, "TF32", tol=1e-3)  # TF32's bound
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
    grid_backends = [b for b in backends if b != "cutlass"]
    group = None
    for backend, dtype, bias, residual, (widths, relu), rows, layout in itertools.product(
            grid_backends, (torch.float32, torch.bfloat16, torch.float64),
            (True, False), (None, "relu_add", "add_relu"),
            (([13], True), ([5, 8], False), ([1, 7, 9], True), ([24], True), ([10], True)),
            (0, 3, 130),
            ("contiguous", "transposed")):
        if residual is not None and len(widths) > 1:
            continue
        # Strides matter once, at a size with whole and partial tiles; the edge sizes
        # (empty, under one warp's rows) contiguous only. Under the sanitizers every case costs.
        if layout == "transposed" and rows != 130:
            continue
        # The example MLP's 10-wide layer: the native epilogue's 16-column span, every tile of
        # it, with the ReLU's mask gather and each residual form, in the SIMT kernels too (the
        # split-K case's last tile is the tensor-core kernels' only one); one size and layout.
        if widths == [10] and (rows != 130 or layout != "contiguous"):
            continue
        # Small (racecheck's, whose every case is slow): each dtype, form and width at the one
        # size with whole and partial tiles; shared-memory hazards do not depend on the rest.
        if small and (rows != 130 or layout != "contiguous" or not bias or residual == "relu_add"):
            continue
        if (backend, dtype) != group:  # progress, so that a run cut off by a limit says where
            group = (backend, dtype)
            print(f"cuda_smoke: {backend} {dtype} from case {cases + 1}, "
                  f"{time.monotonic() - start:.0f} s in", flush=True)
        # 64 outputs: whole 16-byte words in the element-wise passes; 37 and 30: ragged edges
        # (30 also the native epilogue's 32-column span; the split-K case's 70 its 16-column one).
        cols = {(24,): 64, (13,): 30, (10,): 10}.get(tuple(widths), 37)
        sample = make_sample(widths, cols, (rows,), bias=bias, residual=residual, relu=relu,
                             layout=layout, dtype=dtype, device="cuda")
        with fusedskip.use_backend(backend):
            run(sample, dtype, backend)
    torch.cuda.synchronize()
    print(f"cuda_smoke: {cases} cases, {failures} mismatches")
    return 1 if failures or cases == 0 else 0  # no case run (no such backend here) is no pass


if __name__ == "__main__":
    # Optional arguments pick the backends (racecheck needs only the native kernel's shared
    # memory; cuBLAS's own kernels are not ours to check); --small, fewer cases.
    names = tuple(a for a in sys.argv[1:] if a != "--small")
    sys.exit(main(names or ("native", "gemm_epilogue", "cutlass"), small="--small" in sys.argv))
