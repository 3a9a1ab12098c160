"""Property-based tests: random shapes (inputs 0 wide among them), layouts, dtypes, options,
backends and sets of wanted gradients against the float64 reference; and fuse() on random
models against the models themselves. Bounded for the default suite; FUSEDSKIP_FUZZ_EXAMPLES=N
runs a longer fuzz (docs/RELIABILITY.md)."""

import os

import torch
from hypothesis import HealthCheck, event, given, settings
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


# fuse() on random models: a program of linears (some called twice), ReLUs in every spelling
# (in place too), adds in every spelling (in place too), concatenations, scalings and views over
# the values computed so far, a value used any number of times. Whatever fuse() fuses or skips,
# the fused model must compute what the model does, forward and backward, also at a batch size
# other than the example's.

RELUS = ["torch.relu", "F.relu", "module", "method", "F.relu_inplace", "method_inplace",
         "module_inplace", "torch.relu_"]
ADDS = ["+", "reversed +", "torch.add", "+="]


class ProgramModel(torch.nn.Module):
    def __init__(self, program, linears, relus):
        super().__init__()
        self.program = program
        self.linears = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=b) for i, o, b in linears)
        self.relus = torch.nn.ModuleList(torch.nn.ReLU(inplace=inplace) for inplace in relus)

    def extra_repr(self):  # what a failing example shows
        return f"program={self.program}, outputs={getattr(self, 'outputs', None)}"

    def forward(self, x):
        F = torch.nn.functional
        values = [x]
        for op, *args in self.program:
            if op == "linear":
                src, layer = args
                values.append(self.linears[layer](values[src]))
            elif op == "relu":
                src, spelling, module = args
                v = values[src]
                values.append(
                    torch.relu(v) if spelling == "torch.relu" else
                    F.relu(v) if spelling == "F.relu" else
                    v.relu() if spelling == "method" else
                    F.relu(v, inplace=True) if spelling == "F.relu_inplace" else
                    v.relu_() if spelling == "method_inplace" else
                    torch.relu_(v) if spelling == "torch.relu_" else
                    self.relus[module](v))
            elif op == "add":
                a, b, spelling = args
                if spelling == "+=":
                    v = values[a]
                    v += values[b]
                    values.append(v)
                else:
                    values.append(values[a] + values[b] if spelling == "+" else
                                  values[b] + values[a] if spelling == "reversed +" else
                                  torch.add(values[a], values[b]))
            elif op == "cat":
                sources, dim = args
                values.append(torch.cat([values[i] for i in sources], dim))
            elif op == "view":  # the first columns: a view, sharing the value's memory
                src, width = args
                values.append(values[src][..., :width])
            else:  # "scale": a use that no pattern takes
                values.append(values[args[0]] * 0.5)
        return tuple(values[i] for i in self.outputs)


