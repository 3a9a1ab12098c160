"""Shared test helpers: random samples of every form of the op, tolerances, comparisons."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import zlib
from typing import List, Optional

import pytest
import torch

import fusedskip

# ‖out − ref‖ / ‖ref‖ against a float64 reference (the numerics in DESIGN.md, "Checking GPU code when a GPU
# is rare", and issue #3).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Random inputs are redrawn every run; the seed is printed first and last to replay a failure.
SEED = int(os.environ.get("FUSEDSKIP_TEST_SEED", random.randrange(2**31)))

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env() -> dict:
    """The environment for a script run in a subprocess: this checkout first on PYTHONPATH, so
    the package imports from here also where it was built in place and never installed."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=CHECKOUT + (os.pathsep + path if path else ""))

CUDA = torch.cuda.is_available() and fusedskip.cuda_available()
# Every test that needs a GPU carries the `cuda` marker (scripts/gpu_check.sh runs `-m cuda`) and
# skips cleanly without one: `pytestmark = CUDA_MARKS` in a module, `@requires_cuda` on a test,
# `pytest.param("cuda", marks=CUDA_MARKS)` on a parameter.
CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels")]


# The backends on each device. A test of the op's arithmetic runs under each of them: `auto` picks
# by shape and would leave the others untested. (`cutlass` applies only on an sm_90 GPU and to
# some shapes; elsewhere it is gemm_epilogue.)
CPU_BACKENDS = ("native", "gemm_epilogue", "cuda_emulation")
CUDA_BACKENDS = ("native", "gemm_epilogue", "cutlass")
DEVICE_BACKENDS = ([pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS]
                   + [pytest.param("cuda", b, id=f"cuda-{b}", marks=CUDA_MARKS)
                      for b in CUDA_BACKENDS])


def requires_cuda(test):
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def _seeded(request):
    """The global RNG (CPU and CUDA) seeded from SEED and the test's own id: any test, run alone
    or in the whole suite, draws the same inputs again under the same FUSEDSKIP_TEST_SEED."""
    torch.manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)


@pytest.fixture(autouse=True)
def _cuda_errors_stop_the_run(request):
    """Kernels run asynchronously: without a sync, a kernel's fault surfaces in whichever later
    test next synchronizes. Syncing after each test charges it to the test that caused it. Such
    a fault leaves the CUDA context unusable, so every later test in this process would fail with
    the same error: the run stops there (scripts/gpu_check.sh runs the riskiest kernels' tests in
    a process of their own)."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            request.session.shouldstop = (f"a CUDA error after {request.node.nodeid}: the CUDA "
                                          "context is lost for the rest of this process")
            raise


@contextlib.contextmanager
def new_memory_is_nan():
    """The CPU's poison: under deterministic algorithms torch fills every new tensor with NaN
    (torch.utils.deterministic.fill_uninitialized_memory), so an element a kernel never writes
    shows up as NaN. warn_only: cuBLAS would refuse deterministic mode without a workspace
    setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.empty(4).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def poison_allocator():
    """Fill memory the CUDA caching allocator will hand out next with 0xFF bytes (NaN in every
    float dtype), in both of its pools (blocks up to 1 MiB come from a separate small pool), so an
    output element the kernels never write shows up as NaN instead of a plausible stale value.
    Nothing to do without the cache (compute-sanitizer's runs turn it off): every allocation is
    then fresh device memory, which memcheck watches instead."""
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return
    torch.cuda.empty_cache()  # else an output may land in a stale cached block, never poisoned
    blocks = [torch.full((64 * 1024 * 1024,), 255, dtype=torch.uint8, device="cuda")]
    blocks += [torch.full((size,), 255, dtype=torch.uint8, device="cuda")
               for size in (512, 4096, 65536, 512 * 1024) for _ in range(8)]
    del blocks


def pytest_terminal_summary(terminalreporter):
    # Last too, since -q (make test) drops the header: a failed run can always be replayed.
    terminalreporter.write_line(f"FUSEDSKIP_TEST_SEED={SEED} (set it to draw the same inputs)")


def pytest_report_header(config):
    return [f"fusedskip: extension loaded={fusedskip.extension_loaded()}, "
            f"CUDA kernels={fusedskip._ops.HAS_CUDA_KERNELS}, GPU={torch.cuda.is_available()}, "
            f"torch {torch.__version__}; FUSEDSKIP_TEST_SEED={SEED}"]


