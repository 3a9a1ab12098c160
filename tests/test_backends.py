"""The backend switch, and every backend's results on CPU against the float64 reference.

``cuda_emulation`` runs the native CUDA kernel's own block code on the host (csrc/tile_gemm.h,
csrc/tile_plan.h): these tests are how its tiling, bounds, concat segments, split-K and epilogue
are checked on every run without a GPU. It poisons every output with NaN before the blocks run,
so an element the kernel fails to write fails the comparison."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import fusedskip
from conftest import (CPU_BACKENDS, MASKED_GRADIENT_CASES, SEED, assert_close_rel,
                      check_against_reference, check_native_backward_stores_masked_gradient, ids,
                      make_sample, new_memory_is_nan, sample_grid, strided_like, unpack_mask)

pytestmark = pytest.mark.skipif(not fusedskip.extension_loaded(), reason="needs the extension")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def emulation():
    with fusedskip.use_backend("cuda_emulation"):
        yield


def test_backend_switch_round_trip():
    assert fusedskip.get_backend() == "auto"
    for name in fusedskip.BACKENDS:
        with fusedskip.use_backend(name):
            assert fusedskip.get_backend() == name
        assert fusedskip.get_backend() == "auto"


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*'auto', 'native'"):
        fusedskip.set_backend("fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        fusedskip.set_backend(3)
    with pytest.raises(ValueError, match="not valid text"):
        fusedskip.set_backend("\ud800")
    with pytest.raises(ValueError, match="unknown backend"):
        fusedskip.set_backend("native\x00junk")
    assert fusedskip.get_backend() == "auto"


def test_use_backend_blocks_take_turns_across_threads():
    """The backend is process-wide: a second thread's block waits for the first to end, so each
    sees its own backend and the default comes back after both."""
    import threading
    import time

    entered, seen = threading.Event(), {}

    def first():
        with fusedskip.use_backend("native"):
            entered.set()
            time.sleep(0.2)  # the other thread tries to switch meanwhile
            seen["first"] = fusedskip.get_backend()

    def second():
        entered.wait()
        with fusedskip.use_backend("gemm_epilogue"):
            seen["second"] = fusedskip.get_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen == {"first": "native", "second": "gemm_epilogue"}
    assert fusedskip.get_backend() == "auto"


@pytest.mark.parametrize("value,expected,warns", [("gemm_epilogue", "gemm_epilogue", False),
                                                  ("turbo", "auto", True)])
def test_environment_variable(value, expected, warns):
    """Read at import (a later change of the variable does nothing); a bad value is a Python
    warning there."""
    code = ("import os, warnings; warnings.simplefilter('always'); import fusedskip; "
            "os.environ['FUSEDSKIP_BACKEND'] = 'native'; print(fusedskip.get_backend())")
    env = dict(os.environ, FUSEDSKIP_BACKEND=value)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected
    assert ("UserWarning: fusedskip: FUSEDSKIP_BACKEND=turbo is not one of" in done.stderr) == warns


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_form_every_backend(backend, dtype):
    with fusedskip.use_backend(backend):
        for sample in sample_grid(dtype=dtype):
            check_against_reference(sample, dtype)


def test_cutlass_backend_on_cpu_tensors_is_gemm_epilogue():
    """`cutlass` is a CUDA kernel: CPU tensors take the library path (the same bits as
    `gemm_epilogue`), every form still right."""
    c = fusedskip._ops._C
    counters = (c._fused_gemm_launches, c._concat_gemm_launches, c._grouped_gemm_launches)
    before = [count() for count in counters]
    for sample in sample_grid(dtype=torch.float32):
        with fusedskip.use_backend("cutlass"):
            check_against_reference(sample, torch.float32)
            got = sample.call(fusedskip, *sample.tensors())
        with fusedskip.use_backend("gemm_epilogue"):
            want = sample.call(fusedskip, *sample.tensors())
        assert torch.equal(got, want), sample.name
    assert [count() for count in counters] == before


GRADCHECK = sample_grid(small=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sample", GRADCHECK, ids=ids(GRADCHECK))
def test_gradcheck_every_backend(sample, backend):
    fn = lambda *t: sample.call(fusedskip, *t)  # noqa: E731
    with fusedskip.use_backend(backend):
        assert torch.autograd.gradcheck(fn, sample.tensors())


# Output widths of whole mask bytes (multiples of 8) on 16-byte boundaries: the element-wise
# passes move each unit's 8 values as whole words there (csrc/epilogue.h, Pack8); a sliced
# residual or gradient next to them must take the element-by-element form.
WHOLE_WORD_COLS = (8, 64, 136)


@pytest.mark.parametrize("backend", ("native", "gemm_epilogue"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_element_wise_passes_in_whole_words(backend, dtype):
    generator = torch.Generator().manual_seed(SEED)
    with fusedskip.use_backend(backend):
        for cols, residual, layout in itertools.product(
                WHOLE_WORD_COLS, (None, "relu_add", "add_relu"), ("contiguous", "sliced")):
            sample = make_sample([19], cols, (37,), residual=residual, layout=layout, dtype=dtype,
                                 generator=generator)
            check_against_reference(sample, dtype)
        check_against_reference(make_sample([24, 40], 64, (3, 11), dtype=dtype,
                                             generator=generator), dtype)


# Bias-gradient sums of the pass against float64 (half types: rounding the sum to 8 or 11 bits).
PASS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


# The backward's element-wise pass (the output gradient through the ReLU mask, the bias gradient)
# runs in chunks of rows on a CPU; the GPU's units (csrc/epilogue.h: backward_epilogue_unit) walk 8
# columns down blocks of rows, and run on a CPU under cuda_emulation, through a test hook (the
# op there reads the mask in the native kernel instead, unless the residual's gradient is all it
# is asked for). Both sum each column's rows in the same order, so they agree bit for bit: at odd
# widths and whole words, on word boundaries or off them, with a column-strided or expanded
# gradient, NaN and Inf included.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", (1, 37, 64, 136))
@pytest.mark.parametrize("grad_layout", ("contiguous", "sliced", "column-strided", "expanded",
                                         "column-expanded"))
def test_cpu_backward_pass_matches_the_gpu_units_bit_for_bit(dtype, cols, grad_layout):
    generator = torch.Generator().manual_seed(SEED)
    rows = 300  # three blocks of rows, the last partial

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    x, weight = rand(rows, 19), rand(cols, 19)
    mask = torch.ops.fusedskip.fused_linear([x], weight, None, None, True, False)[1]
    grad = {"contiguous": lambda: rand(rows, cols),
            "sliced": lambda: rand(rows, cols + 3)[:, 1:cols + 1],
            "column-strided": lambda: rand(cols, rows).t(),
            "expanded": lambda: rand(1, cols).expand(rows, cols),
            "column-expanded": lambda: rand(rows, 1).expand(rows, cols)}[grad_layout]()
    if "expanded" not in grad_layout:
        grad[::7, ::3] = float("nan")
        grad[1::7, ::5] = float("inf")

    def run(backend):
        """(grad_bias, grad_preact) of the pass, from outputs poisoned with NaN."""
        grad_bias = torch.full((cols,), float("nan"), dtype=dtype)
        grad_preact = torch.full((rows, cols), float("nan"), dtype=dtype)
        with fusedskip.use_backend(backend):
            fusedskip._ops._C._backward_epilogue(grad, mask, grad_preact, grad_bias)
        return grad_bias, grad_preact

    rows_pass, units = run("gemm_epilogue"), run("cuda_emulation")
    for name, got, expected in zip(("grad_bias", "grad_preact"), rows_pass, units):
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)), name
        assert torch.equal(got.isnan(), expected.isnan()), name
    # And both are right: the gradient where the mask's bit is set, else 0; its column sums.
    expected = torch.where(unpack_mask(mask, cols), grad, torch.zeros((), dtype=dtype))
    assert torch.equal(rows_pass[1].nan_to_num(7.0), expected.nan_to_num(7.0))
    tolerance = PASS_TOLERANCE.get(dtype, 1e-2)
    torch.testing.assert_close(rows_pass[0].double(), expected.double().sum(0), equal_nan=True,
                               rtol=tolerance, atol=tolerance)


# The forward's element-wise pass likewise: its CPU row loops against the GPU's units
# (csrc/epilogue.h, forward_epilogue_pass_unit), which run on a CPU only under cuda_emulation and
# only through this hook (the op's forward there is the native kernel's own epilogue). Whole words
# where every unit is 8 columns on 16-byte boundaries; element by element off them.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", (1, 37, 64, 136))
@pytest.mark.parametrize("form", ("relu_add", "add_relu", "relu", "bias_residual"))
@pytest.mark.parametrize("aligned", (True, False), ids=("aligned", "offset"))
def test_cpu_forward_pass_matches_the_gpu_units_bit_for_bit(dtype, cols, form, aligned):
    generator = torch.Generator().manual_seed(SEED)
    rows = 45

    def rand(*shape):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
        if aligned:
            return values
        # One element in: off every 16-byte boundary, still contiguous.
        flat = torch.empty(values.numel() + 1, dtype=dtype)[1:]
        return flat.view(values.shape).copy_(values)

    gemm = rand(rows, cols)
    gemm[::7, ::3] = float("nan")
    gemm[1::7, ::5] = float("inf")
    gemm[2::7, ::4] = float("-inf")
    bias = rand(cols)
    residual = rand(rows, cols) if aligned else rand(rows, cols + 3)[:, 1:cols + 1]
    relu = form != "bias_residual"
    if form == "relu":
        residual = None

    def run(backend):
        out = rand(rows, cols).fill_(float("nan"))
        mask = torch.full((rows, (cols + 7) // 8), 0xA5, dtype=torch.uint8) if relu else None
        with fusedskip.use_backend(backend):
            fusedskip._ops._C._forward_epilogue(gemm, out, bias, residual, mask, form == "add_relu")
        return out, mask

    def bits(t):  # the values' bit patterns, NaN's dropped (their payloads are not compared)
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])[
            ~t.isnan()]

    rows_out, rows_mask = run("gemm_epilogue")
    units_out, units_mask = run("cuda_emulation")
    assert torch.equal(rows_out.isnan(), units_out.isnan())
    assert torch.equal(bits(rows_out), bits(units_out))  # the sign of a zero included
    if relu:
        assert torch.equal(rows_mask, units_mask)
    # And both are right: the same sums in opmath (float32 for half types), in the same order,
    # rounded once at the end.
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    pre = gemm.to(opmath) + bias.to(opmath)
    if form in ("add_relu", "bias_residual"):
        pre = pre + residual.to(opmath)
    out = torch.relu(pre) if relu else pre
    if form == "relu_add":
        out = out + residual.to(opmath)
    expected = out.to(dtype)
    assert torch.equal(units_out.isnan(), expected.isnan())
    assert torch.equal(bits(units_out), bits(expected))
    if relu:
        assert torch.equal(unpack_mask(units_mask, cols), (pre > 0) | pre.isnan())
        if cols % 8:  # the last byte's bits past the last column stay clear
            assert not (units_mask[:, -1] >> (cols % 8)).any()


@pytest.mark.parametrize("backend", ("gemm_epilogue", "cuda_emulation"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_pass_sums_each_blocks_rows_first_to_last(backend, dtype):
    """Summed first to last, 2048 - 2048 + 126 * 2^-20 is 126 * 2^-20 in any dtype; an order that
    meets 2048 after the small terms loses them in float32 (half the spacing of floats at 2048 is
    2^-13). So a pass that summed in another order would fail here, half types included."""
    rows, cols = 128, 8
    grad = torch.full((rows, cols), 2.0 ** -20, dtype=dtype)
    grad[0], grad[1] = 2048.0, -2048.0
    x, weight = torch.zeros(rows, 3, dtype=dtype), torch.zeros(cols, 3, dtype=dtype)
    mask = torch.full((rows, 1), 0xFF, dtype=torch.uint8)  # every ReLU on
    with fusedskip.use_backend(backend):
        grad_bias = torch.ops.fusedskip.fused_linear_backward(
            grad, [x], weight, mask, True, [False, False, True, True])[2]
    assert torch.equal(grad_bias, torch.full((cols,), 126 * 2.0 ** -20, dtype=dtype))


@pytest.mark.parametrize("relu", (True, False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_backward_pass_each_gradient_any_thread_count(relu, dtype):
    """The pass alone for each gradient it can be asked for, on one thread and on two: right,
    and the same bits (the blocks of rows, not the threads, fix the order of every sum)."""
    generator = torch.Generator().manual_seed(SEED)
    rows, cols = 5000, 30  # 40 blocks of rows: several tasks for at::parallel_for
    x = torch.randn(rows, 19, generator=generator).to(dtype)
    weight = torch.randn(cols, 19, generator=generator).to(dtype)
    grad = torch.randn(rows, cols, generator=generator).to(dtype)
    mask = torch.ops.fusedskip.fused_linear([x], weight, None, None, relu, False)[1]
    expected = torch.where(unpack_mask(mask, cols), grad, 0) if relu else grad
    tolerance = PASS_TOLERANCE.get(dtype, 1e-2)
    threads = torch.get_num_threads()
    for want_bias, want_preact in ((True, False), (False, True), (True, True)):
        if want_preact and not relu:
            continue  # without a ReLU the pre-activation gradient is the output's: none made
        results = []
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                with fusedskip.use_backend("gemm_epilogue"):
                    results.append(torch.ops.fusedskip.fused_linear_backward(
                        grad, [x], weight, mask, relu, [False, False, want_bias, want_preact]))
        finally:
            torch.set_num_threads(threads)
        for one, two in zip(results[0][1:], results[1][1:]):
            assert torch.equal(one, two)
        _, _, grad_bias, grad_preact = results[0]
        if want_bias:
            # A sum's rounding error scales with its terms' magnitudes, not with the sum: a
            # column of 5000 terms that cancel to near zero is right with a float32 error of
            # ~5e-5 (an element-wise tolerance of 1e-5 failed one random seed in five).
            error = (grad_bias.double() - expected.double().sum(0)).abs()
            assert (error <= tolerance * expected.double().abs().sum(0)).all(), error.max()
        if want_preact:
            assert torch.equal(grad_preact, expected)


# Concat blocks at least 64 wide on 16-byte boundaries: the library path's backward runs one GEMM
# per block there for the weight gradient, writing each column block in place
# (library_gemm_per_block, csrc/backend.cpp); the inputs' gradients, all wanted here, are one GEMM
# over the whole width. A block off a word boundary (the "offset" and "sliced" layouts) sends the
# weight's back to one GEMM over the concatenation.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_library_backward_one_gemm_per_aligned_block(dtype):
    generator = torch.Generator().manual_seed(SEED)
    with fusedskip.use_backend("gemm_epilogue"):
        for (widths, relu), layout in itertools.product(
                (([64, 136], True), ([72, 64, 96], False), ([64, 128, 64, 256], True)),
                ("contiguous", "offset", "sliced")):
            sample = make_sample(widths, 40, (3, 11), relu=relu, layout=layout, dtype=dtype,
                                 generator=generator)
            check_against_reference(sample, dtype)
        if dtype == torch.float64:
            sample = make_sample([64, 66], 5, (3,), generator=generator)
            fn = lambda *t: sample.call(fusedskip, *t)  # noqa: E731
            assert torch.autograd.gradcheck(fn, sample.tensors())


# Which inputs want a gradient: every one, the first alone, all but the first (the library path's
# per-block GEMMs, or over misaligned blocks its whole-width GEMM with the rest zeroed).
WANTED = ((True, True, True), (True, False, False), (False, True, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("contiguous", "offset"))
@pytest.mark.parametrize("wanted", WANTED, ids=lambda w: "".join("x" if b else "-" for b in w))
@pytest.mark.parametrize("weight", ("frozen", "trained"))
def test_concat_input_gradients_are_column_blocks_of_one(backend, layout, wanted, weight):
    """Through autograd, each concat input's gradient is its column block of the cat's gradient,
    a view, as eager's cat backward hands out (no copies); right whichever inputs want one, and
    as a leaf's .grad (which AccumulateGrad copies out of the view, as for eager). A frozen
    weight's backward gets aligned stand-ins for the inputs (forward saved none); a trained
    one's gets the inputs themselves, off a word boundary in the "offset" layout."""
    generator = torch.Generator().manual_seed(SEED)
    widths = [64, 136, 72]
    sample = make_sample(widths, 40, (3, 11), relu=True, layout=layout, dtype=torch.float64,
                         requires_grad=False, generator=generator)
    sample.weight.requires_grad_(weight == "trained")
    xs = [x.requires_grad_(want) for x, want in zip(sample.inputs, wanted)]
    chosen = [x for x in xs if x.requires_grad]
    grad = torch.randn(3, 11, 40, dtype=torch.float64, generator=generator)
    with fusedskip.use_backend(backend):
        out = fusedskip.linear_concat(xs, sample.weight, sample.bias, activation="relu")
        got = torch.autograd.grad(out, chosen, grad)
    ref_xs = [x.detach().requires_grad_(x.requires_grad) for x in xs]
    ref = fusedskip.reference.linear_concat(ref_xs, sample.weight.detach(), sample.bias,
                                            activation="relu")
    expected = torch.autograd.grad(ref, [x for x in ref_xs if x.requires_grad], grad)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close_rel(g, e, torch.float64, f"gradient {i}")
        assert g.stride() == (11 * sum(widths), sum(widths), 1), g.stride()
    if len(got) > 1:
        assert len({g.untyped_storage().data_ptr() for g in got}) == 1

    with fusedskip.use_backend(backend):
        fusedskip.linear_concat(xs, sample.weight, sample.bias, activation="relu").backward(grad)
    for i, (x, e) in enumerate(zip(chosen, expected)):
        assert_close_rel(x.grad, e, torch.float64, f"leaf {i}'s .grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("contiguous", "offset"))
@pytest.mark.parametrize("wanted", WANTED, ids=lambda w: "".join("x" if b else "-" for b in w))
def test_backward_op_zeroes_the_columns_of_inputs_not_asked_for(backend, layout, wanted):
    """The op called directly: grad_input is the cat's gradient, with the columns of an input not
    asked for zero (never left unwritten: new memory is NaN here) and the rest right."""
    generator = torch.Generator().manual_seed(SEED)
    widths = [64, 136, 72]
    sample = make_sample(widths, 40, (50,), relu=True, layout=layout, dtype=torch.float32,
                         requires_grad=False, generator=generator)
    xs, w = sample.inputs, sample.weight
    grad = torch.randn(50, 40, generator=generator)
    with fusedskip.use_backend(backend):
        _, mask = torch.ops.fusedskip.fused_linear(xs, w, None, None, True, False)
        with new_memory_is_nan():
            grad_input, grad_weight, _, _ = torch.ops.fusedskip.fused_linear_backward(
                grad, xs, w, mask, True, [*wanted, True, False, False])
    active = unpack_mask(mask, 40)
    grad_preact = torch.where(active, grad, 0).double()
    for i, (want, block, ref) in enumerate(zip(wanted, grad_input.split(widths, 1),
                                               (grad_preact @ w.double()).split(widths, 1))):
        if want:
            assert_close_rel(block, ref, torch.float32, f"input {i}")
        else:
            assert torch.equal(block, torch.zeros_like(block)), f"input {i}"
    assert_close_rel(grad_weight, grad_preact.T @ torch.cat(xs, 1).double(), torch.float32,
                     "weight")


# Sizes on both sides of the 64-wide output tiles and of the 16 (SIMT) / 32 (tensor core) K steps.
EDGES = (1, 63, 64, 65, 129)
K_EDGES = (1, 15, 16, 17, 31, 32, 33)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_tile_edges(dtype, emulation):
    generator = torch.Generator().manual_seed(SEED)
    for rows, cols in itertools.product(EDGES, EDGES):
        k = K_EDGES[(rows + cols) % len(K_EDGES)]
        residual = (None, "relu_add", "add_relu")[(rows * cols) % 3]
        sample = make_sample([k], cols, (rows,), residual=residual, dtype=dtype,
                             generator=generator)
        check_against_reference(sample, dtype)
    for k in K_EDGES:
        check_against_reference(make_sample([k], 65, (65,), dtype=dtype, generator=generator),
                                dtype)


# The epilogue's threads span 16, 32 or 64 columns of a tile, by how many it has left
# (csrc/tile_gemm.h, tile_epilogue): widths on both sides of each, alone and as a wider layer's
# last tile; each order of the residual, and without ReLU.
SPAN_EDGES = (10, 16, 17, 30, 32, 33, 80, 81, 96, 97)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_epilogue_spans(dtype, emulation):
    generator = torch.Generator().manual_seed(SEED)
    for cols in SPAN_EDGES:
        for residual, relu in ((None, False), (None, True), ("relu_add", True),
                               ("add_relu", True)):
            sample = make_sample([19], cols, (67,), residual=residual, relu=relu, dtype=dtype,
                                 generator=generator)
            check_against_reference(sample, dtype)


@pytest.mark.parametrize("count", range(1, 9))
def test_emulated_concat_one_to_eight_inputs(count, emulation):
    widths = [1, 33, 7, 13, 2, 65, 11, 9][:count]
    generator = torch.Generator().manual_seed(SEED + count)
    for dtype, relu in itertools.product(DTYPES, (False, True)):
        check_against_reference(make_sample(widths, 70, (2, 37), relu=relu, dtype=dtype,
                                            generator=generator), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "column-major-inputs", "column-major-weight"))