@st.composite
def programs(draw):
    """(model, example input, another input): a ProgramModel in float64 and its inputs. Besides
    single steps, blocks in the shape of the patterns fuse() looks for (linear, ReLU, add; cat,
    linear, ReLU), which the steps around them may or may not leave fusable."""
    ndim = draw(st.sampled_from([2, 3]))
    widths = [draw(st.integers(1, 6))]
    program, linears, relus = [], [], []

    def value():
        return draw(st.integers(0, len(widths) - 1))

    def emit(step, width):
        program.append(step)
        widths.append(width)
        return len(widths) - 1

    def linear(src, out=None):
        same = [j for j, (i, o, _) in enumerate(linears)
                if i == widths[src] and out in (None, o)]
        if same and draw(st.booleans()):
            layer = draw(st.sampled_from(same))  # the same Linear called again
        else:
            if out is None:
                out = draw(st.one_of(st.sampled_from(widths), st.integers(1, 6)))
            linears.append((widths[src], out, draw(st.booleans())))
            layer = len(linears) - 1
        return emit(("linear", src, layer), linears[layer][1])

    def relu(src):
        spelling = draw(st.sampled_from(RELUS))
        if spelling.startswith("module"):
            relus.append(spelling == "module_inplace")
        return emit(("relu", src, spelling, len(relus) - 1), widths[src])

    def add(src, partner=None):
        if partner is None:
            partner = draw(st.sampled_from([j for j, w in enumerate(widths) if w == widths[src]]))
        return emit(("add", src, partner, draw(st.sampled_from(ADDS))), widths[src])

    def cat():
        sources = draw(st.lists(st.integers(0, len(widths) - 1), min_size=1, max_size=4))
        return emit(("cat", sources, draw(st.sampled_from([-1, ndim - 1]))),
                    sum(widths[i] for i in sources))

    def interlope():
        """Maybe a write in place into any value so far (the block's operands among them),
        between a block's steps: fuse() must not move a read of that value across it."""
        if draw(st.integers(0, 3)) == 0:
            src = value()
            if draw(st.booleans()):
                emit(("relu", src, draw(st.sampled_from(["F.relu_inplace", "method_inplace",
                                                         "torch.relu_"])), -1), widths[src])
            else:
                partner = draw(st.sampled_from([j for j, w in enumerate(widths)
                                                if w == widths[src]]))
                emit(("add", src, partner, "+="), widths[src])

    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["linear", "relu", "add", "cat", "scale", "view",
                                   "residual block", "concat block"]))
        if op == "linear":
            linear(value())
        elif op == "relu":
            relu(value())
        elif op == "add":
            add(value())
        elif op == "cat":
            cat()
        elif op == "scale":
            src = value()
            emit(("scale", src), widths[src])
        elif op == "view":
            src = value()
            width = draw(st.integers(1, widths[src]))
            emit(("view", src, width), width)
        elif op == "residual block":
            residual = value()
            out = linear(value(), widths[residual])
            interlope()
            if draw(st.booleans()):
                out = relu(out)
                interlope()
                add(out, residual)  # relu_add
            else:
                out = add(out, residual)
                interlope()
                relu(out)  # add_relu
        else:
            out = cat()
            interlope()
            out = linear(out)
            if draw(st.booleans()):
                interlope()
                relu(out)
    model = ProgramModel(program, linears, relus).double()
    last = len(widths) - 1
    model.outputs = sorted({last, *draw(st.lists(st.integers(0, last), max_size=2))})
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    lead = (3,) if ndim == 2 else (2, 3)
    other = (5,) if ndim == 2 else (1, 4)
    x, x2 = (torch.randn(*shape, widths[0], generator=generator, dtype=torch.float64)
             for shape in (lead, other))
    return model, x, x2


def _run(model, x):
    """What one call computes: {"no_grad": the outputs under torch.no_grad, "outputs" and
    "grads": the outputs and every parameter's gradient (None where forward leaves it alone) of a
    forward and backward}, the last two left out where autograd refused an in-place write (into
    what it saved, say: the fused model may save other tensors and need not raise)."""
    with torch.no_grad():
        results = {"no_grad": list(model(x.clone()))}
    for p in model.parameters():
        p.grad = None
    try:
        outputs = model(x.clone())
        loss = sum(o.square().sum() for o in outputs if o.requires_grad)
        if torch.is_tensor(loss):
            loss.backward()
    except RuntimeError as error:
        assert "inplace" in str(error) or "in-place" in str(error), error
        return results
    results.update(outputs=[o.detach() for o in outputs],
                   grads=[p.grad for p in model.parameters()])
    return results


@FUZZ
@given(programs())
def test_fuse_keeps_what_random_models_compute(case):
    model, x, x2 = case
    fused = fusedskip.fuse(model, example_inputs=(x.clone(),))
    report = fused.fuse_report
    event(f"fused {len(report.fused)} patterns")
    # The model's own parameters, in its order.
    assert list(map(id, fused.parameters())) == list(map(id, model.parameters())), str(report)
    for inputs in (x, x2):
        want = _run(model, inputs)
        got = _run(fused, inputs)
        for kind in want:
            assert kind in got, f"{kind}: the fused model raised where the model did not\n{report}"
            assert len(got[kind]) == len(want[kind]), kind
            for i, (g, w) in enumerate(zip(got[kind], want[kind])):
                assert (g is None) == (w is None), f"{kind} {i}\n{report}"
                if w is not None:
                    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12,
                                               msg=lambda m: f"{kind} {i}: {m}\n{report}\n"
                                                             f"{model.program}")
