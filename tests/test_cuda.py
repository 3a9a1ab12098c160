"""The CUDA kernels against the float64 reference, through both CUDA backends (the native fused
kernel and cuBLAS + the element-wise pass). Skipped cleanly without a GPU."""

import itertools
import os
import subprocess
import sys
import types

import pytest
import torch

import fusedskip
from conftest import (CUDA, CUDA_MARKS, MASKED_GRADIENT_CASES, Sample, assert_close_rel,
                      check_against_reference, check_native_backward_stores_masked_gradient,
                      checkout_env, ids, make_sample, poison_allocator, rel_err, sample_grid,
                      unpack_mask)

pytestmark = CUDA_MARKS

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 7, 63, 65, 127, 129, 1000)


@pytest.fixture(params=["native", "gemm_epilogue"])
def backend(request):
    """Runs a test once per CUDA backend (auto would pick by size and leave one path untested)."""
    with fusedskip.use_backend(request.param):
        yield request.param


# The `cutlass` backend's kernels run only on an sm_90 GPU and only where the build found
# CUTLASS; each test of them checks through their launch counters that they did run (or, for the
# shapes they leave to cuBLAS, that they did not), so a silent fall-back cannot pass for them.
def cutlass_gpu() -> bool:
    return CUDA and fusedskip.cutlass_built() and torch.cuda.get_device_capability() == (9, 0)


needs_cutlass_gpu = pytest.mark.skipif(not cutlass_gpu(),
                                       reason="needs the CUTLASS build and an sm_90 GPU")


def cutlass_launches() -> int:
    return fusedskip._ops._C._fused_gemm_launches()


def concat_launches() -> int:
    return fusedskip._ops._C._concat_gemm_launches()


def grouped_launches() -> int:
    return fusedskip._ops._C._grouped_gemm_launches()


GRID = sample_grid(device="cuda") if CUDA else []