def rel_err(out: torch.Tensor, ref: torch.Tensor, size: Optional[torch.Tensor] = None) -> float:
    """||out - ref|| / ||ref||. With `size` (the magnitude a random-sign sum of the same terms
    has, elementwise: see check_against_reference) the denominator is at least
    CANCELLATION_FLOOR * ||size||: a result whose terms cancelled to far below their own size
    carries the rounding error of those terms, which no float32 sum avoids (eager's neither).
    Only then does the floor engage; a tensor of many random sums never cancels that far."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    if size is not None:
        denom = max(denom, CANCELLATION_FLOOR * size.double().norm().item())
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


# A single sum of 65 random terms lands below 1/8 of its typical size about one time in ten.
CANCELLATION_FLOOR = 1 / 8


def assert_close_rel(out, ref, dtype, what="", size=None, tol=None):
    """Within REL_TOL[dtype] of the reference, or `tol` where the arithmetic is coarser than the
    dtype's own (TF32 in float32: 1e-3)."""
    tol = REL_TOL[dtype] if tol is None else tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref, size)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"
    # Element by element too: in a norm over N elements one wrong element weighs 1/sqrt(N), so
    # at half precision's 1e-2 a wrong corner of a large output would pass. Each element within
    # tol of its own size (its terms' random-sign sum, else the reference's RMS), plus the
    # dtype's smallest normal for results that underflow to subnormals.
    out, ref = out.double(), ref.double()
    scale = ref.abs() + (size.double() if size is not None
                         else ref.norm() / max(1, ref.numel()) ** 0.5)
    bad = ((out - ref).abs() > tol * scale + torch.finfo(dtype).smallest_normal) | \
        (out.isnan() != ref.isnan())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more "
                           f"than {tol:g} of their size ({dtype})")


