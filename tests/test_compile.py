"""torch.compile(fullgraph=True) and torch.export of models using the functional API: no graph
breaks, the compiled backward uses the fused backward op, same results as eager."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedskip
from conftest import CUDA_MARKS


class SkipBlock(nn.Module):
    def __init__(self, width=12):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)
        self.merge = nn.Linear(2 * width, width)

    def forward(self, x):
        h = fusedskip.linear_relu_residual(x, self.inner.weight, self.inner.bias, x)
        g = fusedskip.linear_relu_residual(h, self.outer.weight, self.outer.bias, x,
                                           order="add_relu")
        return fusedskip.linear_concat([h, g], self.merge.weight, self.merge.bias,
                                       activation="relu")


def eager_and_compiled(model, x, **compile_kw):
    compiled = torch.compile(model, fullgraph=True, **compile_kw)
    results = []
    for fn in (model, compiled):
        out = fn(x)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *model.parameters()])))
    return results


def test_no_graph_breaks():
    model = SkipBlock().double()
    explanation = torch._dynamo.explain(model)(torch.randn(5, 12, dtype=torch.float64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend):
    torch.manual_seed(0)
    model = SkipBlock().double()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    (out, grads), (cout, cgrads) = eager_and_compiled(model, x, backend=backend)
    torch.testing.assert_close(cout, out)
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g)


@pytest.mark.parametrize("frozen", [None, "weights", "input"])
def test_dynamic_shapes(frozen):
    """One graph for every batch size, whichever operands want gradients (what autograd saves
    must not fix a size), and the gradients are eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = SkipBlock()
    model.requires_grad_(frozen != "weights")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for rows in (3, 8, 17):
        x = torch.randn(2, rows, 12, requires_grad=frozen != "input")
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        wanted = [t for t in (x, *model.parameters()) if t.requires_grad]
        for got, want in zip(torch.autograd.grad(out.square().sum(), wanted),
                             torch.autograd.grad(model(x).square().sum(), wanted)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("frozen", [None, "weights", "input"])
def test_compiled_autograd_matches_eager(frozen, create_graph, device):
    """Compiled autograd traces the backward of an eager forward through the op's C++ autograd
    node into its graph (fullgraph: not run apart in eager), and the gradients are eager
    autograd's, first and (create_graph) second order."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SkipBlock().double().to(device)
    model.requires_grad_(frozen != "weights")
    x = torch.randn(7, 12, dtype=torch.float64, device=device, requires_grad=frozen != "input")
    wanted = [t for t in (x, *model.parameters()) if t.requires_grad]
    want = torch.autograd.grad(model(x).square().sum(), wanted, create_graph=create_graph)
    counter = CompileCounterWithBackend("aot_eager")
    loss = model(x).square().sum()
    with compiled_autograd._enable(torch.compile(backend=counter, fullgraph=True)):
        got = torch.autograd.grad(loss, wanted, create_graph=create_graph)
    code = "".join(graph.code for graph in counter.graphs)
    assert "FusedLinearFunction" in code and "run_non_traceable" not in code
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if create_graph:
        second = [torch.autograd.grad(sum(g.square().sum() for g in grads), wanted[-1])[0]
                  for grads in (got, want)]
        assert second[0].abs().sum() > 0
        torch.testing.assert_close(*second)


def test_vmap_compiles_with_dynamic_shapes():
    """vmap inside torch.compile(dynamic=True): the batched op (its ATen composite) checks its
    arguments and packs the mask on symbolic sizes (on plain ones it raised, and without
    fullgraph nothing was compiled), for batched inputs, a batched weight, add_relu's residual
    and a concat; one graph for every batch size and vmap size, eager's values and
    gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    vmap = torch.func.vmap

    def batched(xs, ws, rs):
        inputs = vmap(lambda x, r: fusedskip.linear_relu_residual(x, ws[0], None, r,
                                                                 order="add_relu"))(xs, rs)
        weights = vmap(lambda w: fusedskip.linear_concat([xs[0, :, :2], xs[0, :, 2:]], w,
                                                          activation="relu"))(ws)
        return inputs, weights

    compiled = torch.compile(batched, fullgraph=True, dynamic=True, backend=counter)
    # No size equal to another (dynamo's duck sizing would guard on that).
    for rows, batch, ensemble in ((4, 2, 3), (7, 9, 10), (11, 12, 13)):
        xs = torch.randn(batch, rows, 5, dtype=torch.float64, requires_grad=True)
        ws = torch.randn(ensemble, 6, 5, dtype=torch.float64, requires_grad=True)
        rs = torch.randn(batch, rows, 6, dtype=torch.float64)
        got, want = compiled(xs, ws, rs), batched(xs, ws, rs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(want[0], torch.relu(xs @ ws[0].T + rs))
        torch.testing.assert_close(want[1], torch.relu(xs[0] @ ws.transpose(1, 2)))
        loss = [sum(t.square().sum() for t in out) for out in (got, want)]
        for g, w in zip(torch.autograd.grad(loss[0], (xs, ws)),
                        torch.autograd.grad(loss[1], (xs, ws))):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1


def test_compiled_graphs_call_the_fused_ops():
    """The traced forward and backward graphs hold the fused ops, not a decomposition."""
    graphs = []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    model = SkipBlock()
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    x = torch.randn(4, 12, requires_grad=True)
    compiled(x).sum().backward()
    forward, backward = graphs
    assert forward.count("fusedskip.fused_linear.default") == 3
    assert backward.count("fusedskip.fused_linear_backward.default") == 3
    assert "aten.cat" not in forward and "aten.cat" not in backward


def test_export_runs():
    model = SkipBlock().eval()
    x = torch.randn(6, 12)
    exported = torch.export.export(model, (x,))
    assert "fusedskip.fused_linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_export_with_a_dynamic_batch_of_a_training_model():
    """Parameters that want gradients (a model in training) keep the batch dim dynamic."""
    model = SkipBlock()
    exported = torch.export.export(model, (torch.randn(6, 12),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    for rows in (1, 11):
        x = torch.randn(rows, 12)
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("form", ["relu_add", "concat"])
def test_flop_counter_counts_the_gemms_as_for_eager(form):
    """FlopCounterMode counts the fused op's GEMMs, forward and backward, as it counts eager's
    addmm / mm: the same total for the same layer."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 7, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    r = torch.randn(2, 7, 5)
    if form == "relu_add":
        fused = lambda: fusedskip.linear_relu_residual(x, w, b, r)  # noqa: E731
        eager = lambda: torch.relu(F.linear(x, w, b)) + r  # noqa: E731
    else:
        fused = lambda: fusedskip.linear_concat([x[..., :2], x[..., 2:]], w, b)  # noqa: E731
        eager = lambda: F.linear(torch.cat([x[..., :2], x[..., 2:]], -1), w, b)  # noqa: E731
    totals = []
    for fn in (fused, eager):
        with FlopCounterMode(display=False) as counter:
            fn().sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] == 3 * 2 * 14 * 6 * 5


@pytest.mark.parametrize("relu", [True, False])
def test_fake_kernels_give_the_real_shapes_at_every_width(relu):
    """The fake kernels against the real ones, output by output, at widths 1 to 17 (the mask's
    bytes per row step at every multiple of 8) and two inputs of odd widths."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def outputs(op_outputs):
        flat = []
        for t in op_outputs:
            flat += list(t) if isinstance(t, (list, tuple)) else [t]
        return [(tuple(t.shape), t.dtype) for t in flat]

    for cols in range(1, 18):
        xs = [torch.randn(3, 2), torch.randn(3, 3)]
        w, g = torch.randn(cols, 5), torch.randn(3, cols)
        wanted = [True] * (len(xs) + 3)
        out, mask = torch.ops.fusedskip.fused_linear(xs, w, None, None, relu, False)
        real = [(out, mask), torch.ops.fusedskip.fused_linear_backward(g, xs, w, mask, relu,
                                                                       wanted)]
        with FakeTensorMode() as mode:
            fxs, fw, fg, fmask = [mode.from_tensor(t) for t in xs], *(
                mode.from_tensor(t) for t in (w, g, mask))
            fake = [torch.ops.fusedskip.fused_linear(fxs, fw, None, None, relu, False),
                    torch.ops.fusedskip.fused_linear_backward(fg, fxs, fw, fmask, relu, wanted)]
        for r, f in zip(real, fake):
            assert outputs(r) == outputs(f), (cols, outputs(r), outputs(f))


def test_a_compiled_backward_with_the_weights_stand_in_takes_eagers_gemms():
    """No input wants a gradient, so the weight is saved for its shape only, and under compile
    as a stand-in of one element (csrc/autograd.cpp), whose zero strides sat on no 16-byte word:
    the weight gradient went over a transient cat instead of one GEMM per aligned block."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    a, b = torch.randn(256, 64), torch.randn(256, 64)
    w = torch.randn(32, 128, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)

    def layer(a, b, w, bias):
        return fusedskip.linear_concat([a, b], w, bias, activation="relu")

    ops, grads = {}, {}
    with fusedskip.use_backend("gemm_epilogue"):
        torch._dynamo.reset()
        for name, fn in (("eager", layer),
                         ("compiled", torch.compile(layer, backend="aot_eager", fullgraph=True))):
            out = fn(a, b, w, bias)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                grads[name] = torch.autograd.grad(out.sum(), [w, bias])
            names = [e.name for e in prof.events()]
            ops[name] = (names.count("aten::cat"), names.count("aten::mm"))
    assert ops["eager"] == ops["compiled"] == (0, 2), ops
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