@pytest.mark.parametrize("case", MASKED_GRADIENT_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_native_backward_stores_the_masked_gradient_bit_for_bit(case, dtype):
    """add_relu's residual gradient from the native backward's loads: conftest's check, as
    tests/test_backends.py runs it on the CPU's emulation of this kernel."""
    with fusedskip.use_backend("native"):
        check_native_backward_stores_masked_gradient(case, dtype, "cuda")


@pytest.mark.parametrize("sample", GRID, ids=ids(GRID))
def test_gradcheck_float64(sample, backend):
    """Reverse and forward mode (a call with tangents computes through the ATen composite), and
    double backward, as tests/test_gradcheck.py checks them on the CPU."""
    fn = lambda *t: sample.call(fusedskip, *t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, sample.tensors(), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, sample.tensors(), check_fwd_over_rev=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_every_form_in_low_precision(dtype, backend):
    for sample in sample_grid(dtype=dtype, device="cuda"):
        check_against_reference(sample, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
# 64: a tile edge, and whole mask bytes on 16-byte boundaries (the element-wise passes' wide form).
@pytest.mark.parametrize("rows,cols", list(itertools.product(SIZES, (1, 7, 64, 65, 129))))
def test_tile_boundaries(rows, cols, dtype, backend):
    for residual in (None, "relu_add", "add_relu"):
        sample = make_sample([33], cols, (rows,), residual=residual, dtype=dtype, device="cuda")
        check_against_reference(sample, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_large_and_prime_sizes(dtype, backend):
    for rows, k, cols in ((4097, 1000, 129), (1000, 4097, 63), (129, 127, 4097)):
        check_against_reference(make_sample([k], cols, (rows,), residual="add_relu", dtype=dtype,
                                            device="cuda"), dtype)


@pytest.mark.parametrize("count", range(1, 9))
def test_concat_one_to_eight_inputs(count, backend):
    widths = [1, 3, 7, 13, 2, 5, 11, 9][:count]
    for dtype, relu, bias in itertools.product(LOW_PRECISION, (False, True), (True, False)):
        check_against_reference(make_sample(widths, 65, (2, 63), bias=bias, relu=relu,
                                            dtype=dtype, device="cuda"), dtype)


# Blocks >= 64 wide on 16-byte boundaries: cuBLAS's backward runs one GEMM per block for the
# weight gradient, straight into its column blocks ("offset" falls back to one GEMM over the
# concatenation), and one over the whole width for the inputs' gradients.
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_concat_aligned_blocks(layout, backend):
    for dtype in LOW_PRECISION:
        check_against_reference(
            make_sample([64, 136, 72], 40, (3, 67), layout=layout, dtype=dtype, device="cuda"),
            dtype)
    sample = make_sample([64, 66], 9, (5,), layout=layout, device="cuda")
    assert torch.autograd.gradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors())


@pytest.mark.parametrize("wanted", ((True, True, True), (True, False, False), (False, True, True)),
                         ids=("xxx", "x--", "-xx"))
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_concat_input_gradients_are_column_blocks_of_one(wanted, layout, backend):
    """Each input's gradient is its column block of the cat's (a view, no copies), right
    whichever inputs want one; the op itself zeroes the columns of inputs not asked for."""
    widths = [64, 136, 72]
    sample = make_sample(widths, 40, (3, 67), layout=layout, dtype=torch.bfloat16,
                         device="cuda", requires_grad=False)
    xs = [x.requires_grad_(want) for x, want in zip(sample.inputs, wanted)]
    chosen = [x for x in xs if x.requires_grad]
    grad = torch.randn(3, 67, 40, device="cuda", dtype=torch.bfloat16)
    poison_allocator()
    got = torch.autograd.grad(fusedskip.linear_concat(xs, sample.weight, activation="relu"),
                              chosen, grad)
    ref_xs = [x.detach().double().requires_grad_(x.requires_grad) for x in xs]
    ref = fusedskip.reference.linear_concat(ref_xs, sample.weight.double(), activation="relu")
    expected = torch.autograd.grad(ref, [x for x in ref_xs if x.requires_grad], grad.double())
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close_rel(g, e, torch.bfloat16, f"gradient {i}")
        assert g.stride() == (67 * sum(widths), sum(widths), 1), g.stride()
    if len(got) > 1:
        assert len({g.untyped_storage().data_ptr() for g in got}) == 1

    inputs = [x.detach() for x in xs]
    _, mask = torch.ops.fusedskip.fused_linear(inputs, sample.weight, None, None, True, False)
    poison_allocator()
    grad_input = torch.ops.fusedskip.fused_linear_backward(
        grad, inputs, sample.weight, mask, True, [*wanted, False, False, False])[0]
    grad_preact = torch.where(unpack_mask(mask, 40).view(3, 67, 40), grad.double(), 0)
    refs = (grad_preact @ sample.weight.double()).split(widths, -1)
    for i, (want, block, ref) in enumerate(zip(wanted, grad_input.split(widths, -1), refs)):
        if want:
            assert_close_rel(block, ref, torch.bfloat16, f"input {i}")
        else:
            assert torch.equal(block, torch.zeros_like(block)), f"input {i}"


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous(layout, backend):
    for dtype in LOW_PRECISION:
        check_against_reference(make_sample([5, 8], 33, (3, 7), layout=layout, dtype=dtype,
                                            device="cuda"), dtype)
        check_against_reference(make_sample([9], 17, (40,), residual="relu_add", layout=layout,
                                            dtype=dtype, device="cuda"), dtype)


def test_compile_fullgraph_on_cuda(backend):
    """Both ops in one compiled graph, forward and backward, against the reference in float64."""
    weight = torch.randn(32, 32, device="cuda") / 6
    bias = torch.randn(32, device="cuda")
    x = torch.randn(16, 32, device="cuda")

    def fn(api, x, weight, bias):
        h = api.linear_relu_residual(x, weight, bias, x)
        return api.linear_concat([h, x], torch.cat([weight, weight], 1), activation="relu")

    compiled = torch.compile(lambda *t: fn(fusedskip, *t), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = compiled(*leaves)
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    ref = fn(fusedskip.reference, *ref_leaves)
    assert_close_rel(out, ref, torch.float32, "output")
    grad = torch.randn_like(out)
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, grad),
                                   torch.autograd.grad(ref, ref_leaves, grad.double()))):
        assert_close_rel(g, e, torch.float32, f"grad {i}")


def test_modules_call_the_fused_op_on_cuda(monkeypatch):
    """On CUDA tensors the modules take the fused op, not the reference path (whose answers the
    value checks would pass as well)."""
    from fusedskip import functional, reference

    calls = []
    for api in (functional, reference):
        for name in ("linear_relu_residual", "linear_concat"):
            def spy(*args, real=getattr(api, name), tag=f"{api.__name__}.{name}", **kwargs):
                calls.append(tag)
                return real(*args, **kwargs)
            monkeypatch.setattr(api, name, spy)
    add = fusedskip.LinearReLUResidual(4, 4, device="cuda")
    cat = fusedskip.ConcatLinear([2, 2], 3, device="cuda")
    x = torch.randn(3, 4, device="cuda")
    add(x, x)
    cat(x[:, :2], x[:, 2:])
    assert calls == ["fusedskip.functional.linear_relu_residual",
                     "fusedskip.functional.linear_concat"]


def test_modules_on_cuda_match_reference_modules(backend):
    """The modules on CUDA against the reference modules in float64: outputs in every low
    precision; in float32 the gradients of inputs and parameters too (in half precision a
    pre-activation near zero may take the other side of the ReLU, which check_against_reference
    allows for and this end-to-end check cannot)."""
    for dtype in LOW_PRECISION:
        fused = fusedskip.ConcatLinear([15, 10], 20, activation="relu", device="cuda", dtype=dtype)
        ref = fusedskip.reference.ConcatLinear([15, 10], 20, activation="relu", device="cuda",
                                               dtype=torch.float64)
        ref.load_state_dict(fused.state_dict())
        block = fusedskip.LinearReLUResidual(20, 20, order="add_relu", device="cuda", dtype=dtype)
        ref_block = fusedskip.reference.LinearReLUResidual(20, 20, order="add_relu",
                                                           device="cuda", dtype=torch.float64)
        ref_block.load_state_dict(block.state_dict())
        x1 = torch.randn(64, 15, device="cuda", dtype=dtype, requires_grad=True)
        x2 = torch.randn(64, 10, device="cuda", dtype=dtype, requires_grad=True)
        ref_x = [x.detach().double().requires_grad_() for x in (x1, x2)]
        h = fused(x1, x2)
        out = block(h, h)
        ref_h = ref(*ref_x)
        ref_out = ref_block(ref_h, ref_h)
        assert_close_rel(h, ref_h, dtype, "ConcatLinear")
        assert_close_rel(out, ref_out, dtype, "LinearReLUResidual")
        if dtype != torch.float32:
            continue
        grad = torch.randn_like(out)
        leaves = [x1, x2, *fused.parameters(), *block.parameters()]
        ref_leaves = [*ref_x, *ref.parameters(), *ref_block.parameters()]
        for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, grad),
                                       torch.autograd.grad(ref_out, ref_leaves, grad.double()))):
            assert_close_rel(g, e, dtype, f"grad {i}")