def test_emulated_k_steps_straddle_inputs(dtype, layout, emulation):
    """The native kernel's K steps run over the inputs as over their concatenation's columns: a
    step (16 columns in SIMT, 32 on tensor cores) holds several narrow inputs, one input spans
    several steps, and inputs of width 0 anywhere are passed over. Each thread's share of a
    step runs along the operand's rows in the contiguous layout, so it stays in one input; with
    column-major inputs (A) or weight (B) it runs along K, across inputs, which the loader takes
    element by element (load_tiles_by_element in csrc/tile_gemm.h)."""
    generator = torch.Generator().manual_seed(SEED)
    for widths in ([3, 6, 9, 12], [0, 5, 0, 40, 0], [31, 2, 17, 0, 1, 33]):
        sample = make_sample(widths, 65, (70,),
                             layout="transposed" if layout == "column-major-inputs" else "contiguous",
                             dtype=dtype, generator=generator)
        if layout == "column-major-weight":
            sample.weight = strided_like(sample.weight, "transposed")
            assert sample.weight.stride(0) == 1
        check_against_reference(sample, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_split_k_weight_gradient(dtype, emulation):
    """Enough rows that the weight gradient's K is split over slices and summed in order."""
    generator = torch.Generator().manual_seed(SEED)
    for widths, residual in (([20], "relu_add"), ([5, 70], None)):
        sample = make_sample(widths, 30, (1500,), residual=residual, dtype=dtype,
                             generator=generator)
        check_against_reference(sample, dtype)
        # The same bits on every run: fixed slices, summed in a fixed order.
        runs = []
        for _ in range(2):
            out = sample.call(fusedskip, *sample.tensors())
            runs.append(torch.autograd.grad(out.sum(), sample.weight))
        assert torch.equal(runs[0][0], runs[1][0])


def test_emulated_tf32_follows_allow_tf32(emulation):
    """float32 uses the tensor-core maths (TF32 operands) exactly when matmuls may use TF32."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(70, 300, generator=generator)
    w = torch.randn(50, 300, generator=generator)
    exact = x.double() @ w.double().T
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        full = fusedskip.linear_concat([x], w)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = fusedskip.linear_concat([x], w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    full_err = ((full.double() - exact).norm() / exact.norm()).item()
    tf32_err = ((tf32.double() - exact).norm() / exact.norm()).item()
    assert full_err <= 1e-6
    assert 1e-5 < tf32_err <= 1e-3  # rounded operands, and only to TF32's precision


def test_emulated_expanded_gradient_and_empty_shapes(emulation):
    # d(sum)/d(out) arrives as an expanded tensor (stride 0): read through its strides.
    sample = make_sample([9, 4], 70, (66,), relu=False)
    out = sample.call(fusedskip, *sample.tensors())
    grads = torch.autograd.grad(out.sum(), sample.tensors())
    ref64 = [t.detach().double().requires_grad_() for t in sample.tensors()]
    ref_grads = torch.autograd.grad(sample.call(fusedskip.reference, *ref64).sum(), ref64)
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg, torch.float64, "expanded grad")
    # No rows: empty output, zero weight gradient (every element still written).
    sample = make_sample([3, 5], 6, (0,))
    out = sample.call(fusedskip, *sample.tensors())
    assert out.shape == (0, 6)
    grad_w, grad_b = torch.autograd.grad(out.sum(), [sample.weight, sample.bias])
    assert torch.equal(grad_w, torch.zeros_like(grad_w))
    assert torch.equal(grad_b, torch.zeros_like(grad_b))
    # A zero-width input among others.
    check_against_reference(make_sample([0, 5], 7, (9,)), torch.float64)


def test_forced_native_kernel_refuses_shapes_beyond_one_launch(emulation):
    # 2^40 rows (an expanded view: no memory) are 2^34 row tiles, more blocks than a launch holds.
    x = torch.randn(1, 1).expand(2**40, 1)
    w = torch.randn(64, 1)
    with pytest.raises(ValueError, match="backend 'cuda_emulation' cannot run a layer this large"):
        fusedskip.linear_concat([x], w)


@pytest.mark.parametrize("wanted", ["input", "weight", "bias", "weight+bias", "residual",
                                    "input+residual", "weight+residual", "bias+residual"])
def test_emulated_backward_of_each_gradient_alone(wanted, emulation):
    """The native backward is one launch over the gradients asked for; each alone is right
    (through the mask, with the bias gradient as its own problem and split-K at 1500 rows), and
    so is the residual's with each other one (add_relu's, which the blocks that load the output
    gradient for the other store too; alone, the element-wise pass writes it)."""
    generator = torch.Generator().manual_seed(SEED)
    for rows, order in ((70, "relu_add"), (1500, "add_relu")):
        sample = make_sample([13], 65, (rows,), residual=order, requires_grad=False,
                             generator=generator)
        tensors = sample.tensors()
        names = {"input": [0], "weight": [1], "bias": [2], "residual": [3]}
        chosen = [tensors[i].requires_grad_()
                  for i in sorted(sum((names[name] for name in wanted.split("+")), []))]
        out = sample.call(fusedskip, *tensors)
        grad = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        got = torch.autograd.grad(out, chosen, grad)
        ref64 = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
        ref_out = sample.call(fusedskip.reference, *ref64)
        expected = torch.autograd.grad(ref_out, [t for t in ref64 if t.requires_grad], grad)
        assert len(got) == len(expected) == len(chosen)
        for g, e in zip(got, expected):
            assert_close_rel(g, e, torch.float64, f"{wanted} at {rows} rows")


# add_relu's residual gradient, stored by the native backward's loads (conftest's
# check_native_backward_stores_masked_gradient; on a GPU in tests/test_cuda.py).
@pytest.mark.parametrize("case", MASKED_GRADIENT_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_emulated_backward_stores_the_masked_gradient_bit_for_bit(case, dtype, emulation):
    check_native_backward_stores_masked_gradient(case, dtype, "cpu")


def test_emulated_bias_gradient_in_full_float32_under_tf32(emulation):
    """TF32 rounds the GEMM operands; the bias gradient (a plain sum) stays float32, as torch's."""
    x = torch.randn(1024, 16)
    w = torch.randn(8, 16)
    b = torch.zeros(8, requires_grad=True)
    grad = torch.full((1024, 8), 1 + 2.0**-12)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        (got,) = torch.autograd.grad(fusedskip.linear_concat([x], w, b), b, grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(got, grad.sum(0))
