"""Every CUDA kernel once, small: the workload compute-sanitizer runs (scripts/gpu_check.sh).

Forward and backward of every form (bias or not, residual none / relu_add / add_relu, concat of
1-3 inputs with and without ReLU, non-contiguous inputs, an empty batch) in float32, bfloat16
and float64, each checked against the reference so a wrong result fails here too.
"""

import itertools
import sys

import torch

import fusedskip
from fusedskip import reference


def main() -> int:
    assert fusedskip.cuda_available(), "needs a GPU and the CUDA kernels"
    torch.manual_seed(0)
    failures = 0
    cases = 0
    for dtype, bias, (residual, order), (widths, relu), rows in itertools.product(
            (torch.float32, torch.bfloat16, torch.float64), (True, False),
            ((None, "relu_add"), ("r", "relu_add"), ("r", "add_relu")),
            (([13], True), ([5, 8], False), ([1, 7, 9], True)), (0, 3, 130)):
        if residual is not None and len(widths) > 1:
            continue
        n = 37
        xs = [torch.randn(rows, w, device="cuda", dtype=dtype).t().contiguous().t()
              .requires_grad_() for w in widths]
        w = torch.randn(n, sum(widths), device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) if bias else None
        r = (torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
             if residual else None)
        if len(widths) == 1 and relu:
            out = fusedskip.linear_relu_residual(xs[0], w, b, r, order=order)
            ref = reference.linear_relu_residual(xs[0], w, b, r, order=order)
        else:
            act = "relu" if relu else None
            out = fusedskip.linear_concat(xs, w, b, activation=act)
            ref = reference.linear_concat(xs, w, b, activation=act)
        tensors = [t for t in (*xs, w, b, r) if t is not None]
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, tensors, grad)
        ref_grads = torch.autograd.grad(ref, tensors, grad)
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        for got, want in zip((out, *grads), (ref, *ref_grads)):
            err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
            if not torch.isfinite(err) or err > tol:
                failures += 1
                print(f"MISMATCH {dtype} bias={bias} residual={residual} {order} "
                      f"widths={widths} relu={relu} rows={rows}: {err.item():.3g}")
        cases += 1
    torch.cuda.synchronize()
    print(f"cuda_smoke: {cases} cases, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