@pytest.mark.parametrize("rows", [5000, 131072])
def test_deterministic_bias_gradient(backend, rows):
    """The same bits on every run, and the sum of the gradient where the ReLU let it through.
    131072 rows make 8192 row blocks of partial sums on the cuBLAS path, a column sum long
    enough for ATen to spread over thread blocks."""
    x = torch.randn(rows, 64, device="cuda")
    w = torch.randn(96, 64, device="cuda")
    b = torch.randn(96, device="cuda", requires_grad=True)
    grad = torch.randn(rows, 96, device="cuda")
    runs = [torch.autograd.grad(fusedskip.linear_relu_residual(x, w, b), b, grad)[0]
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    passed = (fusedskip.linear_relu_residual(x, w, b) > 0).double()  # the op's own mask
    want, scale = (grad.double() * passed).sum(0), (grad.double().abs() * passed).sum(0)
    assert ((runs[0].double() - want).abs() <= 1e-5 * scale).all()


def test_split_k_weight_gradient_is_deterministic(backend):
    """Many rows, few outputs: the native backward splits the weight gradient's K over slices
    and sums them in a fixed order; the same bits on every run, and right."""
    for dtype in LOW_PRECISION:
        sample = make_sample([20, 45], 30, (65536,), relu=True, dtype=dtype, device="cuda")
        check_against_reference(sample, dtype)
        runs = [torch.autograd.grad(sample.call(fusedskip, *sample.tensors()).sum(),
                                    sample.weight)[0] for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_tf32_when_allowed(backend):
    """float32 with TF32 allowed: tensor cores (native) / cuBLAS TF32, output and gradients within
    TF32's bound. The native kernel's output must be off by more than full float32's (else it
    never used TF32); cuBLAS may choose a full float32 kernel, its own business."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for widths, rows in (([300], 1000), ([33, 65], 129)):
            sample = make_sample(widths, 129, (rows,), relu=True, dtype=torch.float32,
                                 device="cuda")
            check_against_reference(sample, torch.float32, tol=1e-3)
        x = torch.randn(1000, 300, device="cuda")
        w = torch.randn(129, 300, device="cuda")
        exact = x.double() @ w.double().T
        err = rel_err(fusedskip.linear_concat([x], w), exact)
        assert err <= 1e-3, err
        if backend == "native":
            assert err > 1e-5, err  # operands rounded to TF32's 10-bit mantissa
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_auto_backend_small_and_large_layers():
    """Under auto (native below csrc/backend.cpp's thresholds; above, cuBLAS + the pass or, on an
    sm_90 GPU with the CUTLASS build, the CUTLASS GEMM) both sizes are right."""
    for rows, k, n in ((64, 10, 10), (8192, 1024, 1024)):
        sample = make_sample([k], n, (rows,), residual="relu_add", dtype=torch.bfloat16,
                             device="cuda")
        check_against_reference(sample, torch.bfloat16)


def test_mixed_devices_rejected():
    with pytest.raises(RuntimeError, match="input is on device cpu but weight is on cuda"):
        fusedskip.linear_relu_residual(torch.randn(2, 3), torch.randn(4, 3, device="cuda"))
    # The other way round (a model not moved to the GPU): the call lands in the CUDA kernel, whose
    # device guard must not stand before the checks.
    layer = fusedskip.LinearReLUResidual(3, 3)
    with pytest.raises(RuntimeError, match="input is on device cuda:0 but weight is on cpu"):
        layer(torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda"))
    with pytest.raises(RuntimeError,
                       match="inputs\\[1\\] is on device cuda:0 but weight is on cpu"):
        fusedskip.linear_concat([torch.randn(2, 1), torch.randn(2, 2, device="cuda")],
                                torch.randn(4, 3))


# The `cutlass` backend: the forward's epilogue inside one sm_90a GEMM
# (csrc/cuda/fused_gemm_sm90.cu).
@needs_cutlass_gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("residual", (None, "relu_add", "add_relu"))
def test_cutlass_every_relu_form(dtype, residual):
    # Edges of its 128x256x64 tiles in every dimension (and of 128-column halves); bias and
    # none; a concat; leading batch dims.
    cases = (([8], 128, (1,), True), ([264], 384, (1000,), True), ([1024], 256, (4097,), False),
             ([64], 640, (3, 43), True), ([64, 200], 256, (300,), True))
    with fusedskip.use_backend("cutlass"):
        for widths, cols, leading, bias in cases:
            if residual is not None and len(widths) > 1:
                continue
            # A concat runs the concat kernel (test_cutlass_concat_layer).
            launches = cutlass_launches if len(widths) == 1 else concat_launches
            before = launches()
            check_against_reference(make_sample(widths, cols, leading, bias=bias,
                                                residual=residual, dtype=dtype, device="cuda"),
                                    dtype)
            assert launches() > before, f"{widths} -> {cols}: the CUTLASS GEMM did not run"


@needs_cutlass_gpu
def test_cutlass_leaves_other_shapes_to_cublas():
    """Shapes TMA or the mask rows cannot take run the gemm_epilogue path, and are right."""
    with fusedskip.use_backend("cutlass"):
        for sample, dtype in (
                (make_sample([64], 100, (50,), dtype=torch.bfloat16, device="cuda"),  # cols % 128
                 torch.bfloat16),
                (make_sample([63], 128, (50,), dtype=torch.bfloat16, device="cuda"),  # K % 8
                 torch.bfloat16),
                (make_sample([64], 128, (50,), layout="offset", residual="relu_add",
                             dtype=torch.float16, device="cuda"), torch.float16),  # off 16 bytes
                (make_sample([64], 128, (50,), dtype=torch.float32, device="cuda"),
                 torch.float32),
                (make_sample([64], 128, (50,), relu=False, dtype=torch.bfloat16,
                             device="cuda"), torch.bfloat16)):  # no ReLU: nothing to fuse
            before = cutlass_launches()
            check_against_reference(sample, dtype)
            assert cutlass_launches() == before, sample.name
        # An expanded input: rows 0 bytes apart, which a TMA descriptor cannot describe. And one
        # row whose stride (free for a single row) is 0 or too large for a descriptor (2^40
        # bytes and up): handed on as it is, it would stop the process in CUTLASS's host check.
        w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
        row = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
        for x in (row.expand(50, 64), row.as_strided((1, 64), (0, 1)),
                  row.as_strided((1, 64), (2 ** 39, 1))):
            before = cutlass_launches()
            out = fusedskip.linear_relu_residual(x, w)
            assert cutlass_launches() == before, x.stride()
            assert_close_rel(out, torch.relu(x.double() @ w.double().T), torch.bfloat16)


@needs_cutlass_gpu
@pytest.mark.parametrize("residual", (None, "relu_add", "add_relu"))
def test_cutlass_mask_and_output_equal_the_cublas_path(residual):
    """Small integers make every sum exact, whatever the order of the additions, and many
    pre-activations exactly 0; a NaN row too. The CUTLASS epilogue must then give the same
    output and the same mask bits as cuBLAS + the element-wise pass: NaN stays NaN with its
    bit set (torch's backward lets gradient through NaN), and no bit where the pre-activation
    is 0 (CUTLASS's own ReLU mask sets one there)."""
    def ints(*shape):
        return torch.randint(-1, 2, shape, device="cuda").to(torch.bfloat16)

    x, w, b = ints(300, 64), ints(384, 64), ints(384)
    r = ints(300, 384) if residual else None
    x[7, 5] = float("nan")
    results = {}
    for backend in ("cutlass", "gemm_epilogue"):
        with fusedskip.use_backend(backend):
            before = cutlass_launches()
            results[backend] = torch.ops.fusedskip.fused_linear(
                [x], w, b, r, True, residual == "add_relu")
            assert (cutlass_launches() > before) == (backend == "cutlass")
    (out, mask), (out_ref, mask_ref) = results["cutlass"], results["gemm_epilogue"]
    assert torch.isnan(out[7]).all() and torch.equal(mask[7], torch.full_like(mask[7], 255))
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mask, mask_ref)


@needs_cutlass_gpu
def test_auto_takes_cutlass_above_the_native_range():
    """`auto` runs the CUTLASS GEMM for a large layer it applies to (faster there than cuBLAS +
    the pass, csrc/backend.cpp) and not for a smaller one (the native kernel's, or cuBLAS's
    between the thresholds) or one it does not apply to; each still right."""
    for widths, cols, rows, residual, relu, expect in (
            ([1024], 1024, 4096, "relu_add", True, True),
            ([512], 512, 8192, "add_relu", True, True),  # 2^31 multiply-adds, 128 tiles
            ([512], 512, 4096, "relu_add", True, False),  # 2^30: cuBLAS + the pass
            ([4096], 1024, 1024, "relu_add", True, False),  # 2^32 but 32 tiles
            ([30], 30, 64, "relu_add", True, False),  # the native kernel
            ([1024], 1000, 4096, "relu_add", True, False),  # cols % 128
            ([512, 512], 1024, 4096, None, True, True),  # a concat: one GEMM over the cat
            ([512, 512], 1024, 4096, None, False, False)):  # no ReLU: nothing to fuse
        sample = make_sample(widths, cols, (rows,), residual=residual, relu=relu,
                             dtype=torch.bfloat16, device="cuda")
        before, concat_before, grouped_before = (cutlass_launches(), concat_launches(),
                                                 grouped_launches())
        with fusedskip.use_backend("auto"):  # whatever FUSEDSKIP_BACKEND says
            check_against_reference(sample, torch.bfloat16)
        assert (cutlass_launches() > before) == expect, sample.name
        # The concat kernels are not auto's (csrc/backend.cpp): not yet timed.
        assert concat_launches() == concat_before, sample.name
        assert grouped_launches() == grouped_before, sample.name


# The `cutlass` backend's concat layers: the forward as one sm_90a GEMM whose K loop runs over the
# inputs (csrc/cuda/concat_gemm_sm90.cu), the backward as two grouped GEMMs
# (csrc/cuda/grouped_gemm_sm90.cu).
@needs_cutlass_gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_cutlass_concat_layer(dtype):
    """Output, mask and every gradient against float64, and the launches of both kernels: inputs
    that end inside a 64-wide K tile (8, 136, 200, 1360: the next input must start on a fresh
    tile and the partial one add nothing), 2 to 8 inputs, with the ReLU and without, bias and
    none, partial 128x256 / 256x128 tiles in every dimension, leading dims. The forward kernel
    takes up to 4 inputs and, with the ReLU, outputs in multiples of 128; the grouped backward
    takes them all."""
    cases = (([64, 200], 256, (300,), True, True),
             ([8, 136, 200], 384, (3, 43), True, False),
             ([8, 136, 264], 72, (3, 43), True, False),
             ([8, 16, 24, 64], 136, (513,), False, True),
             ([8, 16, 24, 64], 128, (513,), True, True),  # four descriptor pairs and the mask
             ([8, 16, 24, 32, 40, 48, 56, 64], 136, (513,), False, True),
             ([1360, 2736], 512, (260,), False, False),
             ([72, 64], 8, (1,), False, True),
             # More output tiles than SMs in every kernel (forward 256, input gradients 528,
             # weight gradient 264): blocks carry their pipeline state, and the grouped kernel's
             # its descriptors, from tile to tile and group to group.
             ([1360, 2736], 2048, (4096,), True, True))
    with fusedskip.use_backend("cutlass"):
        for widths, cols, leading, relu, bias in cases:
            sample = make_sample(widths, cols, leading, relu=relu, bias=bias, dtype=dtype,
                                 device="cuda")
            forward_applies = len(widths) <= 4 and cols % (128 if relu else 8) == 0
            before = concat_launches(), grouped_launches()
            check_against_reference(sample, dtype)
            # The forward runs once for the output and, with the ReLU, once more for the mask
            # check_against_reference reads; the backward once, two grouped launches.
            forwards = (2 if relu else 1) if forward_applies else 0
            assert (concat_launches(), grouped_launches()) == (before[0] + forwards,
                                                               before[1] + 2), sample.name


@needs_cutlass_gpu
def test_cutlass_concat_forward_equals_the_cat():
    """Small integers make every sum exact in any order: the output and mask bits must equal
    those of the single-input kernel over the cat (which the concat kernel replaces), NaN row and
    exact zeros included; without the ReLU, those of cuBLAS over the cat."""
    def ints(*shape):
        return torch.randint(-1, 2, shape, device="cuda").to(torch.bfloat16)

    for widths in ((40, 136), (8, 136, 200), (8, 16, 24, 64)):
        xs = [ints(300, width) for width in widths]
        w, b = ints(384, sum(widths)), ints(384)
        xs[1][7, 5] = float("nan")
        for relu in (True, False):
            with fusedskip.use_backend("cutlass"):
                before = concat_launches()
                out, mask = torch.ops.fusedskip.fused_linear(xs, w, b, None, relu, False)
                assert concat_launches() == before + 1, widths
                out_ref, mask_ref = torch.ops.fusedskip.fused_linear(
                    [torch.cat(xs, 1)], w, b, None, relu, False)
            torch.testing.assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(mask, mask_ref), widths
            assert torch.isnan(out[7]).all()


@needs_cutlass_gpu
def test_cutlass_concat_forward_leaves_other_shapes_to_the_cat():
    """More inputs than its parameters hold, a width off whole 16-byte words, an input off a
    16-byte boundary, outputs not a multiple of 128 with the ReLU, float32, a residual: no launch
    of the concat kernel, and still right."""
    for widths, cols, relu, layout, dtype in (
            ([8] * 5, 128, False, "contiguous", torch.bfloat16),
            ([60, 68], 128, False, "contiguous", torch.bfloat16),
            ([64, 64], 128, True, "offset", torch.float16),
            ([64, 64], 200, True, "contiguous", torch.bfloat16),
            ([64, 64], 128, True, "contiguous", torch.float32)):
        sample = make_sample(widths, cols, (50,), relu=relu, layout=layout, dtype=dtype,
                             device="cuda")
        before = concat_launches()
        with fusedskip.use_backend("cutlass"):
            check_against_reference(sample, dtype)
        assert concat_launches() == before, sample.name
    # A residual, which the op takes with several inputs too (the public API does not): the
    # concat kernel's epilogue has none, so it must not run.
    xs = [torch.randn(50, w, device="cuda", dtype=torch.bfloat16) for w in (64, 64)]
    w = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16) / 12
    r = torch.randn(50, 128, device="cuda", dtype=torch.bfloat16)
    for before_relu in (False, True):
        before = concat_launches()
        with fusedskip.use_backend("cutlass"):
            out, _ = torch.ops.fusedskip.fused_linear(xs, w, None, r, True, before_relu)
        assert concat_launches() == before
        preact = torch.cat(xs, 1).double() @ w.double().T
        ref = (torch.relu(preact + r.double()) if before_relu
               else torch.relu(preact) + r.double())
        assert_close_rel(out, ref, torch.bfloat16, f"residual before ReLU: {before_relu}")


@needs_cutlass_gpu
def test_cutlass_concat_backward_only_the_gradients_asked_for():
    """Gradients not asked for are not computed: two inputs of three and the weight (two
    launches; the second input's columns of the cat's gradient are zero), the inputs alone (one),
    the weight alone (one), and the second input alone (one)."""
    widths = (64, 136, 200)
    x = [torch.randn(300, w, device="cuda", dtype=torch.bfloat16) for w in widths]
    w = torch.randn(256, sum(widths), device="cuda", dtype=torch.bfloat16) / 20
    g = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    ref_inputs = (g.double() @ w.double()).split(widths, 1)
    ref_weight = g.double().T @ torch.cat(x, 1).double()
    no_mask = torch.empty(0, dtype=torch.uint8, device="cuda")
    with fusedskip.use_backend("cutlass"):
        for wanted, want_weight, launches in (((True, False, True), True, 2),
                                              ((True, True, True), False, 1),
                                              ((False, False, False), True, 1),
                                              ((False, True, False), False, 1)):
            poison_allocator()
            before = grouped_launches()
            grad_input, grad_weight, _, _ = torch.ops.fusedskip.fused_linear_backward(
                g, x, w, no_mask, False, [*wanted, want_weight, False, False])
            assert grouped_launches() == before + launches
            if any(wanted):
                for i, (want, got) in enumerate(zip(wanted, grad_input.split(widths, 1))):
                    if want:
                        assert_close_rel(got, ref_inputs[i], torch.bfloat16, f"input {i}")
                    else:
                        assert torch.equal(got, torch.zeros_like(got)), f"input {i}"
            else:
                assert grad_input.numel() == 0
            if want_weight:
                assert_close_rel(grad_weight, ref_weight, torch.bfloat16, "weight")
            else:
                assert grad_weight.numel() == 0

    # Through autograd: with the weight frozen its inputs are not saved, and stand-ins of their
    # shapes (one unfilled row expanded) reach the kernels, which the grouped GEMMs must not
    # refuse; with the
    # inputs frozen, the weight's gradient alone.
    for frozen in ("weight", "inputs"):
        xs = [t.clone().requires_grad_(frozen == "weight") for t in x]
        wt = w.clone().requires_grad_(frozen == "inputs")
        with fusedskip.use_backend("cutlass"):
            out = fusedskip.linear_concat(xs, wt)
            before = grouped_launches()
            grads = torch.autograd.grad(out, xs if frozen == "weight" else [wt], g)
            assert grouped_launches() == before + 1, frozen
        for i, (got, want) in enumerate(zip(grads, ref_inputs if frozen == "weight"
                                            else [ref_weight])):
            assert_close_rel(got, want, torch.bfloat16, f"{frozen} frozen, gradient {i}")


@needs_cutlass_gpu
def test_cutlass_concat_kernels_leave_one_row_strides_tma_cannot_take():
    """A single row's stride is free: 0, or 2^39 elements (past the 2^40 bytes a TMA descriptor
    holds). Handed on as it is, either would stop the process in CUTLASS's host check: both
    concat kernels (the weight gradient's reads the inputs) must leave such an input to the cat
    and cuBLAS, and be right. The same row with its own stride runs them."""
    row = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(128, 128, device="cuda", dtype=torch.bfloat16) / 12).requires_grad_()
    for first, runs in ((row.clone(), True), (row.as_strided((1, 64), (0, 1)), False),
                        (row.as_strided((1, 64), (2 ** 39, 1)), False)):
        xs = [first.detach().requires_grad_(), row.clone().requires_grad_()]
        before = concat_launches(), grouped_launches()
        with fusedskip.use_backend("cutlass"):
            check_against_reference(Sample(xs, w, None, None, True, "relu_add",
                                           f"one row, stride {first.stride(0)}"), torch.bfloat16)
        launched = concat_launches() > before[0], grouped_launches() > before[1]
        assert launched == (runs, runs), (first.stride(), launched)


@needs_cutlass_gpu
def test_cutlass_concat_kernels_take_row_strided_views():
    """Concat inputs usually are views into one wider tensor (split, chunk, big[:, a:b]): rows
    further apart than their width, on whole 16-byte words, which TMA takes as they are. So are a
    weight cut from a wider one and an output gradient with padded rows. Both concat kernels must
    run on them and be right."""
    widths, cols, rows = (64, 200), 256, 300
    big = torch.randn(rows, sum(widths) + 8, device="cuda", dtype=torch.bfloat16)
    w_big = torch.randn(cols, sum(widths) + 24, device="cuda", dtype=torch.bfloat16) / 16
    xs = [t.requires_grad_() for t in big[:, :sum(widths)].split(widths, 1)]
    w = w_big[:, :sum(widths)].requires_grad_()
    b = torch.randn(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert all(x.stride(0) == sum(widths) + 8 for x in xs) and w.stride(0) > w.size(1)
    with fusedskip.use_backend("cutlass"):
        for relu in (True, False):
            before = concat_launches(), grouped_launches()
            check_against_reference(Sample(xs, w, b, None, relu, "relu_add",
                                           f"row-strided views, relu={relu}"), torch.bfloat16)
            assert concat_launches() > before[0] and grouped_launches() == before[1] + 2
        # Without the ReLU the output gradient is the GEMMs' operand as it comes: padded rows.
        g = torch.randn(rows, cols + 8, device="cuda", dtype=torch.bfloat16)[:, :cols]
        no_mask = torch.empty(0, dtype=torch.uint8, device="cuda")
        poison_allocator()
        before = grouped_launches()
        grad_input, grad_weight, _, _ = torch.ops.fusedskip.fused_linear_backward(
            g, [x.detach() for x in xs], w.detach(), no_mask, False, [True, True, True, False,
                                                                      False])
        assert grouped_launches() == before + 2
    g64 = g.double()
    assert_close_rel(grad_input, g64 @ w.detach().double(), torch.bfloat16, "inputs")
    assert_close_rel(grad_weight, g64.T @ torch.cat([x.detach() for x in xs], 1).double(),
                     torch.bfloat16, "weight")


@needs_cutlass_gpu
def test_cutlass_concat_backward_leaves_other_shapes_to_cublas():
    """Blocks TMA cannot take (a width off whole 16-byte words, an input starting mid-word), one
    input, float32: no grouped launch, and every gradient still right."""
    for widths, layout, dtype in (([60, 68], "contiguous", torch.bfloat16),
                                  ([64, 64], "offset", torch.bfloat16),
                                  ([64], "contiguous", torch.float16),
                                  ([64, 64], "contiguous", torch.float32)):
        sample = make_sample(widths, 128, (50,), layout=layout, dtype=dtype, device="cuda")
        before = grouped_launches()
        with fusedskip.use_backend("cutlass"):
            check_against_reference(sample, dtype)
        assert grouped_launches() == before, sample.name
    # No outputs, with an output gradient whose rows are whole 16-byte words apart (a view):
    # every check of alignment passes, but there is nothing to sum; the input gradients are 0.
    x = [torch.randn(50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    w = torch.randn(0, 128, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(50, 8, device="cuda", dtype=torch.bfloat16)[:, :0]
    poison_allocator()
    before = grouped_launches()
    with fusedskip.use_backend("cutlass"):
        grad_input, grad_weight, _, _ = torch.ops.fusedskip.fused_linear_backward(
            g, x, w, torch.empty(0, dtype=torch.uint8, device="cuda"), False,
            [True, True, True, False, False])
    assert grouped_launches() == before
    assert grad_input.shape == (50, 128) and torch.equal(grad_input, torch.zeros_like(grad_input))
    assert grad_weight.shape == (0, 128)


# Last, the tests that run every backend's kernels, the cutlass ones included, as a whole layer
# (where they run, how large): scripts/gpu_check.sh runs the tests matching "cutlass" in one
# process, where a kernel fault stops the run; here it comes after the tests above have tried
# each cutlass kernel on its own and can name it.


@pytest.fixture(params=["native", "gemm_epilogue", "cutlass"])
def kernels(request):
    """Each backend's own kernels, on a single-input layer with a residual and on a concat layer,
    at shapes that backend takes (the `cutlass` ones want half precision and outputs in
    multiples of 128); for the tests of where the kernels run (streams, graphs). Yields the dtype,
    the samples, and a check that the `cutlass` kernels ran (no-op for the others)."""
    if request.param == "cutlass" and not cutlass_gpu():
        pytest.skip("needs the CUTLASS build and an sm_90 GPU")
    dtype = torch.bfloat16 if request.param == "cutlass" else torch.float32
    samples = [make_sample([64], 128, (256,), residual="add_relu", dtype=dtype, device="cuda"),
               make_sample([24, 40], 128, (256,), dtype=dtype, device="cuda")]
    counts = [cutlass_launches(), concat_launches(), grouped_launches()]

    def ran(sample):
        """The launches since the last call: the fused GEMM for one input; for a concat, the
        concat forward and the grouped backward."""
        now = [cutlass_launches(), concat_launches(), grouped_launches()]
        grew = [b > a for a, b in zip(counts, now)]
        counts[:] = now
        if request.param == "cutlass":
            expected = [True, False, False] if len(sample.inputs) == 1 else [False, True, True]
            assert grew == expected, f"{sample.name}: cutlass launches grew {grew}"

    with fusedskip.use_backend(request.param):
        yield dtype, samples, ran


def on_new_inputs(sample):
    """The sample's tensors, and the layer on new inputs in their place (the same parameters):
    (tensors, new inputs, output, output gradient, every tensor's gradient)."""
    tensors, n = sample.tensors(), len(sample.inputs)
    new = [torch.randn_like(x).requires_grad_() for x in sample.inputs]
    expected = sample.call(fusedskip, *new, *tensors[n:])
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [*new, *tensors[n:]], grad)
    return tensors, new, expected, grad, expected_grads


def test_non_default_stream(kernels):
    """The kernels run on the current stream: on a side stream, the inputs are rewritten after a
    long sleep; a kernel launched on any other stream would read the old values."""
    dtype, samples, ran = kernels
    for sample in samples:
        tensors, new, expected, grad, expected_grads = on_new_inputs(sample)
        # Its graph, left alive, would hold the default stream's AccumulateGrad nodes for the
        # leaves the side stream's backward reaches too (torch warns of the mismatch).
        expected = expected.detach()
        ran(sample)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.cuda._sleep(50_000_000)  # ~tens of ms on the side stream only
            with torch.no_grad():
                for x, x_new in zip(sample.inputs, new):
                    x.copy_(x_new)
            out = sample.call(fusedskip, *tensors)
            grads = torch.autograd.grad(out, tensors, grad)
        torch.cuda.current_stream().wait_stream(stream)
        ran(sample)
        # The same kernels on the same values: equal up to rounding (a kernel that read the old
        # inputs is off by ~100%).
        assert_close_rel(out, expected, dtype, f"{sample.name} output")
        for i, (g, e) in enumerate(zip(grads, expected_grads)):
            assert_close_rel(g, e, dtype, f"{sample.name} grad {i}")


def test_cuda_graph_capture_and_replay(kernels):
    """Forward and backward captured once, replayed on new inputs: the same results as the layer
    run plainly on those inputs."""
    dtype, samples, ran = kernels
    for sample in samples:
        tensors = sample.tensors()
        grad = torch.randn(*sample.inputs[0].shape[:-1], sample.weight.shape[0],
                           device="cuda", dtype=dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, the same kernels as captured
            for _ in range(2):
                torch.autograd.grad(sample.call(fusedskip, *tensors), tensors, grad)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sample.call(fusedskip, *tensors)
            grads = torch.autograd.grad(out, tensors, grad)
        ran(sample)
        for _ in range(2):
            with torch.no_grad():
                for x in sample.inputs:
                    x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            expected = sample.call(fusedskip, *leaves)
            expected_grads = torch.autograd.grad(expected, leaves, grad)
            assert_close_rel(out, expected, dtype, f"{sample.name} output")
            for i, (g, e) in enumerate(zip(grads, expected_grads)):
                assert_close_rel(g, e, dtype, f"{sample.name} grad {i}")
        ran(sample)


# Run in a process of its own, so that the library's first launch of every kernel it runs is the
# one inside the capture: launch_kernel (csrc/cuda/launch.cuh) asks the driver for each kernel's
# attributes there once, the CUTLASS launchers set their shared-memory size, and the driver may
# load the kernel only then (lazy loading). Torch's own GEMMs are warmed up first, the way torch's
# documentation asks, so that only the library's first calls fall inside the capture.
_CAPTURE_FIRST = r"""
import sys
import torch
import torch.nn.functional as F
import fusedskip

backend = sys.argv[1]
dtype = torch.bfloat16 if backend == "cutlass" else torch.float32
kw = dict(device="cuda", dtype=dtype)
x, r = torch.randn(256, 64, **kw), torch.randn(256, 128, **kw)
a, b = torch.randn(256, 24, **kw), torch.randn(256, 40, **kw)
w1, w2 = torch.randn(128, 64, **kw), torch.randn(128, 64, **kw)
b1, b2 = torch.randn(128, **kw), torch.randn(128, **kw)
grad = torch.randn(256, 128, **kw)
scales = [1, 1, 1, 1, 1 / 8, 1 / 8, 1, 1]
tensors = [(t * s).requires_grad_() for t, s in zip((x, r, a, b, w1, w2, b1, b2), scales)]
x, r, a, b, w1, w2, b1, b2 = tensors


def step(op):
    out = [op.linear_relu_residual(x, w1, b1, r, order="add_relu"),
           op.linear_concat([a, b], w2, b2, activation="relu")]
    return [o.detach() for o in out], torch.autograd.grad(out, tensors, [grad, grad])


class Plain:  # torch's ops alone: the same GEMMs, for the warm-up
    def linear_relu_residual(x, w, b, r, order):
        return torch.relu(F.linear(x, w, b) + r)

    def linear_concat(xs, w, b, activation):
        return torch.relu(F.linear(torch.cat(xs, -1), w, b))


side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    step(Plain)
torch.cuda.current_stream().wait_stream(side)
launches = fusedskip._ops._C._fused_gemm_launches() + fusedskip._ops._C._concat_gemm_launches()
with fusedskip.use_backend(backend):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(fusedskip)
    with torch.no_grad():  # new values: a graph that did not capture the kernels misses them
        for t, scale in zip(tensors, scales):
            t.copy_(torch.randn_like(t) * scale)
    graph.replay()
    torch.cuda.synchronize()
    if backend == "cutlass":
        now = fusedskip._ops._C._fused_gemm_launches() + fusedskip._ops._C._concat_gemm_launches()
        assert now == launches + 2, "the cutlass kernels did not run"
    plain = step(fusedskip)
tol = 1e-5 if dtype == torch.float32 else 1e-2
for name, got, want in zip(("outputs", "gradients"), captured, plain):
    for i, (g, p) in enumerate(zip(got, want)):
        err = ((g.double() - p.double()).norm() / p.double().norm()).item()
        assert err <= tol, f"{name}[{i}]: relative error {err:.3g} against a plain call"
print("ok")
"""


@pytest.mark.parametrize("name", ["native", "gemm_epilogue", "cutlass"])
def test_cuda_graph_capture_with_no_warm_up(name):
    """Forward and backward captured in a fresh process with no warm-up of the library's kernels,
    then replayed on new values: the results of a plain call on those."""
    if name == "cutlass" and not cutlass_gpu():
        pytest.skip("needs the CUTLASS build and an sm_90 GPU")
    done = subprocess.run([sys.executable, "-c", _CAPTURE_FIRST, name], env=checkout_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


def test_kernels_wait_for_the_kernel_before_them(kernels):
    """Each backend's first kernels, forward and backward, queued right behind a kernel that lets
    the next one launch at once and writes their operands (the inputs, then the output gradient)
    only 2 ms later (fusedskip._C._late_copy, launched as the library launches its own). On sm_90,
    where kernels launch with programmatic dependent launch (csrc/cuda/launch.cuh), one that read
    its operands before waiting for the kernel before it would read the old values."""
    dtype, samples, ran = kernels
    late_copy = fusedskip._ops._C._late_copy
    if torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("FUSEDSKIP_PDL") != "0":
        assert fusedskip._ops._C._programmatic_launch()
    for sample in samples:
        tensors, new, expected, grad, expected_grads = on_new_inputs(sample)
        ran(sample)
        late_grad = torch.zeros_like(grad)  # what a kernel that did not wait would read
        torch.cuda.synchronize()
        for x, x_new in zip(sample.inputs, new):
            late_copy(x_new.detach(), x.detach(), 2_000_000)
        out = sample.call(fusedskip, *tensors)
        late_copy(grad, late_grad, 2_000_000)
        grads = torch.autograd.grad(out, tensors, late_grad)
        ran(sample)
        assert_close_rel(out, expected, dtype, f"{sample.name} output")
        for i, (g, e) in enumerate(zip(grads, expected_grads)):
            assert_close_rel(g, e, dtype, f"{sample.name} grad {i}")


def test_back_to_back_layers_read_what_the_one_before_wrote(kernels):
    """A stack of layers, forward and backward, queued with no synchronisation, each reading what
    the kernel before it wrote. On sm_90 the kernels are launched with programmatic dependent
    launch (csrc/cuda/launch.cuh): a kernel may start while the one before still runs, and must
    wait before it reads. Each layer against float64 on its own input and output gradient as they
    ended up, with the ReLU from the op's own mask (a pre-activation within rounding of zero may
    take either side): a kernel that read its operands before they were written is off by far
    more than rounding."""
    import torch.nn.functional as F

    dtype, _, ran = kernels
    rows, width, depth = 4096, 256, 6
    op = torch.ops.fusedskip.fused_linear
    weights = [(torch.randn(width, width, device="cuda", dtype=dtype) / width**0.5).requires_grad_()
               for _ in range(depth)]
    biases = [torch.randn(width, device="cuda", dtype=dtype).requires_grad_() for _ in range(depth)]
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    layers = []
    for weight, bias in zip(weights, biases):
        leaf = x.detach().requires_grad_()  # the same memory: the next kernel reads the last output
        x, mask = op([leaf], weight, bias, leaf, True, False)  # relu(leaf W^T + b) + leaf
        layers.append((leaf, weight, bias, x, mask))
    grad = torch.randn_like(x)
    grads = []
    for leaf, weight, bias, out, _ in reversed(layers):
        grads.append((grad, *torch.autograd.grad(out, [leaf, weight, bias], grad)))
        grad = grads[-1][1]
    grads.reverse()
    # One sample of the layers' shape for the check that the `cutlass` kernels ran.
    ran(types.SimpleNamespace(inputs=[x], name="stack"))
    for i, ((leaf, weight, bias, out, mask), (grad_out, *got)) in enumerate(zip(layers, grads)):
        leaves = [t.detach().double().requires_grad_() for t in (leaf, weight, bias)]
        preact = F.linear(*leaves)
        active = unpack_mask(mask, width)
        expected = torch.where(active, preact, torch.zeros_like(preact)) + leaves[0]
        assert_close_rel(out, expected, dtype, f"layer {i} output")
        expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
        for name, g, e in zip(("input", "weight", "bias"), got, expected_grads):
            assert_close_rel(g, e, dtype, f"layer {i} {name} gradient")


@pytest.mark.parametrize("name", ["native", "gemm_epilogue", "cutlass"])
def test_over_two_to_the_31_elements(name):
    """64-bit indexing in every kernel a backend runs, forward and backward: an output and its
    gradient of 2^31 + 128 elements (bfloat16, 4 GiB each). The output and the input's gradient
    at both ends, and the weight's gradient, a sum over every row, against float64."""
    if name == "cutlass" and not cutlass_gpu():
        pytest.skip("needs the CUTLASS build and an sm_90 GPU")
    rows, k, n = 2**31 // 128 + 1, 8, 128
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 3).requires_grad_()
    before = cutlass_launches()
    with fusedskip.use_backend(name):
        out = fusedskip.linear_relu_residual(x, w)
        grad = torch.randn_like(out)
        grad_x, grad_w = torch.autograd.grad(out, (x, w), grad)
    if name == "cutlass":
        assert cutlass_launches() == before + 1
    x64, w64 = x.detach().double(), w.detach().double()
    for part in (slice(0, 1000), slice(rows - 1000, rows)):
        assert_close_rel(out[part], torch.relu(x64[part] @ w64.T), torch.bfloat16, f"rows {part}")
        # The ReLU as the op took it (out > 0 exactly where its mask is set): a pre-activation
        # within rounding of zero may fall on either side in bfloat16.
        kept = torch.where(out[part] > 0, grad[part].double(), 0.0)
        assert_close_rel(grad_x[part], kept @ w64, torch.bfloat16, f"input grad rows {part}")
    ref_w = torch.zeros(n, k, dtype=torch.float64, device="cuda")
    for start in range(0, rows, 2**20):  # 1 GiB of float64 gradient at a time
        part = slice(start, min(start + 2**20, rows))
        ref_w += torch.where(out[part] > 0, grad[part].double(), 0.0).T @ x64[part]
    assert_close_rel(grad_w, ref_w, torch.bfloat16, "weight grad")