def strided_like(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t`, laid out non-contiguously (a fresh leaf when t is one)."""
    if how == "contiguous":
        out = t.detach().clone()
    elif how == "transposed":  # column-major last two dims (or a strided 1-d view)
        if t.dim() >= 2:
            out = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
        else:
            out = t.detach().repeat_interleave(2)[::2]
    elif how == "sliced":  # every other element of a wider buffer, offset by one
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1::2] = t.detach()
        out = wide[..., 1::2]
    elif how == "padded":  # rows 8 elements further apart than their width, as a split's views
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype, device=t.device)
        wide[..., :t.shape[-1]] = t.detach()
        out = wide[..., :t.shape[-1]]
    elif how == "offset":  # unit column stride, but starting one element into a wider buffer
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1:] = t.detach()
        out = wide[..., 1:]
    else:
        raise ValueError(how)
    assert torch.equal(out, t.detach())
    return out.requires_grad_(t.requires_grad)


@dataclasses.dataclass
class Sample:
    """One call of the op family: both public functions map onto it."""

    inputs: List[torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    relu: bool
    order: str  # relu_add / add_relu (only meaningful with a residual and ReLU)
    name: str

    @property
    def concat(self) -> bool:
        return self.residual is None and (len(self.inputs) > 1 or not self.relu)

    def tensors(self):
        return [*self.inputs, self.weight] + [t for t in (self.bias, self.residual) if t is not None]

    def call(self, api, *tensors):
        """Run through `api` (fusedskip or fusedskip.reference) with `tensors` in tensors() order."""
        n = len(self.inputs)
        inputs, weight, rest = list(tensors[:n]), tensors[n], list(tensors[n + 1:])
        bias = rest.pop(0) if self.bias is not None else None
        residual = rest.pop(0) if self.residual is not None else None
        if self.concat:
            return api.linear_concat(inputs, weight, bias, activation="relu" if self.relu else None)
        return api.linear_relu_residual(inputs[0], weight, bias, residual, order=self.order)

    def op_args(self):
        """Arguments of torch.ops.fusedskip.fused_linear."""
        return (self.inputs, self.weight, self.bias, self.residual, self.relu,
                self.order == "add_relu")


def make_sample(widths, out_features, leading, *, bias=True, residual=None, relu=True,
                layout="contiguous", dtype=torch.float64, device="cpu", requires_grad=True,
                generator=None) -> Sample:
    def rand(*shape):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(device, dtype)
        return t

    inputs = [strided_like(rand(*leading, w), layout).requires_grad_(requires_grad) for w in widths]
    weight = (rand(out_features, sum(widths)) / max(1, sum(widths)) ** 0.5)
    weight.requires_grad_(requires_grad)
    b = rand(out_features).requires_grad_(requires_grad) if bias else None
    if residual is not None and not relu:
        # Sample.call goes through the public API, whose residual forms always have a ReLU.
        raise ValueError("make_sample: a residual needs relu=True")
    r = None
    if residual is not None:
        r = strided_like(rand(*leading, out_features), layout).requires_grad_(requires_grad)
    name = (f"w{list(widths)}-n{out_features}-lead{list(leading)}-{'bias' if bias else 'nobias'}-"
            f"{residual or 'nores'}-{'relu' if relu else 'linear'}-{layout}")
    return Sample(inputs, weight, b, r, relu, residual or "relu_add", name)


def sample_grid(dtype=torch.float64, device="cpu", requires_grad=True, small=False):
    """Every form: bias or not; residual none / relu_add / add_relu; concat of 1-4 inputs with
    odd widths, with and without ReLU, bias or not; leading dims (), (5,), (2, 3); non-contiguous
    layouts."""
    generator = torch.Generator().manual_seed(SEED)
    samples = []
    for bias, residual in itertools.product((True, False), (None, "relu_add", "add_relu")):
        samples.append(make_sample([7], 6, (5,), bias=bias, residual=residual, dtype=dtype,
                                   device=device, requires_grad=requires_grad,
                                   generator=generator))
    for widths, relu, bias in itertools.product(([3], [1, 3], [1, 3, 7], [1, 3, 7, 13]),
                                                (True, False), (True, False)):
        samples.append(make_sample(widths, 5, (4,), bias=bias, relu=relu, dtype=dtype,
                                   device=device, requires_grad=requires_grad,
                                   generator=generator))
    layouts = ("transposed", "sliced")
    leadings = ((), (2, 3)) if small else ((), (2, 3), (0,))
    for leading, layout in itertools.product(leadings, layouts):
        samples.append(make_sample([3], 9, leading, residual="add_relu", layout=layout,
                                   dtype=dtype, device=device, requires_grad=requires_grad,
                                   generator=generator))
        samples.append(make_sample([2, 5], 9, leading, layout=layout, dtype=dtype, device=device,
                                   requires_grad=requires_grad, generator=generator))
    return samples


def ids(samples):
    return [s.name for s in samples]


def unpack_mask(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """The op's packed ReLU mask (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :cols].bool()


# add_relu's residual gradient is the output gradient G through the mask. The native backward
# stores it from the loads of one of its problems, the first asked for that has tiles: an
# input's gradient (G read as A, again for every column tile of the input), the weight's (G^T as
# A, again for every column tile; split over rows) or the bias's (G as B). Each element must be
# stored exactly once, as the element-wise pass would: a select, so a NaN or Inf where the ReLU
# was off gives 0, and passes where it was on. Only where no GEMM asked for reads G (the blocks
# asked for are 0 wide) does the pass write it. Run under the backend that reaches the native
# kernel on `device` (cuda_emulation on a CPU). `wanted`: the gradients of the inputs, the weight
# and the bias besides the residual's.
MASKED_GRADIENT_CASES = {  # id: (input widths, wanted)
    "input": ([70], (True, False, False)),
    "weight": ([70], (False, True, False)),
    "bias": ([70], (False, False, True)),
    "0-wide-input": ([0, 70], (True, False, False, False)),
    "weight-of-0-wide-and-70": ([0, 70], (False, False, True, False)),
    "all-of-0-wide-and-70": ([0, 70], (True, True, True, True)),
}


def check_native_backward_stores_masked_gradient(case: str, dtype, device: str) -> None:
    widths, wanted = MASKED_GRADIENT_CASES[case]
    generator = torch.Generator().manual_seed(SEED)
    rows, cols = 1500, 130  # split-K over the rows; 2 and 3 tiles of 64 across

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    xs, w, r = [rand(rows, k) for k in widths], rand(cols, sum(widths)), rand(rows, cols)
    _, mask = torch.ops.fusedskip.fused_linear(xs, w, None, r, True, True)
    grad = rand(cols, rows).t()  # column-major: read through any strides
    grad[::7, ::5] = float("nan")
    grad[3::11, 1::3] = float("-inf")
    active = unpack_mask(mask, cols)
    special = ~torch.isfinite(grad)
    assert bool((special & active).any()) and bool((special & ~active).any())
    if device == "cuda":
        poison_allocator()
    passes = fusedskip._ops._C._backward_pass_runs()
    *_, grad_preact = torch.ops.fusedskip.fused_linear_backward(grad, xs, w, mask, True,
                                                                [*wanted, True])
    kernel_reads_g = wanted[-1] or any((want or wanted[-2]) and k > 0
                                       for want, k in zip(wanted, widths))
    assert (fusedskip._ops._C._backward_pass_runs() == passes) == kernel_reads_g
    expected = torch.where(active, grad, torch.zeros((), dtype=dtype, device=device))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert grad_preact.shape == expected.shape
    assert torch.equal(grad_preact.contiguous().view(bits), expected.contiguous().view(bits))


def assert_mask_matches_sign(active, exact, dtype, what="", tol=None) -> None:
    """The op's ReLU mask (unpacked: `active`) is the float64 pre-activation's sign, except
    within rounding of zero (tol of the largest |pre-activation|), where a low-precision
    computation may land on either side. A gradient reference built from the op's own mask
    trusts that mask: this is what checks it."""
    tol = REL_TOL[dtype] if tol is None else tol
    near_zero = exact.abs() <= tol * exact.abs().max().clamp_min(1e-30)
    wrong = (active != (exact > 0)) & ~near_zero
    assert not wrong.any(), f"{what}: {int(wrong.sum())} mask bits wrong"


def check_against_reference(sample: Sample, dtype, tol=None) -> None:
    """Output and the gradient of every tensor that requires one, against float64, by relative
    error.

    In low precision a pre-activation within rounding of zero may land on the other side of the
    ReLU; the gradient there legitimately differs by a whole term. So: (1) the op's mask must
    match the float64 sign wherever |pre-activation| is above rounding level, and (2) given that
    mask, the gradients must match a float64 reference that uses it. `tol` as in
    assert_close_rel."""
    import torch.nn.functional as F

    tensors = sample.tensors()
    on_cuda = tensors[0].is_cuda
    if on_cuda:
        poison_allocator()
    poisoned = contextlib.nullcontext if on_cuda else new_memory_is_nan
    with poisoned():
        out = sample.call(fusedskip, *tensors)
    assert out.dtype == dtype
    ref64 = [t.detach().double().requires_grad_() for t in tensors]
    # Every output and gradient element is a sum of terms; the same computation on the squared
    # leaves (and squared output gradient) gives the sum of the squared terms, whose root is the
    # size of that sum had its terms random signs: the scale of its rounding error.
    squares = [t.detach().double().square().requires_grad_() for t in tensors]
    assert_close_rel(out, sample.call(fusedskip.reference, *ref64), dtype, f"{sample.name} output",
                     size=sample.call(fusedskip.reference, *squares).detach().sqrt(), tol=tol)
    # The gradients of the tensors that require one (each backward computes only those).
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not wanted:
        return
    if out.numel() == 0:
        # Nothing to sum: every gradient is zeros (the weight's and bias's over no rows, the
        # inputs' through no outputs), which must still be written.
        if on_cuda:
            poison_allocator()
        with poisoned():
            grads = torch.autograd.grad(out, [tensors[i] for i in wanted], torch.zeros_like(out))
        for i, g in zip(wanted, grads):
            assert g.shape == tensors[i].shape and bool((g == 0).all()), \
                f"{sample.name} grad {i}: {g}"
        return

    n = len(sample.inputs)
    active = None
    if sample.relu:
        if on_cuda:  # this mask is checked against the sign below: poisoned like the first
            poison_allocator()
        with torch.no_grad(), poisoned():
            _, mask = torch.ops.fusedskip.fused_linear(
                [x.detach() for x in sample.inputs], sample.weight.detach(),
                None if sample.bias is None else sample.bias.detach(),
                None if sample.residual is None else sample.residual.detach(),
                True, sample.order == "add_relu")
        active = unpack_mask(mask, out.shape[-1]).reshape(out.shape)

    def graph(leaves):
        """The op in float64 with the ReLU taken from the op's own mask."""
        inputs, weight, rest = leaves[:n], leaves[n], list(leaves[n + 1:])
        bias = rest.pop(0) if sample.bias is not None else None
        residual = rest.pop(0) if sample.residual is not None else None
        preact = F.linear(torch.cat(inputs, -1), weight, bias)
        if residual is not None and sample.relu and sample.order == "add_relu":
            preact = preact + residual
        ref = preact if active is None else torch.where(active, preact, torch.zeros_like(preact))
        if residual is not None and not (sample.relu and sample.order == "add_relu"):
            ref = ref + residual
        return preact, ref

    preact, ref = graph(ref64)
    if sample.relu:
        assert_mask_matches_sign(active, preact.detach(), dtype, sample.name, tol)
    grad = torch.randn_like(ref).to(dtype)  # both sides see the same (rounded) output gradient
    if on_cuda:  # the gradients are allocated now, after the reference's tensors came and went
        poison_allocator()
    with poisoned():
        grads = torch.autograd.grad(out, [tensors[i] for i in wanted], grad)
    grad = grad.double()
    sizes = torch.autograd.grad(graph(squares)[1], [squares[i] for i in wanted], grad.square())
    ref_grads = torch.autograd.grad(ref, [ref64[i] for i in wanted], grad)
    for i, g, rg, size in zip(wanted, grads, ref_grads, sizes):
        assert g.dtype == dtype
        assert_close_rel(g, rg, dtype, f"{sample.name} grad {i}", size=size.sqrt(), tol=tol)
