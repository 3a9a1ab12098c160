"""The fused layers inside the tools models already use: torch.compile, DDP, CUDA graphs, FSDP2."""

import os
import queue
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedskip
from conftest import requires_cuda


class SkipModel(nn.Module):
    """Modules plus one functional call, so both entry points run under each integration."""

    def __init__(self, width=12):
        super().__init__()
        self.block = fusedskip.LinearReLUResidual(width, width)
        self.other = fusedskip.LinearReLUResidual(width, width, order="add_relu")
        self.merge = fusedskip.ConcatLinear([width, width], width, activation="relu")
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.block(x, residual=x)
        g = self.other(h, residual=x)
        m = self.merge(h, g)
        m = fusedskip.linear_relu_residual(m, self.merge.weight[:, :m.shape[-1]], None, m)
        return self.head(m)


def test_compile_of_modules_has_no_graph_breaks():
    torch.manual_seed(0)
    model = SkipModel()
    x = torch.randn(6, 12, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, x, y, state, result_path, done):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = SkipModel().double()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    half = x.shape[0] // world
    part = slice(rank * half, (rank + 1) * half)
    loss = nn.functional.mse_loss(ddp(x[part]), y[part])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_path)
    dist.barrier()
    done.put(rank)
    time.sleep(600)  # the test ends both ranks at once (see below)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_gloo_gradients_equal_single_process(tmp_path):
    torch.manual_seed(0)
    model = SkipModel().double()
    x = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    nn.functional.mse_loss(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    result = tmp_path / "grads.pt"
    context = mp.get_context("spawn")
    done = context.Queue()
    args = (2, free_port(), x, y, model.state_dict(), str(result), done)
    ranks = [context.Process(target=ddp_worker, args=(rank, *args)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        finished = set()
        deadline = time.monotonic() + 300
        while len(finished) < 2:
            exited = {rank: p.exitcode for rank, p in enumerate(ranks) if p.exitcode is not None}
            assert not exited, f"DDP rank(s) exited before finishing their step: {exited}"
            assert time.monotonic() < deadline, f"DDP ranks did not finish; done: {finished}"
            try:
                finished.add(done.get(timeout=1))
            except queue.Empty:
                pass
    finally:
        # Both ranks are killed together once both are past the step and the barrier. Tearing a
        # gloo group down one process at a time can abort the other (gloo throws in its I/O
        # thread when a connection closes under it): a crash of gloo's, not of the step.
        for process in ranks:
            process.kill()
        for process in ranks:
            process.join()
    got = torch.load(result)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12)


@requires_cuda
def test_cuda_graphed_training_step_matches_eager():
    torch.manual_seed(0)
    model = SkipModel().cuda()
    reference = SkipModel().cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(64, 12, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    for _ in range(3):
        x_new = torch.randn(64, 12, device="cuda", requires_grad=True)
        out = graphed(x_new)
        out.square().sum().backward()
        ref = reference(x_new.detach().requires_grad_())
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            p.grad = q.grad = None


@requires_cuda
def test_fsdp2_single_rank_runs():
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = SkipModel().cuda()
        reference = SkipModel().cuda()
        reference.load_state_dict(model.state_dict())
        fully_shard(model)
        x = torch.randn(32, 12, device="cuda")
        out = model(x)
        out.sum().backward()
        torch.testing.assert_close(out, reference(x))
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layer_class", [fusedskip.ConcatLinear,
                                         fusedskip.reference.ConcatLinear])
def test_fx_trace_of_concat_layer_checks_widths_when_the_graph_runs(layer_class):
    """torch.fx traces a bare ConcatLinear (whose *inputs it hands over as one value) and one
    inside a model that it traces through (FX leaves only torch.nn's modules whole). The graph
    computes what the layer does and, like the layer, refuses inputs of the wrong widths, also
    after dead-code elimination."""
    torch.manual_seed(0)
    layer = layer_class([3, 5], 4, activation="relu")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.merge = layer

        def forward(self, x, y):
            return self.merge(torch.tanh(x), y)

    model = Model()
    for module in (layer, model):
        graph_module = torch.fx.symbolic_trace(module)
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        x, y = torch.randn(7, 3), torch.randn(7, 5)
        torch.testing.assert_close(graph_module(x, y), module(x, y), rtol=0, atol=0)
        # The same total width, split otherwise: F.linear alone would take it.
        with pytest.raises(ValueError, match=r"inputs\[0\] has 2 features .* is 3"):
            graph_module(torch.randn(7, 2), torch.randn(7, 6))
        if module is layer:
            with pytest.raises(ValueError, match=r"expected 2 inputs .*got 1"):
                graph_module(torch.randn(7, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z_]*` is deprecated:FutureWarning")
def test_jit_trace_of_concat_layer_warns_nothing():
    """The width check compares sizes, which torch.jit.trace hands out as tensors; it feeds no
    value into the graph, so tracing it must not warn that the trace may be wrong."""
    layer = fusedskip.ConcatLinear([3, 5], 4)
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, (x, y))
    torch.testing.assert_close(traced(x, y), layer(x, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"inputs\[0\] has 4 features"):
        layer(torch.randn(2, 4), torch.randn(2, 4))


class _AddSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z_]*` is deprecated:FutureWarning")
def test_jit_trace_works_and_jit_script_refuses():
    """torch.jit.trace records the modules' computation; TorchScript cannot compile them (the
    README says so): it must raise, not produce something that computes otherwise."""
    torch.manual_seed(0)
    layer = fusedskip.LinearReLUResidual(6, 6, order="add_relu")
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    traced = torch.jit.trace(layer, (x, r))
    x2, r2 = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(traced(x2, r2), layer(x2, r2), rtol=0, atol=0)
    # With a message saying what to use instead, for the layers themselves and inside a model.
    for module in (layer, torch.nn.Sequential(fusedskip.ConcatLinear([2, 4], 6)),
                   fusedskip.reference.LinearReLUResidual(6, 6)):
        with pytest.raises(RuntimeError, match=r"does not support TorchScript .*torch\.compile"):
            torch.jit.script(module)
    # fuse()'s layers go by the public name, as in their repr.
    fused = fusedskip.fuse(_AddSkip(), example_inputs=(torch.randn(4, 6),))
    with pytest.raises(RuntimeError, match=r"fusedskip: LinearReLUResidual does not support"):
        torch.jit.script(fused)
