"""gradcheck and gradgradcheck (float64) of every form through the public functional API, and
torch.library.opcheck of both ops on the same samples."""

import pytest
import torch

import fusedskip
from conftest import ids, sample_grid

SAMPLES = sample_grid()


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_gradcheck(sample):
    assert torch.autograd.gradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors())


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_gradgradcheck(sample):
    assert torch.autograd.gradgradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors())


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_opcheck_forward(sample):
    torch.library.opcheck(torch.ops.fusedskip.fused_linear.default, sample.op_args())


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_opcheck_backward(sample):
    inputs = [x.detach() for x in sample.inputs]
    weight = sample.weight.detach()
    out, mask = torch.ops.fusedskip.fused_linear(inputs, weight, None, None, sample.relu, False)
    grad_output = torch.randn_like(out)
    for output_mask in ([True] * (len(inputs) + 3), [False] * (len(inputs) + 3)):
        torch.library.opcheck(torch.ops.fusedskip.fused_linear_backward.default,
                              (grad_output, inputs, weight, mask, sample.relu, output_mask))


def test_gradient_only_where_asked():
    """Frozen weight / inputs that need no gradient get none, and the rest are still right."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 3, dtype=torch.float64)
    y = fusedskip.linear_relu_residual(x, w, b, r, order="add_relu")
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
    ref = fusedskip.reference.linear_relu_residual(x2, w, b2, r, order="add_relu")
    rx, rb = torch.autograd.grad(ref.sum(), (x2, b2))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    assert w.grad is None and r.grad is None
