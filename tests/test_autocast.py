"""torch.autocast: the fused op casts like nn.Linear does (to the autocast dtype; float64 left
alone) and matches the reference within the dtype's tolerance; gradients reach float32
parameters. A residual wider than the autocast dtype is added as eager adds it, in its own dtype."""

import re

import pytest
import torch

import fusedskip
from conftest import CUDA_MARKS, assert_close_rel, assert_mask_matches_sign, unpack_mask

DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def autocast_dtypes(device):
    return [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["relu_add", "add_relu", "concat", "concat_relu"])
def test_autocast_matches_reference(device, form):
    """Output and every gradient (input, weight, bias, and the residual, already in the autocast
    dtype as an autocast layer's output is) against float64 from the values autocast hands the
    op, the ReLU taken from the op's own mask (in half precision a pre-activation within rounding
    of zero may take either side), which must be the float64 sign elsewhere."""
    relu = form != "concat"
    for dtype in autocast_dtypes(device):
        torch.manual_seed(0)
        x = torch.randn(33, 24, device=device, requires_grad=True)
        w = torch.randn(20, 24, device=device, requires_grad=True)
        b = torch.randn(20, device=device, requires_grad=True)
        r = torch.randn(33, 20, device=device).to(dtype).requires_grad_()
        residual = r if form in ("relu_add", "add_relu") else None
        inputs = [x] if residual is not None else [x[:, :7], x[:, 7:]]
        with torch.autocast(device, dtype=dtype):
            if residual is not None:
                out = fusedskip.linear_relu_residual(x, w, b, r, order=form)
            else:
                out = fusedskip.linear_concat(inputs, w, b, activation="relu" if relu else None)
        assert out.dtype == dtype
        x64, w64, b64, r64 = (t.detach().to(dtype).double() for t in (x, w, b, r))
        pre = x64 @ w64.T + b64
        if form == "relu_add":
            ref = torch.relu(pre) + r64
        elif form == "add_relu":
            ref = torch.relu(pre + r64)
        else:
            ref = torch.relu(pre) if relu else pre
        assert_close_rel(out, ref, dtype, form)

        grad = torch.randn(out.shape, device=device)
        leaves = [x, w, b] + ([r] if residual is not None else [])
        got = torch.autograd.grad((out.float() * grad).sum(), leaves)
        assert [g.dtype for g in got] == [t.dtype for t in leaves]
        grad64 = grad.double()
        grad_pre = grad64
        if relu:
            with torch.no_grad():  # the same casts autocast makes, so the same mask
                _, mask = torch.ops.fusedskip.fused_linear(
                    [t.to(dtype) for t in inputs], w.to(dtype), b.to(dtype),
                    None if residual is None else r, True, form == "add_relu")
            active = unpack_mask(mask, out.shape[-1]).reshape(out.shape)
            assert_mask_matches_sign(active, pre + (r64 if form == "add_relu" else 0), dtype,
                                     f"{form} {dtype}")
            grad_pre = grad64 * active
        want = [grad_pre @ w64, grad_pre.T @ x64, grad_pre.sum(0)]
        if residual is not None:
            want.append(grad_pre if form == "add_relu" else grad64)
        for name, g, e in zip(("input", "weight", "bias", "residual"), got, want):
            assert_close_rel(g, e, dtype, f"{form} {dtype} {name} gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_only_under_autocast(device):
    x = torch.randn(4, 6, device=device, dtype=torch.bfloat16)  # e.g. from an autocast layer
    w = torch.randn(5, 6, device=device)
    with pytest.raises(TypeError, match="input has dtype torch.bfloat16 but weight has dtype"):
        fusedskip.linear_relu_residual(x, w)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert fusedskip.linear_relu_residual(x, w).dtype == torch.bfloat16


def test_float64_is_left_alone():
    x, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusedskip.linear_relu_residual(x, w).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_float64_next_to_operands_autocast_casts_is_named_as_passed(device):
    """Autocast casts float32 operands and leaves float64 ones: the error names the dtypes passed
    (not the one autocast made), through the op and through the reference functions (the
    modules' path on a CPU)."""
    f32 = torch.randn(4, 2, device=device)
    f64 = torch.randn(4, 3, device=device, dtype=torch.float64)
    w64 = torch.randn(6, 5, device=device, dtype=torch.float64)
    calls = {
        r"inputs\[0\] \(torch.float32\) .* but inputs\[1\] is torch.float64":
            lambda api: api.linear_concat([f32, f64], w64),
        r"input \(torch.float32\) .* but weight is torch.float64":
            lambda api: api.linear_relu_residual(f32, w64[:, :2]),
        r"bias \(torch.float32\) .* but input is torch.float64":
            lambda api: api.linear_relu_residual(f64, w64[:, :3], torch.randn(6, device=device)),
    }
    for pattern, call in calls.items():
        for api in (fusedskip, fusedskip.reference):
            with torch.autocast(device, dtype=torch.bfloat16):
                with pytest.raises(TypeError, match=pattern + ", which autocast leaves alone"):
                    call(api)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_under_autocast(device):
    """The modules (whose CPU path is the reference one) cast as the op does: a layer fed by an
    autocast nn.Linear works, and its result has the autocast dtype on every path."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 6).to(device)
    add = fusedskip.LinearReLUResidual(6, 6).to(device)
    cat = fusedskip.ConcatLinear([6, 6], 5, activation="relu").to(device)
    x = torch.randn(4, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = linear(x)
        assert h.dtype == torch.bfloat16
        for module in (add, fusedskip.reference.LinearReLUResidual(6, 6).to(device)):
            for residual in (None, h, x):
                out = module(h, residual)
                # a float32 residual (x) is added in float32, as eager would
                assert out.dtype == (torch.float32 if residual is x else torch.bfloat16)
                op = fusedskip.linear_relu_residual(h, module.weight, module.bias, residual)
                assert out.dtype == op.dtype
                # the reference rounds to bfloat16 after each op, the fused op once
                assert_close_rel(out, op, torch.bfloat16)
        out = cat(h, x)
        assert out.dtype == torch.bfloat16
        assert_close_rel(out, fusedskip.linear_concat([h, x], cat.weight, cat.bias,
                                                      activation="relu"), torch.bfloat16)
    out.float().sum().backward()
    assert cat.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
def test_a_wider_residual_is_added_as_eager_adds_it(device, order):
    """The residual stream of an autocast model stays float32: `relu(linear(x)) + r` adds it in
    float32 (bfloat16 + float16 promotes to float32 too), and the op must give that dtype and
    those values, its mask and every gradient, the residual's in its own dtype. A float64 layer
    is left alone and a narrower residual widened to it."""
    torch.manual_seed(0)
    x = torch.randn(33, 24, device=device)
    w = torch.randn(20, 24, device=device, requires_grad=True)
    b = torch.randn(20, device=device, requires_grad=True)
    for dtype in autocast_dtypes(device):
        for r_dtype in (torch.float32, torch.float64,
                        torch.float16 if dtype == torch.bfloat16 else torch.bfloat16):
            r = (torch.randn(33, 20, device=device) * 10).to(r_dtype).requires_grad_()
            grads = []
            with torch.autocast(device, dtype=dtype):
                out = fusedskip.linear_relu_residual(x, w, b, r, order=order)
                h = torch.nn.functional.linear(x, w, b)
                ref = torch.relu(h) + r if order == "relu_add" else torch.relu(h + r)
                _, mask = torch.ops.fusedskip.fused_linear([x], w, b, r, True,
                                                           order == "add_relu")
            assert out.dtype == ref.dtype == torch.promote_types(dtype, r_dtype), (dtype, r_dtype)
            # bfloat16 linear results, then the same additions in the same dtype: equal up to
            # the GEMMs' summation order in float32 (the op's) or `dtype` (eager's)
            assert_close_rel(out, ref.detach().double(), dtype, f"{dtype} + {r_dtype}")
            preact = h.detach().to(ref.dtype) + (r.detach() if order == "add_relu" else 0)
            active = unpack_mask(mask, 20)
            clear = preact.abs() > 0.1  # away from rounding's reach of zero
            assert torch.equal(active[clear], (preact > 0)[clear])
            for result in (out, ref):
                grads.append(torch.autograd.grad(result.double().sum(), (w, b, r)))
            for got, want, name in zip(*grads, ("weight", "bias", "residual")):
                assert got.dtype == want.dtype, name
                assert_close_rel(got, want.double(), dtype, name)
        with torch.autocast(device, dtype=dtype):
            with pytest.raises(ValueError, match=r"residual must have the output's shape"):
                fusedskip.linear_relu_residual(x, w, b, torch.randn(20, device=device),
                                               order=order)
    x64, w64 = x.double(), w.detach().double()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fusedskip.linear_relu_residual(x64, w64, None, r.detach().to(torch.bfloat16))
    assert out.dtype == torch.float64


def test_a_wider_residual_is_checked_as_the_op_checks_it():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    layer = fusedskip.LinearReLUResidual(6, 5)
    for residual, error, text in (
            (torch.randn(4, 5).to_sparse(), TypeError, "residual must be a dense (strided)"),
            (torch.randn(5), ValueError, "residual must have the output's shape [4, 5]")):
        for call in (lambda r: fusedskip.linear_relu_residual(x, w, None, r),
                     lambda r: layer(x, r)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with pytest.raises(error, match=re.escape("fusedskip: " + text)):
                    call(residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
                                   torch.uint8, torch.int64, torch.bool])
def test_a_residual_dtype_the_op_refuses_is_named_under_autocast(device, dtype):
    # Autocast weighs the residual's dtype against the linear's before the op sees it; a dtype
    # torch cannot promote (float8) must still reach the op's check, which names the argument.
    x, w = torch.randn(4, 6, device=device), torch.randn(5, 6, device=device)
    residual = torch.randn(4, 5, device=device).to(dtype)
    layer = fusedskip.LinearReLUResidual(6, 5, device=device)
    expected = (f"fusedskip: residual has dtype {dtype}; expected torch.float16, torch.bfloat16, "
                "torch.float32 or torch.float64")
    for order in ("relu_add", "add_relu"):
        layer.order = order
        for call in (lambda: fusedskip.linear_relu_residual(x, w, None, residual, order=order),
                     lambda: layer(x, residual)):
            with pytest.raises(TypeError) as plain:
                call()
            with torch.autocast(device, dtype=torch.bfloat16):
                with pytest.raises(TypeError) as autocast:
                    call()
            assert str(plain.value) == expected
            assert str(autocast.value) == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_vmap_under_autocast_casts_as_without_vmap(device, residual_dtype):
    # vmap's dispatch key comes before autocast's: the batched op must still cast (and add a
    # wider residual after) as the op does unbatched, so each slice is the unbatched call's dtype
    # and values, up to bfloat16's rounding (the batched op computes through ATen's composite,
    # whose float32 GEMM sums in another order than the op's CPU loops).
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 10, generator=generator).to(device)
    w = torch.randn(5, 10, generator=generator).to(device)
    b = torch.randn(5, generator=generator).to(device)
    r = torch.randn(4, 6, 5, generator=generator).to(device, residual_dtype)
    for order in ("relu_add", "add_relu"):
        def layer(x, r):
            return fusedskip.linear_relu_residual(x, w, b, r, order=order)

        def concat(x):
            return fusedskip.linear_concat([x[:, :3], x[:, 3:]], w, b, activation="relu")

        with torch.autocast(device, dtype=torch.bfloat16):
            for batched, looped in ((torch.func.vmap(layer)(x, r),
                                     [layer(x[i], r[i]) for i in range(4)]),
                                    (torch.func.vmap(concat)(x), [concat(x[i]) for i in range(4)])):
                assert batched.dtype == looped[0].dtype
                assert_close_rel(batched, torch.stack(looped).double(), torch.bfloat16, order)
