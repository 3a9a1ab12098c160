"""Every CUDA kernel once, small: the workload compute-sanitizer runs (scripts/gpu_check.sh).

Forward and backward of every form (bias or not, residual none / relu_add / add_relu, concat of
1-3 inputs with and without ReLU, non-contiguous inputs, an empty batch) in float32, bfloat16
and float64, each checked against the float64 reference (conftest.check_against_reference), so a
wrong result fails here too.
"""

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedskip  # noqa: E402
from conftest import check_against_reference, make_sample  # noqa: E402


def main() -> int:
    assert fusedskip.cuda_available(), "needs a GPU and the CUDA kernels"
    torch.manual_seed(0)
    failures = cases = 0
    for dtype, bias, residual, (widths, relu), rows, layout in itertools.product(
            (torch.float32, torch.bfloat16, torch.float64), (True, False),
            (None, "relu_add", "add_relu"), (([13], True), ([5, 8], False), ([1, 7, 9], True)),
            (0, 3, 130), ("contiguous", "transposed")):
        if residual is not None and len(widths) > 1:
            continue
        sample = make_sample(widths, 37, (rows,), bias=bias, residual=residual, relu=relu,
                             layout=layout, dtype=dtype, device="cuda")
        cases += 1
        try:
            check_against_reference(sample, dtype)
        except AssertionError as error:
            failures += 1
            print(f"MISMATCH {sample.name} {dtype}: {error}")
    torch.cuda.synchronize()
    print(f"cuda_smoke: {cases} cases, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
