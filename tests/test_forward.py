"""The fused op's CPU kernel against the reference: every form and dtype, the ReLU mask, NaN/Inf,
empty and odd shapes, determinism."""

import itertools

import pytest
import torch

import fusedskip
from conftest import (DEVICE_BACKENDS, assert_close_rel, check_against_reference, make_sample,
                      sample_grid, unpack_mask)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grads_match_reference(dtype):
    for sample in sample_grid(dtype=dtype, small=True):
        check_against_reference(sample, dtype)


# 5 rows by 4 take the CPU's direct loops (the bias in the row-by-row pass); 300 by 128 an ATen
# GEMM (the bias inside it), whose pass runs over chunks of back-to-back rows, several at the
# wider widths. Small integers: every path computes the pre-activation exactly, zeros included.
@pytest.mark.parametrize("rows, depth", [(5, 4), (300, 128)])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 15, 16, 17, 24, 32, 33, 130])
@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_mask_packs_preactivation_sign(rows, depth, cols, order, device, backend):
    def ints(*shape):
        return torch.randint(-3, 4, shape).float().to(device)

    x, w, b, r = ints(rows, depth), ints(cols, depth), ints(cols), ints(rows, cols)
    with fusedskip.use_backend(backend):
        out, mask = torch.ops.fusedskip.fused_linear([x], w, b, r, True, order == "add_relu")
    assert mask.dtype == torch.uint8 and mask.shape == (rows, (cols + 7) // 8)
    preact = x.double() @ w.double().T + b.double() + (r.double() if order == "add_relu" else 0)
    assert torch.equal(unpack_mask(mask, cols), ~(preact <= 0))
    # padding bits of the last byte are zero
    if cols % 8:
        assert int((mask[:, -1] >> (cols % 8)).max()) == 0


def test_no_mask_without_relu():
    out, mask = torch.ops.fusedskip.fused_linear([torch.randn(3, 4)], torch.randn(5, 4), None,
                                                 None, False, False)
    assert mask.numel() == 0 and out.shape == (3, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
def test_nan_and_inf_propagate_like_reference(dtype, order):
    x = torch.randn(6, 5, dtype=dtype)
    w = torch.randn(8, 5, dtype=dtype)
    b = torch.randn(8, dtype=dtype)
    r = torch.randn(6, 8, dtype=dtype)
    x[0, 1] = float("nan")          # a NaN row
    w[2, 3] = float("inf")          # an Inf column (±Inf, and NaN where inputs cancel)
    b[5] = float("-inf")            # a column ReLU clamps to 0 (or NaN with +Inf residual)
    r[3, 5] = float("inf")
    r[4, 6] = float("nan")
    tensors = [t.requires_grad_() for t in (x, w, b, r)]
    out = fusedskip.linear_relu_residual(*tensors, order=order)
    ref = fusedskip.reference.linear_relu_residual(*tensors, order=order)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[0]).all(), "relu(NaN) must stay NaN"
    grad = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        torch.testing.assert_close(g, rg, equal_nan=True)


def test_zero_threshold_and_denormals_match_reference_mask():
    tiny = torch.finfo(torch.float32).tiny / 4  # a denormal
    x = torch.eye(6)
    w = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0, -1.0]).diag()
    out = fusedskip.linear_relu_residual(x.requires_grad_(), w)
    ref = torch.relu(x @ w.T)
    assert torch.equal(out, ref)
    g, = torch.autograd.grad(out.sum(), x)
    rg, = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g, rg)


@pytest.mark.parametrize("leading", [(), (0,), (3, 0, 2), (1,), (2, 3, 4)])
def test_leading_dims_and_empty(leading):
    sample = make_sample([3, 4], 5, leading, residual=None, relu=True, dtype=torch.float32)
    out = sample.call(fusedskip, *sample.tensors())
    assert out.shape == (*leading, 5)
    torch.testing.assert_close(out, sample.call(fusedskip.reference, *sample.tensors()))
    grads = torch.autograd.grad(out.sum(), sample.tensors())
    for g, t in zip(grads, sample.tensors()):
        assert g.shape == t.shape
    check_against_reference(sample, torch.float32)  # values, on poisoned memory


@pytest.mark.parametrize("count", range(1, 9))
def test_concat_of_one_to_eight_odd_widths(count):
    widths = [1, 3, 7, 13, 2, 5, 11, 9][:count]
    for relu, dtype in itertools.product((False, True), DTYPES):
        check_against_reference(make_sample(widths, 17, (6,), relu=relu, dtype=dtype), dtype)


def test_an_empty_batch_never_reads_the_weight():
    """No rows (an expert given no tokens): the output is empty at once, whatever the weight's
    size (the CPU loops had copied the whole weight first: 10^10 elements here, a bad_alloc)."""
    weight = torch.zeros(1, 1).expand(10**5, 10**5)
    for out in (fusedskip.linear_relu_residual(torch.randn(0, 10**5), weight),
                fusedskip.linear_concat([torch.randn(2, 0, 1), torch.randn(2, 0, 10**5 - 1)],
                                        weight, activation="relu")):
        assert out.shape[-2:] == (0, 10**5) and out.dtype == torch.float32


def test_zero_width_inputs_and_zero_out_features():
    x1, x2 = torch.randn(4, 0), torch.randn(4, 3)
    w = torch.randn(5, 3)
    torch.testing.assert_close(fusedskip.linear_concat([x1, x2], w), x2 @ w.T)
    out = fusedskip.linear_relu_residual(torch.randn(4, 3), torch.randn(0, 3))
    assert out.shape == (4, 0)


def test_expanded_grad_output():
    """grad_output with zero strides (the backward of .sum() expands a scalar)."""
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    out = fusedskip.linear_relu_residual(x, w, b)
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    ref = fusedskip.reference.linear_relu_residual(x, w, b)
    for g, rg in zip(grads, torch.autograd.grad(ref.sum(), (x, w, b))):
        torch.testing.assert_close(g, rg)


def test_rows_are_independent_of_batch():
    x, w, b = torch.randn(300, 20), torch.randn(30, 20), torch.randn(30)
    full = fusedskip.linear_relu_residual(x, w, b)
    for i in (0, 129, 299):
        alone = fusedskip.linear_relu_residual(x[i:i + 1], w, b)
        assert_close_rel(alone[0], full[i], torch.float32)


def test_deterministic_bits():
    """Same inputs, same bits: forward and every gradient (the bias sum has a fixed order)."""
    torch.manual_seed(0)
    tensors = [torch.randn(1000, 64, requires_grad=True), torch.randn(48, 64, requires_grad=True),
               torch.randn(48, requires_grad=True), torch.randn(1000, 48, requires_grad=True)]
    grad = torch.randn(1000, 48)
    runs = []
    for _ in range(2):
        out = fusedskip.linear_relu_residual(*tensors, order="add_relu")
        runs.append([out, *torch.autograd.grad(out, tensors, grad)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bias_grad_across_many_row_blocks():
    """Rows spanning many fixed-size blocks of the bias reduction, odd remainder included."""
    x = torch.randn(128 * 5 + 37, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 3, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    for relu in (True, False):
        fn = fusedskip.linear_relu_residual if relu else fusedskip.linear_concat
        args = (x, w, b) if relu else ([x], w, b)
        out = fn(*args)
        grad = torch.randn_like(out)
        gb, = torch.autograd.grad(out, b, grad)
        ref = fusedskip.reference.linear_relu_residual(x, w, b) if relu else x @ w.T + b
        rb, = torch.autograd.grad(ref, b, grad)
        torch.testing.assert_close(gb, rb)
