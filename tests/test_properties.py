"""Property-based tests: random shapes (inputs 0 wide among them), layouts, dtypes, options,
backends and sets of wanted gradients against the float64 reference. Bounded for the default
suite; FUSEDSKIP_FUZZ_EXAMPLES=N runs a longer fuzz (docs/RELIABILITY.md)."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedskip
from conftest import Sample, check_against_reference, requires_cuda, strided_like

EXAMPLES = int(os.environ.get("FUSEDSKIP_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@st.composite
def samples(draw, device):
    dtype = draw(st.sampled_from(DTYPES))
    count = draw(st.integers(1, 8))
    # An input 0 wide is a legal call (its gradient is empty; no kernel tile covers it).
    widths = draw(st.lists(st.one_of(st.just(0), st.integers(1, 300)), min_size=count,
                           max_size=count))
    # Keep the work small enough for the default suite (rows x K x N multiply-adds).
    total = sum(widths)
    out_features = draw(st.integers(1, max(1, min(300, 200_000 // max(1, total)))))
    max_rows = max(1, 60_000 // max(1, total * out_features) + 1)
    leading = draw(st.sampled_from([(), (0,), (1,), (draw(st.integers(0, min(max_rows, 70))),),
                                    (2, draw(st.integers(0, 5)))]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    bias = draw(st.booleans())
    concat = count > 1 or draw(st.booleans())
    relu = draw(st.booleans()) if concat else True
    residual = None if concat else draw(st.sampled_from([None, "relu_add", "add_relu"]))
    seed = draw(st.integers(0, 2**31 - 1))

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device, dtype)

    # Which gradients are asked for: each backward computes only those (a frozen weight, a
    # residual stream that wants none, ...).
    wants = draw(st.lists(st.booleans(), min_size=count + 3, max_size=count + 3))
    inputs = [strided_like(rand(*leading, w), layout).requires_grad_(want)
              for w, want in zip(widths, wants)]
    weight = (rand(out_features, total) / max(1, total) ** 0.5).requires_grad_(wants[count])
    b = rand(out_features).requires_grad_(wants[count + 1]) if bias else None
    r = (strided_like(rand(*leading, out_features), layout).requires_grad_(wants[count + 2])
         if residual else None)
    name = f"{dtype} widths={widths} N={out_features} lead={leading} {layout} bias={bias} " \
           f"relu={relu} residual={residual} wants={wants}"
    sample = Sample(inputs, weight, b, r, relu, residual or "relu_add", name)
    return sample, dtype


@FUZZ
@given(samples(device="cpu"), st.sampled_from(["auto", "native", "gemm_epilogue",
                                               "cuda_emulation"]))
def test_random_calls_match_reference_cpu(case, backend):
    sample, dtype = case
    with fusedskip.use_backend(backend):
        check_against_reference(sample, dtype)


@requires_cuda
@FUZZ
@given(samples(device="cuda"), st.sampled_from(["auto", "native", "gemm_epilogue", "cutlass"]))
def test_random_calls_match_reference_cuda(case, backend):
    sample, dtype = case
    with fusedskip.use_backend(backend):
        check_against_reference(sample, dtype)
