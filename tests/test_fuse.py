"""fuse(): finds the patterns, shares parameters, leaves outputs and gradients unchanged, and
skips (with a reason) what it cannot prove equal or cannot trace."""

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import fusedskip


class SeedMLP(nn.Module):
    """The seed question's model written with plain PyTorch: linear4 reads cat(h2, h3)."""

    def __init__(self):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(30, 10), nn.Linear(10, 15)
        self.linear3, self.linear4 = nn.Linear(15, 10), nn.Linear(25, 20)
        self.linear5 = nn.Linear(20, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        h1 = torch.relu(self.linear1(x))
        h2 = self.act(self.linear2(h1))
        h3 = F.relu(self.linear3(h2))
        return self.linear5(torch.relu(self.linear4(torch.cat([h2, h3], -1))))


class ResidualBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner, self.outer = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        y = torch.relu(self.inner(x)) + x          # relu_add
        return torch.add(self.outer(y), y).relu()  # add_relu


class ResidualMLP(nn.Module):
    def __init__(self, width=16, blocks=3):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.blocks(x))


class UNetMLP(nn.Module):
    def __init__(self, width=12):
        super().__init__()
        self.down1, self.down2 = nn.Linear(width, width), nn.Linear(width, width)
        self.up1, self.up2 = nn.Linear(2 * width, width), nn.Linear(2 * width, width)

    def forward(self, x):
        d1 = torch.relu(self.down1(x))
        d2 = torch.relu(self.down2(d1))
        u1 = torch.relu(self.up1(torch.cat([d2, d1], dim=-1)))
        return self.up2(torch.cat((u1, x), 1))


def check_equal(model, x, fused):
    for m in (model, fused):
        for p in m.parameters():
            p.grad = None
    out, ref = fused(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}  # None: forward leaves it alone
    for p in model.parameters():
        p.grad = None
    ref.square().sum().backward()
    for n, p in model.named_parameters():
        assert (grads[n] is None) == (p.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-12)


def fuse_in_float64(make, *shape):
    """A model from `make` in float64, a random input of `shape`, and fuse() of the model with
    that input as its example."""
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    return model, x, fusedskip.fuse(model, example_inputs=(x,))


@pytest.mark.parametrize("make,patterns", [
    (SeedMLP, ["Linear -> ReLU"] * 3 + ["cat -> Linear -> ReLU"]),
    (ResidualMLP, ["Linear -> ReLU -> add", "Linear -> add -> ReLU"] * 3),
    (UNetMLP, ["Linear -> ReLU"] * 2 + ["cat -> Linear -> ReLU", "cat -> Linear"]),
])
def test_fuses_standard_models(make, patterns):
    torch.manual_seed(0)
    model = make().double()
    width = 30 if make is SeedMLP else 16 if make is ResidualMLP else 12
    x = torch.randn(7, width, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    report = fused.fuse_report
    assert sorted(p for _, p, _ in report.fused) == sorted(patterns), str(report)
    assert not report.skipped, str(report)
    kinds = (fusedskip.LinearReLUResidual, fusedskip.ConcatLinear)
    assert sum(isinstance(m, kinds) for m in fused.modules()) == len(patterns)
    # parameters are shared, not copied
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in fused.parameters()} <= model_params
    check_equal(model, x, fused)


def test_without_example_inputs_shape_patterns_are_skipped():
    model = ResidualMLP().double()
    fused = fusedskip.fuse(model)
    report = fused.fuse_report
    assert [p for _, p, _ in report.fused] == ["Linear -> ReLU"] * 3
    assert all("example_inputs" in why for _, why in report.skipped)
    check_equal(model, torch.randn(3, 16, dtype=torch.float64), fused)


def test_broadcast_residual_and_shared_outputs_are_not_fused():
    class Awkward(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.bias = nn.Parameter(torch.randn(6))

        def forward(self, x):
            pre = self.a(x)
            y = torch.relu(pre) + self.bias      # broadcast residual: not fused
            z = self.b(y)
            return torch.relu(z) + z              # pre-activation used twice: not fused

    model = Awkward().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    report = fused.fuse_report
    assert [p for _, p, _ in report.fused] == ["Linear -> ReLU"]
    reasons = " ".join(why for _, why in report.skipped)
    assert "broadcasting is not fused" in reasons and "several users" in reasons
    check_equal(model, x, fused)


def test_untraceable_model_comes_back_unchanged():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value: FX cannot trace it
                return torch.relu(self.linear(x))
            return x

    model = DataDependent()
    before = copy.deepcopy(model.state_dict())
    out = fusedskip.fuse(model)
    assert out is model
    assert not out.fuse_report.traced and "not traceable" in str(out.fuse_report)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_fused_model_compiles_and_exports():
    torch.manual_seed(0)
    model = UNetMLP()
    x = torch.randn(5, 12)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    exported = torch.export.export(fused, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_fuse_example_runs():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "fuse_existing_model.py")
    from conftest import checkout_env

    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                            env=checkout_env())
    assert result.returncode == 0, result.stderr
    assert "4 fused, 0 skipped" in result.stdout
    assert "outputs equal: True; parameters shared with the original: True" in result.stdout


def test_the_report_survives_deepcopy_and_pickle():
    import pickle

    fused = fusedskip.fuse(ResidualMLP(), example_inputs=(torch.randn(2, 16),))
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert str(copied.fuse_report) == str(fused.fuse_report)


def test_state_dict_keys_are_the_models():
    torch.manual_seed(0)
    for make, width in ((SeedMLP, 30), (ResidualMLP, 16), (UNetMLP, 12)):
        model = make()
        fused = fusedskip.fuse(model, example_inputs=(torch.randn(3, width),))
        assert fused.fuse_report.fused
        assert list(fused.state_dict()) == list(model.state_dict())
        fused.load_state_dict(model.state_dict())
        model.load_state_dict(fused.state_dict())


def test_a_linear_called_twice_keeps_its_name_for_the_unfused_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 5)

        def forward(self, x):
            return self.linear(torch.relu(self.linear(x)) + x)

    model = Shared().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]
    # The fused call runs the layer's function on the Linear's own parameters: no second name.
    assert isinstance(fused.linear, nn.Linear) and fused.linear.weight is model.linear.weight
    assert list(fused.state_dict()) == list(model.state_dict())
    called = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert sys.modules["fusedskip.fuse"]._relu_residual in called
    check_equal(model, x, fused)


class WithMoreThanForward(nn.Module):
    """State forward never reads: a head, a parameter and buffers other methods use, a plain
    attribute, and a non-persistent buffer; forward also makes a tensor constant."""

    def __init__(self):
        super().__init__()
        self.aux_head = nn.Linear(8, 3)
        self.body = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # blocks.1: unused
        self.num_classes = 3

    def forward(self, x):
        h = torch.relu(self.body(x)) + x
        return torch.relu(self.blocks[0](h)) + torch.tensor([1.0], dtype=torch.float64)

    def aux(self, x):
        return self.aux_head(x) * self.scale


def test_state_forward_leaves_alone_is_kept():
    """parameters(), buffers() and state_dict() are the model's, names and order, including
    what forward never reads; so an optimizer gets every parameter and checkpoints load both
    ways, strictly. Through deepcopy and pickle too."""
    import pickle

    torch.manual_seed(0)
    model = WithMoreThanForward().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert len(fused.fuse_report.fused) == 2
    for copied in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(copied).__name__ == "WithMoreThanForward"
        assert list(copied.state_dict()) == list(model.state_dict())
        assert [n for n, _ in copied.named_parameters()] == \
            [n for n, _ in model.named_parameters()]
        # The model's buffers only: the graph's tensor constant is a plain tensor.
        assert [n for n, _ in copied.named_buffers()] == ["steps", "scratch"]
        assert copied._tensor_constant0.dtype == torch.float64
        assert copied.num_classes == 3
        copied.load_state_dict(model.state_dict())
        model.load_state_dict(copied.state_dict())
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    # Shared with the model, not copied.
    assert fused.aux_head.weight is model.aux_head.weight and fused.scale is model.scale
    assert fused.get_submodule("blocks.1") is model.blocks[1] and fused.steps is model.steps
    check_equal(model, x, fused)


def test_a_shallow_copy_and_a_module_under_two_names_keep_the_state():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a  # one module, two names; forward calls it by the second
            self.unused = nn.Linear(8, 2)

        def forward(self, x):
            return torch.relu(self.b(x)) + x

    model = Aliased()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert fused.fuse_report.fused
    for copied in (fused, copy.copy(fused), copy.deepcopy(fused)):
        assert type(copied).__name__ == "Aliased" and copied.fuse_report is not None
        assert copied.a is copied.b  # still one module
        assert [n for n, _ in copied.named_modules()] == [n for n, _ in model.named_modules()]
        assert list(copied.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(copy.copy(fused)(x), model(x))


def test_a_plain_tensor_the_model_moves_itself_follows_the_fused_models_moves():
    """A model whose _apply converts a plain cache too (so it follows .to() while staying out
    of the state_dict): FX's plain container in its place has no such _apply, so the cache
    stays the buffer FX made of it, out of the state_dict, and follows .double()."""

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.proj = torch.randn(8, 8)  # a plain attribute the model's _apply converts

        def _apply(self, fn, recurse=True):
            super()._apply(fn, recurse)
            self.proj = fn(self.proj)
            return self

        def forward(self, x):  # and a constant made in forward, which stays a plain tensor
            return (torch.relu(self.fc(x)) + x) @ self.proj + torch.tensor([1.0] * 8)

    model = Cached()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert fused.fuse_report.fused
    assert list(fused.state_dict()) == list(model.state_dict()) == ["fc.weight", "fc.bias"]
    assert [name for name, _ in fused.named_buffers()] == ["proj"]
    model.double(), fused.double()
    assert fused.proj.dtype == model.proj.dtype == torch.float64
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    copied = copy.deepcopy(fused)
    assert list(copied.state_dict()) == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


def test_a_model_that_only_wraps_to_keeps_its_plain_tensors_plain():
    """Overriding .to()/.double() (to record the dtype, as Lightning's modules do) while
    calling nn.Module's: .to() leaves the model's plain tensors alone, so the fused model's
    stay plain too, and its buffers are the model's."""

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("scale", torch.ones(8))
            self.proj = torch.randn(8, 8)

        def to(self, *args, **kwargs):
            self.moved = True
            return super().to(*args, **kwargs)

        def double(self):
            self.moved = True
            return super().double()

        def forward(self, x):
            return (torch.relu(self.fc(x)) + x) * self.scale @ self.proj

    model = Recording()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert fused.fuse_report.fused
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in model.named_buffers()]
    fused.double()
    assert fused.proj is model.proj and model.proj.dtype == torch.float32


def test_every_module_keeps_the_models_mode_through_fuse_copies_and_pickle():
    """FX makes the containers it traces through anew, in train mode: an eval model's fused
    model, and copies of a fused model put in eval mode, must have no module in train mode."""
    import io
    import pickle

    model = nn.Sequential(nn.Sequential(ResidualBlock(8), ResidualBlock(8)),
                          nn.Linear(8, 2)).eval()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert fused.fuse_report.fused

    def saved_and_loaded(m):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for mode in (None, True, False):  # as fuse() made it from the eval model, then set
        if mode is not None:
            fused.train(mode)
        mode = bool(mode)
        for made in (fused, copy.copy(fused), copy.deepcopy(fused),
                     pickle.loads(pickle.dumps(fused)), saved_and_loaded(fused)):
            assert {n: m.training for n, m in made.named_modules()} == \
                {n: mode for n, _ in model.named_modules()}


def test_a_plain_tensor_forward_reads_stays_a_plain_tensor():
    """FX makes a buffer of a tensor attribute forward reads; the model's .to() and .half()
    leave a plain tensor alone, so the fused model's must too (here the scale stays float32
    after .double()), and buffers() must be the model's."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.scale = torch.full((8,), 0.5)  # a plain attribute, not a buffer

        def forward(self, x):
            return (torch.relu(self.fc(x)) + x) * self.scale

    model = Scaled()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert fused.fuse_report.fused
    for copied in (fused, copy.deepcopy(fused)):
        assert list(copied.named_buffers()) == [] and copied.scale.dtype == torch.float32
    model.double(), fused.double()
    assert fused.scale is model.scale and model.scale.dtype == torch.float32
    x = torch.randn(4, 8, dtype=torch.float64)
    assert fused(x).dtype == model(x).dtype == torch.float64
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class Holding(nn.Module):
    """A fusable model holding `name` as a module, a parameter or a buffer, which forward uses
    (the module as the pattern's Linear) or not."""

    def __init__(self, name, kind, used=False):
        super().__init__()
        self.name, self.used = name, used
        self.body = nn.Linear(8, 8)
        if kind == "module":
            self.add_module(name, nn.Linear(8, 8))
        elif kind == "buffer":
            self.register_buffer(name, torch.ones(1))
        else:
            self.register_parameter(name, nn.Parameter(torch.ones(1)))

    def forward(self, x):
        if not self.used:
            return torch.relu(self.body(x)) + x
        held = getattr(self, self.name)
        if isinstance(held, nn.Module):
            return torch.relu(held(x)) + x
        return torch.relu(self.body(x)) + x * held


class CustomState(nn.Module):
    """A block that saves extra state of its own, which FX's container in its place would not."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.linear(x)) + x

    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


@pytest.mark.parametrize("case", ["meta-module", "graph-parameter", "code-module",
                                  "code-module-used", "code-parameter-used", "graph-buffer-used",
                                  "meta-buffer-used", "extra-state", "state-dict-hook"])
def test_state_the_fused_model_could_not_hold_leaves_the_model_unchanged(case):
    """Rather than a fused model whose state_dict is not the model's: the model itself, with
    the reason."""
    if case == "extra-state":
        model, why = nn.Sequential(CustomState()), "saves or loads its state its own way"
    elif case == "state-dict-hook":
        model, why = Holding("head", "module"), "_load_state_dict_pre_hooks"
        model.register_load_state_dict_pre_hook(lambda *args: None)
    else:
        name, kind, *used = case.split("-")
        model = Holding(name, kind, used=bool(used))
        why = f"the model's {name} has the name of an attribute"
    before = list(model.state_dict())
    out = fusedskip.fuse(model, example_inputs=(torch.randn(4, 8),))
    assert out is model and not out.fuse_report.traced and not out.fuse_report.fused
    assert why in str(out.fuse_report) and "model left unchanged" in str(out.fuse_report)
    assert list(model.state_dict()) == before


def test_a_module_with_its_own_state_is_fine_where_forward_leaves_it_alone():
    """Held whole (forward never traced into it), it saves its extra state as in the model."""
    model = ResidualMLP()
    model.extra = CustomState()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, 16),))
    assert fused is not model and fused.fuse_report.fused and fused.extra is model.extra
    assert list(fused.state_dict()) == list(model.state_dict())
    assert "extra._extra_state" in fused.state_dict()
    fused.load_state_dict(model.state_dict())


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, mask=None):
        h = torch.relu(self.linear(x)) + x
        if mask is not None:
            h = h * mask
        return h


def test_a_parameter_the_example_leaves_out_keeps_its_default():
    """A traced value is never None, so `if mask is not None:` would always take the branch: the
    fused model would fail, or compute the wrong branch, when called without `mask`. Left out of
    example_inputs (or with none), the parameter is fused at its default, and a call with it is
    refused, saying what to do; given in them, it is fused for calls with it."""
    torch.manual_seed(0)
    model = OptionalMask().double()
    x, mask = torch.randn(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64)
    for fused in (fusedskip.fuse(model, example_inputs=(x,)), fusedskip.fuse(model),
                  fusedskip.fuse(model, example_inputs=(x, None))):
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, mask=None), model(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="fused for calls without `mask`.*example_inputs"):
            fused(x, mask)
    assert fusedskip.fuse(model, example_inputs=(x,)).fuse_report.fused
    assert fusedskip.fuse(model, example_inputs=(x, None)).fuse_report.fused
    with_mask = fusedskip.fuse(model, example_inputs=(x, mask))
    assert with_mask.fuse_report.fused
    torch.testing.assert_close(with_mask(x, mask), model(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(with_mask(x, mask=mask), model(x, mask), rtol=0, atol=0)


def test_a_parameter_the_example_gives_is_asserted_given_and_kwargs_are_refused():
    """Given in example_inputs, an optional parameter is fused for calls with it: a call without
    it is refused (also after deepcopy and pickling), not run down the other branch. A
    positional-only one left out is fused at None as any other. **kwargs is refused: a trace
    cannot tell which it is given."""
    import pickle

    class PositionalOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x, bias=None, /):
            if bias is None:
                return torch.relu(self.linear(x)) + x
            return F.linear(x, self.linear.weight, bias)

    class Kwargs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x, **kwargs):
            h = torch.relu(self.linear(x)) + x
            return h if kwargs.get("mask") is None else h * kwargs["mask"]

    torch.manual_seed(0)
    x, mask = torch.randn(4, 8), torch.rand(4, 8)
    model = OptionalMask()
    fused = fusedskip.fuse(model, example_inputs=(x, mask))
    for copied in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        torch.testing.assert_close(copied(x, mask), model(x, mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match="fused for calls with `mask`"):
            copied(x)
    model = PositionalOnly()
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert fused.fuse_report.fused
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused for calls without `bias`"):
        fused(x, torch.randn(8))
    model = Kwargs()
    out = fusedskip.fuse(model, example_inputs=(x,))
    assert out is model and "**kwargs" in str(out.fuse_report)


def test_a_write_into_the_residual_after_the_add_stops_add_relu():
    """relu(h + r) with r written in place after the add: the fused layer, where the ReLU was,
    would read the written r."""

    class WriteAfterAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.shortcut = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x, y):
            h = self.fc(x)
            r = self.shortcut(y)
            z = h + r
            side = self.act(r)  # writes r, after the add read it
            return torch.relu(z), side

    torch.manual_seed(0)
    model = WriteAfterAdd().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x, y))
    assert not fused.fuse_report.fused
    assert "act may write in place" in str(fused.fuse_report)
    for out, ref in zip(fused(x, y), model(x, y)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["**=", "//=", "%="])
def test_every_augmented_assignment_is_recorded_in_place(op):
    """`g **= 2` on an alias of h writes h (Python falls back to `g = g ** 2` on a value without
    __ipow__, which a graph recorded as a new tensor, leaving h as it was)."""

    class Explicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            h = self.linear(x)
            g = h
            if op == "**=":
                g **= 3
            elif op == "//=":
                g //= 3
            else:
                g %= 3
            return torch.relu(h) + x

    torch.manual_seed(0)
    model = Explicit().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_an_instance_forward_and_an_inconsistent_or_integer_linear_are_not_fused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.linear(x)) + x

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    patched = Block()
    patched.linear.forward = lambda t: F.linear(t, patched.linear.weight) * 2  # an adapter
    relu_patched = Block()
    relu_patched.act.forward = lambda t: t.clamp(min=-1)
    parametrized = Block()
    nn.utils.parametrizations.weight_norm(parametrized.linear)
    for model, why in ((patched, "the Linear's forward is set on the instance"),
                       (relu_patched, None),
                       (parametrized, "the Linear is parametrized")):
        fused = fusedskip.fuse(model, example_inputs=(x,))
        assert not fused.fuse_report.fused
        if why:  # reported, not passed over in silence
            assert why in str(fused.fuse_report), str(fused.fuse_report)
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    wide = Block()
    wide.linear.weight = nn.Parameter(torch.randn(4, 6))  # in_features still says 4
    report = str(fusedskip.fuse(wide, example_inputs=(torch.randn(3, 6),)).fuse_report)
    assert "weight has shape (4, 6), not (out_features, in_features) = (4, 4)" in report
    integer = Block()
    integer.linear.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    integer.linear.bias = nn.Parameter(torch.ones(4, dtype=torch.int64), requires_grad=False)
    report = str(fusedskip.fuse(integer, example_inputs=(torch.ones(3, 4, dtype=torch.int64),))
                 .fuse_report)
    assert "dtype torch.int64, not a floating-point one" in report


@pytest.mark.parametrize("write", ["append", "item"])
def test_what_forward_puts_into_a_list_or_dict_attribute_is_refused_and_undone(write):
    """`self.log.append(h)` or `self.stats["n"] += 1`: the graph records neither, and tracing
    ran them on the model (twice: both modes are traced). Refused, with the model as it was."""

    class Logging(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.log, self.stats = [], {"n": 0}

        def forward(self, x):
            h = torch.relu(self.linear(x)) + x
            if write == "append":
                self.log.append(h)
            else:
                self.stats["n"] += 1
            return h

    model = Logging()
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and not out.fuse_report.traced
    assert ("Logging.log" if write == "append" else "Logging.stats") in str(out.fuse_report)
    assert model.log == [] and model.stats == {"n": 0}


def test_a_forward_reading_the_grad_mode_is_refused():
    class GradModeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.linear(x)) + x
            return h * 2 if torch.is_grad_enabled() else h

    model = GradModeBranch()
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and "depends on the grad mode" in str(out.fuse_report)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("autocast_on", [False, True])
def test_a_forward_reading_the_autocast_state_is_refused(device, autocast_on):
    """Read on either device, whether or not autocast is on where fuse is called (on the CUDA by
    its flag alone: no GPU needed); the caller's autocast state is left as it was."""
    class AutocastBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.linear(x)) + x
            return h.float() * 2 if torch.is_autocast_enabled(device) else h

    model = AutocastBranch()
    torch.set_autocast_enabled(device, autocast_on)
    try:
        out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
        assert torch.is_autocast_enabled(device) == autocast_on
    finally:
        torch.set_autocast_enabled(device, False)
    assert out is model and "depends on the autocast state" in str(out.fuse_report)
    assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("reads", ["parameters", "buffers"])
def test_a_forward_computing_on_state_it_does_not_trace_is_refused(reads):
    """A loop over self.parameters() (or buffers()) hands forward the real tensors, which FX does
    not trace: what forward computes from them would be frozen into the graph (a regularisation
    term that then ignores every later optimiser step)."""
    class Regularised(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("scale", torch.ones(4, 4))

        def forward(self, x):
            tensors = self.parameters() if reads == "parameters" else self.buffers()
            penalty = sum(torch.mm(t, t.T).sum() for t in tensors if t.dim() == 2)
            return torch.relu(self.linear(x)) + x, penalty

    model = Regularised()
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and "freeze" in str(out.fuse_report), out.fuse_report


def test_the_autocast_trace_leaves_no_cast_copies_behind():
    """A cast made while autocast's flags are flipped for a trace is not left in its cache,
    where a later autocast region would use it after the tensor changed."""
    from fusedskip.fuse import _autocast_flipped
    w = torch.randn(4, 4, requires_grad=True)  # a leaf: autocast caches its casts
    x = torch.randn(3, 4)
    with _autocast_flipped():
        torch.mm(x, w)
    with torch.no_grad():
        w.mul_(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.mm(x, w)
    assert torch.equal(got, torch.mm(x.bfloat16(), w.detach().bfloat16()))


# torch's own spellings of the norms that update running statistics in place.
TORCH_NORMS = {
    "torch.batch_norm":
        lambda x, mean, var: torch.batch_norm(x, None, None, mean, var, True, 0.5, 1e-5, False),
    "torch.instance_norm":
        lambda x, mean, var: torch.instance_norm(x.t()[None], None, None, mean, var, True, 0.5,
                                                 1e-5, False),
    "torch.native_batch_norm":
        lambda x, mean, var: torch.native_batch_norm(x, None, None, mean, var, True, 0.5, 1e-5)[0],
    "aten.batch_norm":
        lambda x, mean, var: torch.ops.aten.batch_norm(x, None, None, mean, var, True, 0.5, 1e-5,
                                                       False),
    "aten.native_batch_norm.default":
        lambda x, mean, var: torch.ops.aten.native_batch_norm.default(x, None, None, mean, var,
                                                                      True, 0.5, 1e-5)[0],
}


class ReadsStateWrittenLater(nn.Module):
    """Between the Linear and the pattern's end, something writes a tensor the Linear read, in a
    way no in-place op in the graph shows: a BatchNorm updating the running mean the Linear read,
    an Embedding(max_norm) or F.embedding(max_norm=...) renormalising the weight it shares with
    the Linear, F.batch_norm (or torch's and ATen's own batch_norm, instance_norm, ...) updating
    the buffers it is given, a _foreach_ op writing a list
    holding the Linear's input, a LayerNorm's hook writing the input it shares with the Linear."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.fc = nn.Linear(4, 4, bias=case != "embedding")
        self.bn = nn.BatchNorm1d(4)
        self.emb = nn.Embedding(4, 4, max_norm=0.5)
        if case == "embedding":
            self.emb.weight = self.fc.weight
        self.norm = nn.LayerNorm(4)
        self.norm.register_forward_pre_hook(lambda module, args: args[0].mul_(0.5))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x, w):
        if self.case == "batchnorm":
            h, side = self.fc(self.bn.running_mean.expand(3, 4)), self.bn(w)
        elif self.case == "embedding":
            h, side = self.fc(x), self.emb(torch.tensor([0, 1]))
        elif self.case == "F.embedding":
            h, side = self.fc(x), F.embedding(torch.tensor([0, 1]), self.fc.weight, max_norm=0.5)
        elif self.case == "batch_norm":
            h = self.fc(self.mean.expand(3, 4))
            side = F.batch_norm(w, self.mean, self.var, training=True)
        elif self.case in TORCH_NORMS:  # builtins and aten ops: no signature, no (a!) in schemas
            h = self.fc(self.mean.expand(3, 4))
            side = TORCH_NORMS[self.case](w, self.mean, self.var)
        elif self.case == "hook":
            x = x * 1.0
            h, side = self.fc(x), self.norm(x)
        else:
            h = self.fc(x)
            side = torch._foreach_mul_([x], 2.0)
        return torch.relu(h) + w, side


@pytest.mark.parametrize("case", ["batchnorm", "embedding", "F.embedding", "batch_norm",
                                  *TORCH_NORMS, "foreach", "hook"])
def test_writes_no_in_place_op_shows_stop_fusion(case):
    torch.manual_seed(0)
    model = ReadsStateWrittenLater(case).double()
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fused = fusedskip.fuse(copy.deepcopy(model), example_inputs=(x.clone(), w))
    assert not fused.fuse_report.fused
    assert "may write in place between the Linear" in str(fused.fuse_report)
    out, ref = fused(x.clone(), w), model(x.clone(), w)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)


def test_unused_results_that_act_are_kept():
    """An in-place op or a buffer update whose result nobody reads still acts: fusing must keep
    it, even where nothing is fused."""

    class Acting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)
            self.register_buffer("seen", torch.zeros(4, dtype=torch.float64))

        def forward(self, x):
            h = self.a(x)
            self.act(h)                       # h is now relu(h)
            self.seen.copy_(h.detach().mean(0))
            g = self.b(h)
            F.relu(g, inplace=True)
            return g + h

    model, x, fused = fuse_in_float64(Acting, 6, 4)
    expected = model(x)
    seen = model.seen.clone()
    model.seen.zero_()
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.seen, seen, rtol=0, atol=0)


def test_a_chain_added_to_itself_is_not_taken_for_a_residual():
    class SelfAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            z = self.b(h + h)
            return torch.relu(z + z)

    model = SelfAdd().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU"]
    check_equal(model, x, fused)


@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
def test_residuals_that_broadcast_promote_or_are_sparse_are_not_fused(order):
    """The residual is checked against the linear's output, not the add's (which broadcasting or
    type promotion would make match), and for a dense layout (eager adds a sparse one)."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 5)

        def forward(self, x, r):
            y = self.linear(x)
            return torch.relu(y) + r if order == "relu_add" else torch.relu(y + r)

    model = Skip()
    x = torch.randn(3, 4)
    for r, why in ((torch.randn(2, 3, 5), "broadcasting is not fused"),
                   (torch.randn(3, 5, dtype=torch.float64), "dtype"),
                   (torch.randn(3, 5).to_sparse(), "sparse_coo tensor in the example")):
        fused = fusedskip.fuse(model, example_inputs=(x, r))
        report = fused.fuse_report
        assert why in " ".join(reason for _, reason in report.skipped), str(report)
        assert all(p == "Linear -> ReLU" for _, p, _ in report.fused), str(report)
        torch.testing.assert_close(fused(x, r), model(x, r))


def test_sparse_inputs_are_not_fused():
    """nn.Linear takes a sparse input, the fused layers do not: with an example that shows one,
    its pattern is left to eager."""

    class CatHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.head = nn.Linear(8, 3)

        def forward(self, x, y):
            return self.head(torch.cat([torch.relu(self.first(x)), y], -1))

    model = CatHead()
    args = (torch.randn(3, 4).to_sparse(), torch.randn(3, 4))
    fused = fusedskip.fuse(model, example_inputs=args)
    report = fused.fuse_report
    assert [name for name, _ in report.skipped] == ["first"], str(report)
    assert "sparse_coo tensor in the example" in report.skipped[0][1]
    assert [name for name, _, _ in report.fused] == ["head"], str(report)
    torch.testing.assert_close(fused(*args), model(*args))


def test_example_inputs_leave_the_model_state_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(8, 4) + 3,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class UsesFusedskip(nn.Module):
    """fusedskip's modules, reference modules and functional API, and a plain chain left to
    fuse()."""

    def __init__(self):
        super().__init__()
        self.a = fusedskip.LinearReLUResidual(4, 4)
        self.c = fusedskip.ConcatLinear([4, 4], 3, activation="relu")
        self.r = fusedskip.reference.LinearReLUResidual(3, 3, order="add_relu")
        self.w = nn.Parameter(torch.randn(3, 3))
        self.plain = nn.Linear(3, 3)

    def forward(self, x):
        h = self.a(x, residual=x)
        y = self.r(self.c(h, x), None)
        y = fusedskip.linear_relu_residual(y, self.w)
        y = fusedskip.linear_concat([y, y], torch.cat([self.w, self.w], 1))
        y = y + fusedskip.linear_concat(torch.cat([y, y], -1).chunk(2, -1), self.w.repeat(1, 2))
        return torch.relu(self.plain(y)) + y


def test_models_using_fusedskip_trace_and_fuse():
    """torch.fx records each fusedskip layer or function call as one node (the
    __torch_function__ protocol), so such models trace, fuse, and fuse again."""
    torch.manual_seed(0)
    model = UsesFusedskip().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {fusedskip.modules.linear_relu_residual_layer, fusedskip.modules.linear_concat_layer,
            fusedskip.reference.linear_relu_residual, fusedskip.linear_relu_residual,
            fusedskip.linear_concat} <= targets
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    calls = []
    model.a.register_forward_hook(lambda module, args, out: calls.append(module))
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert fused.fuse_report.traced
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]
    # fuse() keeps fusedskip's own layers whole, as torch.nn's: they run, hooks and all.
    assert {"a", "c"} <= {n.target for n in fused.graph.nodes if n.op == "call_module"}
    calls.clear()  # the shape run called the hook on its fake copy
    fused(x)
    assert calls == [model.a]
    again = fusedskip.fuse(fused, example_inputs=(x,))
    assert again.fuse_report.traced and not again.fuse_report.fused
    assert list(again.state_dict()) == list(model.state_dict())
    check_equal(model, x, again)


def test_the_model_itself_is_never_changed():
    """FX calls a TransformerEncoderLayer whole, so the GraphModule shares it with the model: a
    fused layer for its linear1 (called directly too) must not be installed inside it."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, dropout=0.0,
                                                  batch_first=True)

        def forward(self, x):
            y = self.enc(x)
            return F.relu(self.enc.linear1(y)) + y

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 3, 8)
    expected = model(x)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]
    assert type(model.enc.linear1) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(fused(x), expected)


def test_example_inputs_in_containers_and_data_dependent_shapes():
    """Tensors inside the example's dicts and lists are made fake too, and a shape that depends
    on the data (a boolean mask) does not stop the shape-dependent patterns."""

    class Batch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, batch):
            x = batch["x"][batch["keep"]]
            return F.relu(self.linear(x)) + x, torch.nonzero(x[:, 0] > 0)

    model = Batch().double()
    batch = {"x": torch.randn(5, 8, dtype=torch.float64),
             "keep": torch.tensor([True, False, True, True, False])}
    fused = fusedskip.fuse(model, example_inputs=(batch,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"], \
        str(fused.fuse_report)
    for got, want in zip(fused(batch), model(batch)):
        torch.testing.assert_close(got, want)


def test_sizes_the_data_decides_differently_are_not_taken_as_equal():
    class TwoMasks(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x, keep, keep_residual):
            return F.relu(self.linear(x[keep])) + x[keep_residual]

    x = torch.randn(4, 4)
    keep = torch.tensor([True, True, False, True])
    fused = fusedskip.fuse(TwoMasks(), example_inputs=(x, keep, keep.roll(1)))
    report = fused.fuse_report
    assert [p for _, p, _ in report.fused] == ["Linear -> ReLU"], str(report)
    assert "not provably the output's" in " ".join(why for _, why in report.skipped)


class InplaceReluOfTheInput(nn.Module):  # relu_add; the input is overwritten before the add
    def __init__(self):
        super().__init__()
        self.linear, self.act = nn.Linear(6, 6), nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 1.0
        h = torch.relu(self.linear(x))
        return h + self.act(x)


class ScaledInPlace(nn.Module):  # add_relu; the residual is scaled in place after the linear
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        x = x * 1.0
        h = self.linear(x)
        x.mul_(2)
        return torch.relu(h + x)


class ZeroedPart(nn.Module):  # a concatenated part zeroed between the cat and the linear
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, x):
        a = x * 1.0
        c = torch.cat([a, x], -1)
        a.zero_()
        return self.linear(c) + a.sum()


class PositionalInplace(nn.Module):  # inplace=True passed by position, between linear and ReLU
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        x = x * 1.0
        h = self.linear(x)
        F.hardtanh(x, -0.5, 0.5, True)
        return torch.relu(h + x)


@pytest.mark.parametrize("make", [InplaceReluOfTheInput, ScaledInPlace, ZeroedPart,
                                  PositionalInplace])
def test_in_place_writes_inside_a_pattern_stop_its_fusion(make):
    """The fused layer runs where the pattern's last node was: a write in between, to the input,
    a residual or a concatenated part, would change what it reads."""
    model, x, fused = fuse_in_float64(make, 5, 6)
    report = fused.fuse_report
    assert "may write in place" in " ".join(why for _, why in report.skipped), str(report)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    if make is ZeroedPart:  # a training graph too: the weight's gradient reads the cat
        check_equal(model, x, fused)


class WriteThroughAnAdapter(nn.Module):
    """A leaf whose forward is set on the instance returns a buffer, not its argument: a write
    into its result between the Linear and the ReLU writes what the Linear read."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.register_buffer("memory", torch.randn(5, 6))
        self.cache = nn.Identity()
        self.cache.forward = lambda t: self.memory

    def forward(self, x):
        t = self.cache(x * 1.0)  # before the Linear (between, it may write anything itself)
        h = self.linear(self.memory)
        t.mul_(2)  # exact, and undone below: every call sees the same memory
        y = torch.relu(h) + x
        t.div_(2)
        return y


class ParametrizedSideBranch(nn.Module):
    """A parametrized Linear's output is a new tensor like any Linear's: an in-place ReLU on it
    cannot reach what the other branch's pattern reads."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.side = nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))

    def forward(self, x):
        h = torch.relu(self.linear(x))
        g = self.side(x)
        g.relu_()
        return h + x + g


def test_what_a_patched_or_parametrized_leaf_returns():
    model, x, fused = fuse_in_float64(WriteThroughAnAdapter, 5, 6)
    assert not fused.fuse_report.fused, str(fused.fuse_report)
    assert "mul_ may write in place" in str(fused.fuse_report), str(fused.fuse_report)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    model, x, fused = fuse_in_float64(ParametrizedSideBranch, 5, 6)
    assert [(name, p) for name, p, _ in fused.fuse_report.fused] == [
        ("linear", "Linear -> ReLU -> add")], str(fused.fuse_report)
    check_equal(model, x, fused)


def test_in_place_relu_spellings_are_fused():
    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(12, 6)

        def forward(self, x):
            h = F.relu(self.a(x), inplace=True) + x
            g = torch.relu_(self.b(h))
            return self.c(torch.concat([g, h], -1)).relu_() + torch.concatenate([h], -1)

    model, x, fused = fuse_in_float64(Spellings, 5, 6)
    patterns = sorted(p for _, p, _ in fused.fuse_report.fused)
    assert patterns == ["Linear -> ReLU", "Linear -> ReLU -> add", "cat -> Linear -> ReLU"], \
        str(fused.fuse_report)
    check_equal(model, x, fused)


def test_modules_with_hooks_are_not_replaced():
    """A fused layer would not run the Linear's or the ReLU module's own hooks (pruning and the
    old weight_norm are such hooks): those layers stay, and the report says why."""
    torch.manual_seed(0)
    model = SeedMLP().double()
    model.linear1.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    calls = []
    model.act.register_forward_hook(lambda module, args, out: calls.append(1))
    torch.nn.utils.prune.l1_unstructured(model.linear4, "weight", amount=0.5)
    x = torch.randn(7, 30, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    report = fused.fuse_report
    assert [p for _, p, _ in report.fused] == ["Linear -> ReLU"], str(report)  # linear3 only
    assert sum("has hooks" in why for _, why in report.skipped) == 3, str(report)
    calls.clear()  # the shape run (on fake tensors) called it too
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert len(calls) == 2  # the ReLU's hook ran in both


def test_concatenations_fx_cannot_size_are_reported_as_such():
    class Parts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            y = self.a(torch.cat(x.chunk(2, -1), -1))
            return self.b(torch.cat([torch.empty(0, dtype=x.dtype), x], -1)) + y

    model = Parts().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    reasons = " ".join(why for _, why in fused.fuse_report.skipped)
    assert not fused.fuse_report.fused, str(fused.fuse_report)
    assert "one value" in reasons and "leading dims" in reasons, reasons
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_an_example_whose_concatenation_does_not_fit_the_linear_is_reported():
    """The example's run fails at the Linear (4 + 4 columns into 7): fuse reports the pattern
    instead of raising, and the model it returns refuses the call as the model does."""

    class Misfit(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(7, 6)

        def forward(self, x):
            return self.lin(torch.cat([x, x], -1))

    model, x = Misfit(), torch.randn(3, 4)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert not fused.fuse_report.fused, str(fused.fuse_report)
    assert "sum to 8, not the Linear's in_features 7" in str(fused.fuse_report)
    for run in (model, fused):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            run(x)


def test_a_compiled_model_gets_a_hint():
    model = torch.compile(ResidualMLP())
    out = fusedskip.fuse(model)
    assert out is model and "fuse the model first" in str(out.fuse_report)


def test_a_data_parallel_wrapper_gets_a_hint():
    model = nn.DataParallel(ResidualMLP())
    out = fusedskip.fuse(model)
    assert out is model and "DataParallel wrapper: fuse the model first" in str(out.fuse_report)


def test_an_adapter_stops_the_shape_run_only_from_where_it_is():
    """A Linear whose forward is set on the instance closes over the model's real tensors: the
    fake run of example_inputs does not enter it (its write would land in the model), so shapes
    are known up to it, and the patterns before it are fused."""
    class Adapted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(12, 6)
            self.adapter, self.after = nn.Linear(6, 6), nn.Linear(6, 6)
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

            def adapter_forward(t):
                self.calls.add_(1)
                return F.linear(t, self.adapter.weight, self.adapter.bias) * 0.5
            self.adapter.forward = adapter_forward

        def forward(self, x):
            h = torch.relu(self.a(x)) + x
            g = torch.relu(self.b(h) + h)
            y = self.adapter(self.c(torch.cat([g, h], -1)))
            return torch.relu(self.after(y)) + y  # shapes unknown: Linear -> ReLU only

    model, x, fused = fuse_in_float64(Adapted, 5, 6)
    report = fused.fuse_report
    assert sorted((name, pattern) for name, pattern, _ in report.fused) == [
        ("a", "Linear -> ReLU -> add"), ("after", "Linear -> ReLU"),
        ("b", "Linear -> add -> ReLU"), ("c", "cat -> Linear")], str(report)
    assert "shape propagation stopped at adapter" in str(report), str(report)
    assert ("after", "shapes unknown (the run of example_inputs stopped at or before this "
             "node): the residual's shape cannot be checked") in report.skipped, str(report)
    assert model.calls.item() == 0  # the shape run did not call it
    check_equal(model, x, fused)


@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
def test_fused_model_under_autocast_computes_what_the_model_does(order):
    """A float32 residual stream under bfloat16 autocast: eager adds it in float32, and so must
    the fused model (csrc/autocast.cpp)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 16)

        def forward(self, x):
            if order == "relu_add":
                return torch.relu(self.linear(x)) + x
            return torch.relu(self.linear(x) + x)

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(8, 16) * 10
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert len(fused.fuse_report.fused) == 1, str(fused.fuse_report)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(x), fused(x)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@torch.fx.wrap
def _scale_in_place(t):  # opaque to FX: fuse() cannot see that it writes
    t.mul_(2)


def _subscript_assignment(t):
    t[0] = 100.0


@pytest.mark.parametrize("write", [
    lambda x: x.__setitem__(0, 100.0),
    lambda x: x.__iadd__(100.0),
    lambda x: torch.ops.aten.add_.Tensor(x, 100.0),
    lambda x: torch.ops.aten.index_put_.default(x, [torch.tensor([0])],
                                                      torch.tensor(100.0, dtype=x.dtype)),
    lambda x: _scale_in_place(x),
    _subscript_assignment,
], ids=["__setitem__", "__iadd__", "aten.add_", "aten.index_put_", "fx.wrap", "x[0] ="])
def test_every_spelling_of_a_write_keeps_the_residual_out(write):
    """A write to the Linear's input between its ReLU and the add: Linear -> ReLU alone is still
    safe to fuse, the add is not."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            x = x * 1.0
            h = torch.relu(self.linear(x))
            write(x)
            return h + x

    model, x, fused = fuse_in_float64(Model, 3, 4)
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU"], \
        str(fused.fuse_report)
    assert "only Linear -> ReLU fused" in str(fused.fuse_report)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class WriteWhatAPatternReads(nn.Module):
    """In-place writes, between a pattern's first node and its last, that reach what the pattern
    reads: into the Linear's input, into the tensor its input is a view of, into the residual
    after the add read it, into what a hooked module returned (a hook may return any tensor),
    through a tensor made to use the residual's memory (`set_`), and into an argument other than
    the first (found_inf, which the AMP unscale call also writes). None may be fused."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.linear, self.narrow = nn.Linear(6, 6), nn.Linear(1, 6)
        self.register_buffer("memory", torch.randn(5, 6))
        self.hooked = nn.Identity()
        self.hooked.register_forward_hook(lambda module, args, out: self.memory)

    def forward(self, x):
        other = x * 0.5
        if self.case == "the input":
            h = self.linear(other)
            other.relu_()
            return torch.relu(h), other
        if self.case == "a view's base":
            h = self.linear(other[:, :6])
            other.relu_()
            return torch.relu(h), other
        if self.case == "add_relu residual":
            s = self.linear(x) + other
            other.relu_()
            return torch.relu(s)
        if self.case == "rebound to the residual":
            s = self.linear(x) + other
            y = x * 3.0  # made after the Linear
            y.set_(other)
            y.zero_()
            return torch.relu(s)
        if self.case == "a second argument":
            found_inf = x[:1, :1] * 0.0
            h = self.narrow(found_inf)
            t = x * float("inf")  # made after the Linear
            torch._amp_foreach_non_finite_check_and_unscale_([t], found_inf,
                                                            torch.ones_like(found_inf))
            return torch.relu(h)
        memory = self.memory  # "hooked"
        other = self.hooked(x * 1.0)
        h = self.linear(memory)
        other.mul_(2)  # exact, and undone below: every call sees the same memory
        y = torch.relu(h)
        other.div_(2)
        return y


@pytest.mark.parametrize("case", ["the input", "a view's base", "add_relu residual",
                                  "rebound to the residual", "a second argument", "hooked"])
def test_writes_that_reach_what_a_pattern_reads(case):
    if case == "a second argument":  # the AMP call takes float32 alone
        torch.manual_seed(0)
        model, x = WriteWhatAPatternReads(case), torch.randn(5, 6)
        fused = fusedskip.fuse(model, example_inputs=(x,))
    else:
        model, x, fused = fuse_in_float64(lambda: WriteWhatAPatternReads(case), 5, 6)
    report = str(fused.fuse_report)
    assert not fused.fuse_report.fused, report
    assert "may write in place" in report, report
    out, ref = fused(x.clone()), model(x.clone())
    for o, r in zip(out if isinstance(out, tuple) else (out,),
                    ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(o, r, rtol=0, atol=0)



class _Doubler:
    """An object passed to forward whose code writes what it is given: FX records a call of its
    method (named as a tensor's), or of the object, without seeing inside."""

    def double(self, t):
        t.mul_(2)

    def __call__(self, t):
        t.mul_(2)


class WriteThroughCallsTheGraphDoesNotShow(nn.Module):
    """Writes into the Linear's input by code the graph records only as a call: a method of an
    argument, the argument called, and a torch built-in that is no in-place spelling but whose
    ATen schema writes an argument (`_cummax_helper` writes its values and indices)."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.linear = nn.Linear(6, 6)

    def forward(self, x, helper):
        x = x * 1.0
        h = self.linear(x)
        if self.case == "a method of an argument":
            helper.double(x)
        elif self.case == "an argument called":
            helper(x)
        else:
            torch._cummax_helper(x * 1.0, x, torch.zeros_like(x, dtype=torch.long), 0)
        return torch.relu(h)


@pytest.mark.parametrize("case", ["a method of an argument", "an argument called",
                                  "a built-in whose schema writes"])
def test_writes_by_calls_the_graph_does_not_show(case):
    torch.manual_seed(0)
    model = WriteThroughCallsTheGraphDoesNotShow(case).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x, _Doubler()))
    report = str(fused.fuse_report)
    assert not fused.fuse_report.fused, report
    assert "may write in place" in report, report
    torch.testing.assert_close(fused(x, _Doubler()), model(x, _Doubler()), rtol=0, atol=0)


def test_a_write_into_a_joined_list_of_tensors():
    """`rs + []` is a new list holding rs's tensors, not a new tensor: a foreach write into it,
    after an add_relu add, reaches the residual the add read."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6)

        def forward(self, x, rs):
            s = self.linear(x) + rs[0]
            torch._foreach_mul_(rs + [], 2.0)
            return torch.relu(s)

    torch.manual_seed(0)
    model = Model().double()
    x, r = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x, [r.clone()]))
    assert not fused.fuse_report.fused, str(fused.fuse_report)
    torch.testing.assert_close(fused(x, [r.clone()]), model(x, [r.clone()]), rtol=0, atol=0)

def test_writes_into_new_tensors_do_not_stop_fusion():
    """An in-place ReLU on another branch's fresh Linear output, and a subscript assignment into
    a new tensor, cannot reach what the patterns read: everything still fuses."""
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            scale = torch.ones_like(x)
            scale[:, 0] = 0.5
            return self.act(self.a(x)) + self.act(self.b(x * scale))

    model, x, fused = fuse_in_float64(TwoBranch, 5, 6)
    assert sorted(p for _, p, _ in fused.fuse_report.fused) == [
        "Linear -> ReLU", "Linear -> ReLU -> add"], str(fused.fuse_report)
    check_equal(model, x, fused)


def test_cat_into_a_buffer_axis_keyword_and_plain_weights():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(4, 4)
            self.register_buffer("buf", torch.zeros(5, 8))

        def forward(self, x):
            y = self.a(torch.cat([x, x], -1, out=self.buf))  # the buffer must be written
            z = self.b(torch.concatenate([x, x], axis=-1))
            return y + z, torch.relu(self.c(x))

    torch.manual_seed(0)
    model = Model()
    weight = model.c.weight.detach().clone()
    del model.c.weight
    model.c.weight = weight  # a plain tensor: no parameter to share
    x = torch.randn(5, 4)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    report = str(fused.fuse_report)
    assert [p for _, p, _ in fused.fuse_report.fused] == ["cat -> Linear"], report
    assert "out=" in report and "not an nn.Parameter" in report
    out = fused(x)
    assert torch.equal(model.buf, torch.cat([x, x], -1))
    torch.testing.assert_close(out, model(x))


def test_global_module_hooks_stop_fusion():
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__))
    try:
        model = SeedMLP()
        fused = fusedskip.fuse(model, example_inputs=(torch.randn(3, 30),))
        assert not fused.fuse_report.fused, str(fused.fuse_report)
    finally:
        handle.remove()


def test_buffer_updates_in_forward_are_kept_or_refused():
    """A forward that updates a buffer in place keeps doing so in the fused model (fuse() itself
    does not run it); one that assigns a buffer anew cannot be traced: the model comes back
    unchanged, its buffer the same tensor with the same value."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.register_buffer("steps", torch.zeros(2, 4))

        def forward(self, x):
            h = self.a(x) + self.steps
            self.steps.add_(1.0)
            return torch.relu(h) + torch.relu(self.b(x))

    class Assigning(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps += 1
            return torch.relu(self.a(x))

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = Counting()
    twin = copy.deepcopy(model)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]
    assert torch.equal(model.steps, torch.zeros(2, 4))  # tracing ran nothing
    for _ in range(3):
        torch.testing.assert_close(fused(x), twin(x), rtol=0, atol=0)
        assert torch.equal(model.steps, twin.steps)
    model = Assigning()
    steps = model.steps
    out = fusedskip.fuse(model, example_inputs=(x,))
    assert out is model and model.steps is steps and model.steps.item() == 0
    assert "forward changes Assigning.steps" in str(out.fuse_report)


def test_an_example_with_a_batch_of_one_does_not_prove_a_residual_equal():
    """A (1, T, D) residual matches an example output of batch 1 and broadcasts on any other:
    the residual is left out (Linear -> ReLU still fuses), and a real batch runs."""
    class LearnedPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.position = nn.Parameter(torch.randn(1, 5, 8))

        def forward(self, x):
            return torch.relu(self.linear(x)) + self.position

    model = LearnedPosition().double()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(1, 5, 8, dtype=torch.float64),))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU"]
    assert "batch dims are larger than 1" in str(fused.fuse_report)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_what_a_graph_cannot_record_is_refused_and_the_rest_traces():
    """Buffers in Python control flow trace as FX always traced them; `buffer.data = ...`, a
    no_grad region and a forward that reads self.training cannot be recorded: the model comes
    back as itself. Patterns the concat pass leaves still fuse as Linear -> ReLU, a shortcut with
    an in-place ReLU after BatchNorm does not stop its neighbour, and FX's tensor constants are
    not left on the model."""
    class Repeats(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.stack = nn.Linear(4, 4), nn.Linear(8, 4)
            self.register_buffer("repeats", torch.tensor(2))
            self.shortcut = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=True))

        def forward(self, x):
            for _ in range(int(self.repeats)):
                x = torch.relu(self.linear(x)) + self.shortcut(x)
            y = torch.relu(self.stack(torch.cat([x, x], 0).view(-1, 8)))
            return y + torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=x.dtype)

    class DataAssign(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("last", torch.zeros(3, 4))

        def forward(self, x):
            self.last.data = x.detach()
            return torch.relu(self.linear(x))

    class NoGrad(DataAssign):
        def forward(self, x):
            with torch.no_grad():
                self.last.mul_(0.5)
            return torch.relu(self.linear(x))

    class Training(DataAssign):
        def forward(self, x):
            return torch.relu(self.linear(F.dropout(x, 0.5, self.training)))

    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    model = Repeats().double().eval()
    before = set(vars(model))
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert sorted(p for _, p, _ in fused.fuse_report.fused) == [
        "Linear -> ReLU", "Linear -> ReLU -> add", "Linear -> ReLU -> add"], \
        str(fused.fuse_report)
    assert set(vars(model)) == before
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    for make, why in ((DataAssign, "sets the attribute 'data'"), (NoGrad, "grad or autocast mode"),
                      (Training, "depends on self.training")):
        model = make().double()
        out = fusedskip.fuse(model, example_inputs=(x,))
        assert out is model and why in str(out.fuse_report), str(out.fuse_report)
        assert torch.equal(model.last, torch.zeros(3, 4, dtype=torch.float64))


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0


class _CountsCalls(_Base):
    def forward(self, x):
        self.calls += 1
        return torch.relu(self.linear(x))


class _FreezesItself(_Base):
    def forward(self, x):
        self.linear.requires_grad_(False)
        return torch.relu(self.linear(x))


class _AutocastInside(_Base):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.relu(self.linear(x))


class _AssertsTensor(_Base):
    def forward(self, x):
        assert type(x) is torch.Tensor
        return torch.relu(self.linear(x))


class _Hooked(_Base):
    def __init__(self):
        super().__init__()
        self.register_forward_hook(lambda module, args, out: setattr(module, "calls", 1))

    def forward(self, x):
        return torch.relu(self.linear(x))


@pytest.mark.parametrize("make,why", [
    (_CountsCalls, "forward changes _CountsCalls.calls"),
    (_FreezesItself, "forward changes requires_grad"),
    (_AutocastInside, "another grad or autocast mode"),
    (_AssertsTensor, "AssertionError"),
    (_Hooked, "which FX traces through"),
])
def test_python_side_effects_are_refused_and_undone(make, why):
    """Whatever forward does in Python while FX traces it (attributes, requires_grad, autocast
    regions, hooks of traced-through modules) is missing from a graph: the model comes back as
    itself, exactly as it was, and fuse() never raises."""
    model = make()
    before = {k: v for k, v in vars(model).items() if k != "_modules"}
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and why in str(out.fuse_report), str(out.fuse_report)
    assert model.calls == 0 and model.linear.weight.requires_grad
    after = {k: v for k, v in vars(model).items() if k != "_modules"}
    assert after.keys() - before.keys() == {"fuse_report"}  # the one thing it sets, documented


class _SwapsLayers(_Base):
    def __init__(self):
        super().__init__()
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        self.linear = self.other  # the traced call used the first Linear
        return torch.relu(y)


class _DropsItsBias(_Base):
    def forward(self, x):
        y = self.linear(x)
        self.linear.bias = None
        return torch.relu(y)


@pytest.mark.parametrize("make,why", [
    (_SwapsLayers, "forward changes _SwapsLayers.linear"),
    (_DropsItsBias, "forward changes Linear.bias"),
])
def test_a_forward_that_reassigns_layers_or_parameters_is_refused_and_undone(make, why):
    """A forward that puts another module or parameter in place of one: the graph records the
    calls, not the assignment, and a fused layer would take the parameters found there after
    tracing. Refused, with the model's modules and parameters as they were."""
    torch.manual_seed(0)
    model = make()
    def held():  # which objects, by name
        return {k: id(v) for k, v in [*model.named_modules(), *model.named_parameters()]}

    before = held()
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and why in str(out.fuse_report), str(out.fuse_report)
    assert held() == before

def test_an_augmented_assignment_is_the_in_place_write_it_is():
    """`v += 1` on a view of the input writes the input (the caller's tensor too); FX's Proxy
    recorded an out-of-place add, and the write vanished."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            v = x[:, :2]
            v += 1
            return torch.relu(self.linear(x)) + x

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x.clone(),))
    x1, x2 = x.clone(), x.clone()
    torch.testing.assert_close(fused(x1), model(x2), rtol=0, atol=0)
    assert torch.equal(x1, x2) and not torch.equal(x1, x)
    # a batch-of-one example still proves the Linear's own input an equal residual
    fused = fusedskip.fuse(model, example_inputs=(x[:1].clone(),))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]


_WEIGHTS_TO_HALVE = []


@torch.fx.wrap
def _halve_weights(t):
    """A helper FX keeps whole (fx.wrap) that writes tensors it is not given."""
    for weight in _WEIGHTS_TO_HALVE:
        weight.data.mul_(0.5)
    return t


class SideBranchBetween(nn.Module):
    def __init__(self, side):
        super().__init__()
        self.side = side
        self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

    def forward(self, x):
        h = self.fc(x)
        g = _halve_weights(x * 1.0) if self.side == "wrapped" else self.act(x * 1.0)
        return torch.relu(h) + x, g


@pytest.mark.parametrize("side", ["hook", "instance forward", "wrapped"])
def test_code_the_graph_does_not_show_stops_fusion_around_it(side):
    """A leaf module's hook or a forward set on its instance, or an fx.wrap'd helper, between
    the Linear and the pattern's end may write anything it reaches (here the Linear's weight,
    through a closure or a global), not only what it is given: the pattern is not fused, and
    the fused model computes what the model does."""
    torch.manual_seed(0)
    model = SideBranchBetween(side).double()
    if side == "hook":
        model.act.register_forward_hook(lambda *_: model.fc.weight.data.mul_(0.5))
    elif side == "instance forward":
        model.act.forward = lambda t: (model.fc.weight.data.mul_(0.5), t)[1]
    x = torch.randn(3, 4, dtype=torch.float64)
    _WEIGHTS_TO_HALVE[:] = [model.fc.weight]
    try:
        fused = fusedskip.fuse(model, example_inputs=(x,))
        assert not fused.fuse_report.fused, str(fused.fuse_report)
        assert "may write in place between the Linear" in str(fused.fuse_report)
        weight = model.fc.weight.detach().clone()
        out = fused(x)[0]
        model.fc.weight.data.copy_(weight)
        torch.testing.assert_close(out, model(x)[0], rtol=0, atol=0)
    finally:
        _WEIGHTS_TO_HALVE.clear()


@pytest.mark.parametrize("name", ["tag", "attr", "root", "_node", "node_count"])
def test_setting_any_attribute_of_a_traced_tensor_is_refused(name):
    """A graph cannot record `y.<name> = ...` on a tensor: refused whatever the name, also the
    names FX's proxies use for themselves."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = torch.relu(self.fc(x)) + x
            setattr(y, name, "tagged")
            return y

    model = Model()
    out = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4),))
    assert out is model and f"sets the attribute {name!r}" in str(out.fuse_report)


@pytest.mark.parametrize("view", ["T", "mT", "data"])
def test_an_augmented_assignment_through_an_attribute_view_is_in_place(view):
    """`v = y.T; v += 1` writes y: attributes of a traced value that are views of it record
    augmented assignment in place too (FX's attribute proxy recorded an out-of-place add, and
    the fused model computed something else, with or without a pattern fused)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            y = x * 1.0
            v = getattr(y, view)
            v += 1.0
            return torch.relu(self.linear(y)) + y

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU -> add"]
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_a_fused_model_unpickles_again_and_fx_still_traces_after():
    """A parameter fused at None is guarded by fusedskip's own check, not FX's: FX's, traced
    again as a fused model was unpickled, broke every later FX trace in the process (fuse()'s
    and anyone's)."""
    import pickle

    model = OptionalMask()
    x = torch.randn(4, 8)
    blob = pickle.dumps(fusedskip.fuse(model, example_inputs=(x,)))
    for _ in range(2):
        copied = pickle.loads(blob)
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="fused for calls without `mask`"):
            copied(x, x)
    assert fusedskip.fuse(OptionalMask(), example_inputs=(x,)).fuse_report.fused
    torch.fx.symbolic_trace(nn.Linear(2, 2))


def test_a_keyword_only_parameter_left_at_none_says_how_to_fuse_for_it():
    """example_inputs are positional: a keyword-only parameter is always fused at None, and the
    call that passes it is told so, not to put it in example_inputs."""
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x, *, r=None):
            h = torch.relu(self.linear(x))
            return h if r is None else h + r

    model = KeywordOnly()
    x = torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="`r` .*keyword-only.*make it positional"):
        fused(x, r=x)


def test_hooks_on_many_traced_through_modules_still_say_what_to_do():
    """The report names the first few hooked modules, and keeps its advice whole."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(12)])
    for block in model:
        block.register_forward_hook(lambda module, args, out: None)
    out = fusedskip.fuse(model, example_inputs=(torch.randn(2, 4),))
    report = str(out.fuse_report)
    assert out is model and "hooks on 0, 1, 2, 3 and 8 more, which FX traces through" in report
    assert "fuse the model without them" in report, report


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_module_is_refused_saying_why():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    scripted = torch.jit.script(model)
    out = fusedskip.fuse(scripted, example_inputs=(torch.randn(2, 4),))
    assert out is scripted
    assert "TorchScript" in str(out.fuse_report) and "fuse the eager model" in str(out.fuse_report)
    holder = nn.Sequential(torch.jit.script(nn.Linear(4, 4)), nn.ReLU())
    out = fusedskip.fuse(holder, example_inputs=(torch.randn(2, 4),))
    assert out is holder and "TorchScript modules (0:" in str(out.fuse_report)
    # Many of them: the names are cut short, what to do is not (the report cut a foreign
    # error's first line to 200 characters, and this message with it).
    many = nn.Sequential(*[torch.jit.script(nn.Linear(4, 4)) for _ in range(12)])
    report = str(fusedskip.fuse(many, example_inputs=(torch.randn(2, 4),)).fuse_report)
    assert "TorchScript modules (0, 1, 2, 3 and 8 more:" in report, report
    assert "torch.jit.trace, torch.compile and torch.export take the result" in report, report
    # ... as they do: the eager model, fused, then traced.
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.jit.trace(fused, (x,))(x), model(x))


def test_a_model_on_the_meta_device_fuses():
    """Models are often built on the meta device and materialized later (to_empty): fuse() must
    not need buffer values to check that tracing left them alone."""
    with torch.device("meta"):
        model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU())
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(3, 4, device="meta"),))
    assert [p for _, p, _ in fused.fuse_report.fused] == ["Linear -> ReLU"], \
        str(fused.fuse_report)


class Wrapped(nn.Module):
    """relu(fc(x)) + r, called through a wrapper the class's forward does not show."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, r):
        return F.relu(self.fc(x)) + r


class CallsFlipped(Wrapped):
    def __call__(self, x, r):
        return super().__call__(x, r.flip(0))


def doubled_on_the_instance():
    model = Wrapped()
    inner = model.forward
    model.forward = lambda x, r: inner(x, r) * 2  # as output-casting wrappers do
    return model


@pytest.mark.parametrize("make", [doubled_on_the_instance, CallsFlipped])
def test_a_model_whose_call_is_not_its_class_forward_is_left_unchanged(make):
    torch.manual_seed(0)
    model, x, r = make(), torch.randn(4, 8), torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert fused is model and "fuse the model it wraps" in str(fused.fuse_report)


class WritesByKeyword(nn.Module):
    """An in-place ReLU given the residual by keyword, after the add read it."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU(inplace=True)

    def forward(self, x, r):
        r = r * 1
        y = self.fc(x) + r
        self.act(input=r)
        return F.relu(y)


def test_an_in_place_write_by_keyword_stops_fusion():
    torch.manual_seed(0)
    model, x, r = WritesByKeyword(), torch.randn(4, 8), torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert [p for _, p, _ in fused.fuse_report.fused] == [], str(fused.fuse_report)
    torch.testing.assert_close(fused(x, r), model(x, r), rtol=0, atol=0)


HELPERS_NAMED_LIKE_TORCH = """
import torch
from torch import nn
import torch.nn.functional as F


def clip_negatives(t):
    t.clamp_(min=0)
    return t


torch.fx.wrap("clip_negatives")


class Clips(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, r):
        r = r * 1
        y = self.fc(x) + r
        clip_negatives(r)
        return F.relu(y)
"""


def test_a_helper_from_a_module_named_like_torch_is_not_taken_for_torch(tmp_path, monkeypatch):
    """torch_helpers is not torch: its fx.wrap'd function may write what it is given."""
    (tmp_path / "torch_helpers.py").write_text(HELPERS_NAMED_LIKE_TORCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_helpers", raising=False)
    torch_helpers = importlib.import_module("torch_helpers")
    torch.manual_seed(0)
    model, x, r = torch_helpers.Clips(), torch.randn(4, 8), torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert "clip_negatives may write in place" in str(fused.fuse_report)
    torch.testing.assert_close(fused(x, r), model(x, r), rtol=0, atol=0)


class CountsInAPlainTensor(nn.Module):
    """State in a tensor attribute that is no buffer (or in a list), updated in place."""

    def __init__(self, in_list):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.in_list = in_list
        self.steps = torch.zeros(1)
        self.cache = [torch.zeros(1)]

    def forward(self, x, r):
        steps = self.cache[0] if self.in_list else self.steps
        steps += 1
        return F.relu(self.fc(x)) + r * steps


@pytest.mark.parametrize("in_list", [False, True])
def test_an_in_place_update_of_a_plain_tensor_attribute_is_refused(in_list):
    model, x, r = CountsInAPlainTensor(in_list), torch.randn(4, 8), torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert fused is model, str(fused.fuse_report)
    assert "in a way a traced graph cannot record" in str(fused.fuse_report)
    assert model.steps.item() == 0 and model.cache[0].item() == 0  # tracing left no count


class CallsWithOtherWeights(nn.Module):
    """A teacher's (EMA) weight swapped in for one call of the Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("ema_weight", torch.randn(8, 8))

    def forward(self, x, r):
        return F.relu(torch.func.functional_call(self.fc, {"weight": self.ema_weight}, (x,))) + r


def test_a_module_called_with_other_tensors_than_its_own_is_not_fused():
    torch.manual_seed(0)
    model, x, r = CallsWithOtherWeights(), torch.randn(4, 8), torch.randn(4, 8)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert fused is model, str(fused.fuse_report)
    assert not fused.fuse_report.fused


class _SkipParameter(nn.Module):
    """relu(fc(x)) + skip (or relu(fc(x) + skip)), skip a parameter: it has the output's shape
    for an unbatched x only, and broadcasts against a batch."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.fc = nn.Linear(4, 4)
        self.skip = nn.Parameter(torch.randn(4))

    def forward(self, x):
        if self.order == "relu_add":
            return torch.relu(self.fc(x)) + self.skip
        return torch.relu(self.fc(x) + self.skip)


class _ResidualAndConcat(nn.Module):
    """A residual add, then a cat of its result with the residual."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x, r):
        h = torch.relu(self.fc(x)) + r
        return torch.relu(self.fc2(torch.cat([h, r], -1)))


class _FixedDtypes(_ResidualAndConcat):
    """Forward fixes the residual's dtype (`.float()`): after model.double() the add and the cat
    promote it."""

    def forward(self, x, r):
        return super().forward(x, r.float())


class _TwoInputs(nn.Module):
    """A cat of two inputs, whose split of fc2's 8 in_features the call decides; then a residual
    add through fc, which is called again after it, so its fused call is the layer's function
    on fc's parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, a, b, r):
        y = torch.relu(self.fc2(torch.cat([a, b], -1)))
        h = torch.relu(self.fc(y)) + r
        return h, self.fc(h)


@pytest.fixture
def model_ops_calls(monkeypatch):
    """How many calls of the fused model's layers ran the model's own ops instead."""
    module = sys.modules["fusedskip.fuse"]
    calls = []
    for name in ("_model_relu_residual", "_model_concat"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *args, _original=original: calls.append(1) or _original(*args))
    return calls


@pytest.mark.parametrize("order", ["relu_add", "add_relu"])
def test_a_call_the_example_did_not_show_runs_the_models_ops(order, model_ops_calls):
    """fuse() proves a residual fits the fused op on the example only. An unbatched example
    made skip the output's shape; batched, the model's add broadcasts it, and the fused layer
    (which does not broadcast) raised. Such a call now runs the model's own ops."""
    torch.manual_seed(0)
    model = _SkipParameter(order).double()
    fused = fusedskip.fuse(model, example_inputs=(torch.randn(4, dtype=torch.float64),))
    assert len(fused.fuse_report.fused) == 1, str(fused.fuse_report)
    check_equal(model, torch.randn(4, dtype=torch.float64), fused)
    assert not model_ops_calls  # the example's shapes: the fused layer
    for shape in ((3, 4), (2, 5, 4)):
        check_equal(model, torch.randn(*shape, dtype=torch.float64), fused)
    assert len(model_ops_calls) == 2


def test_a_sparse_operand_the_example_did_not_show(model_ops_calls):
    """Eager's linear takes a sparse input, the fused op dense ones only: the model's ops run.
    A sparse residual is refused with the layer's error, as the README says (eager's add takes
    one in one order of its operands only, which fuse() does not keep)."""
    torch.manual_seed(0)
    model = Wrapped().double()  # relu(fc(x)) + r
    x, r = (torch.randn(5, 8, dtype=torch.float64) for _ in range(2))
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert len(fused.fuse_report.fused) == 1, str(fused.fuse_report)
    sparse = x.relu().to_sparse()
    torch.testing.assert_close(fused(sparse, r), model(sparse, r), rtol=0, atol=0)
    assert len(model_ops_calls) == 1
    with pytest.raises(TypeError, match="residual must be a dense"):
        fused(x, r.relu().to_sparse())


def test_a_model_converted_after_fuse_whose_forward_fixes_a_dtype(model_ops_calls):
    """`r.float()` in forward: after .double() the model's add and cat promote to float64, where
    the fused layers raised on the dtype mismatch. They now run the model's ops there."""
    torch.manual_seed(0)
    model = _FixedDtypes()
    x, r = torch.randn(6, 4), torch.randn(6, 4)
    fused = fusedskip.fuse(model, example_inputs=(x, r))
    assert sorted(p for _, p, _ in fused.fuse_report.fused) == ["Linear -> ReLU -> add",
                                                                "cat -> Linear -> ReLU"]
    torch.testing.assert_close(fused(x, r), model(x, r), rtol=0, atol=0)
    assert not model_ops_calls
    model.double()  # the fused model shares the parameters: converted with them
    x, r = x.double(), r.double()
    out, want = fused(x, r), model(x, r)
    assert out.dtype == want.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert len(model_ops_calls) == 2


def test_fused_under_autocast_and_run_outside_it(model_ops_calls):
    """Fused under autocast, a bfloat16 residual matched the linear's autocast output; outside
    autocast the model promotes it to float32, and the fused layer raised."""
    torch.manual_seed(0)
    model = _ResidualAndConcat()
    x, r = torch.randn(6, 4), torch.randn(6, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fusedskip.fuse(model, example_inputs=(x, r))
        assert len(fused.fuse_report.fused) == 2, str(fused.fuse_report)
        torch.testing.assert_close(fused(x, r), model(x, r), rtol=0, atol=0)
    assert not model_ops_calls
    out, want = fused(x, r), model(x, r)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert len(model_ops_calls) == 2


def test_a_call_whose_inputs_split_in_features_otherwise(model_ops_calls):
    """The model's cat and Linear take any split of in_features: a ConcatLinear fused on the
    example's (3 + 5) runs the model's ops for another (4 + 4); the layer's function, where
    the Linear is called elsewhere too, splits the weight by the call's widths itself. The
    function form's residual that broadcasts runs the model's ops too."""
    torch.manual_seed(0)
    model = _TwoInputs().double()
    a, b, r = (torch.randn(6, n, dtype=torch.float64) for n in (3, 5, 4))
    fused = fusedskip.fuse(model, example_inputs=(a, b, r))
    report = str(fused.fuse_report)
    assert sorted(p for _, p, _ in fused.fuse_report.fused) == [
        "Linear -> ReLU -> add", "cat -> Linear -> ReLU"], report
    assert "_relu_residual(..., fc.weight, fc.bias" in report
    for got, want in zip(fused(a, b, r), model(a, b, r)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not model_ops_calls
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for got, want in zip(fused(a, b, r), model(a, b, r)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(model_ops_calls) == 1  # the split
    for got, want in zip(fused(a, b, r[:1]), model(a, b, r[:1])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(model_ops_calls) == 3  # the split, and the residual that broadcasts


def test_a_residual_the_example_saw_as_a_tuple_does_not_make_fuse_raise():
    """ShapeProp records a tuple's tensors as a tuple of metadata, where the residual check
    read a shape (an AttributeError out of fuse())."""
    class Skip(tuple):
        def __radd__(self, other):
            return other + self[0]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, skip):
            return torch.relu(self.fc(x)) + skip

    model = Model()
    x, skip = torch.randn(3, 4), Skip((torch.randn(3, 4),))
    fused = fusedskip.fuse(model, example_inputs=(x, skip))
    assert fused.fuse_report.traced
    torch.testing.assert_close(fused(x, skip), model(x, skip), rtol=0, atol=0)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# fuse()'s layers ask fusedskip._C.operands_fit first, which may vouch only for calls the
# Python check passes, and must vouch for the plain ones, or it saves nothing.
# (id, input, weight, residual, whether the Python check passes, whether the C check vouches)
RESIDUAL_FIT_CASES = [
    ("plain", _t(4, 3), _t(5, 3), _t(4, 5), True, True),
    ("no-residual", _t(4, 3), _t(5, 3), None, True, True),
    ("batched", _t(2, 4, 3), _t(5, 3), _t(2, 4, 5), True, True),
    ("transposed", _t(3, 4).t(), _t(5, 3), _t(5, 4).t(), True, True),
    ("unbatched", _t(3), _t(5, 3), _t(5), True, True),
    ("broadcast-row", _t(4, 3), _t(5, 3), _t(1, 5), False, False),
    ("broadcast-vector", _t(4, 3), _t(5, 3), _t(5), False, False),
    ("broadcast-batch", _t(2, 4, 3), _t(5, 3), _t(4, 5), False, False),
    ("scalar", _t(4, 3), _t(5, 3), torch.tensor(1.0), False, False),
    ("number", _t(4, 3), _t(5, 3), 1.0, False, False),  # the model's add takes it
    ("wide-residual", _t(4, 3), _t(5, 3), _t(4, 6), False, False),
    ("residual-dtype", _t(4, 3), _t(5, 3), _t(4, 5, dtype=torch.float64), False, False),
    ("input-dtype", _t(4, 3, dtype=torch.float64), _t(5, 3), _t(4, 5), False, False),
    ("sparse-input", _t(4, 3).to_sparse(), _t(5, 3), _t(4, 5), False, False),
    ("sparse-residual", _t(4, 3), _t(5, 3), _t(4, 5).to_sparse(), True, False),  # refused
]


@pytest.mark.parametrize("case", RESIDUAL_FIT_CASES, ids=[c[0] for c in RESIDUAL_FIT_CASES])
def test_the_residual_check_fast_path_vouches_only_for_what_python_passes(case, monkeypatch):
    from fusedskip._C import operands_fit
    module = sys.modules["fusedskip.fuse"]
    _, input, weight, residual, python_passes, c_vouches = case
    assert operands_fit((input,), weight, residual, None) is c_vouches
    assert module._relu_residual_fits(input, weight, residual) is python_passes
    monkeypatch.setattr(module, "_operands_fit", None)
    assert module._relu_residual_fits(input, weight, residual) is python_passes


# The same for a concat's inputs, against its widths: (id, inputs, widths or None, whether the
# Python checks pass, whether the C check vouches).
CONCAT_FIT_CASES = [
    ("plain", (_t(4, 2), _t(4, 3)), (2, 3), True, True),
    ("list", [_t(4, 2), _t(4, 3)], [2, 3], True, True),
    ("no-widths", (_t(4, 2), _t(4, 3)), None, True, True),
    ("other-split", (_t(4, 3), _t(4, 2)), (2, 3), False, False),
    ("dtype", (_t(4, 2), _t(4, 3, dtype=torch.float64)), (2, 3), False, False),
    ("sparse", (_t(4, 2).to_sparse(), _t(4, 3)), (2, 3), False, False),
    ("count", (_t(4, 5),), (2, 3), False, False),
    ("not-a-tensor", (_t(4, 2), [[1.0] * 3] * 4), (2, 3), False, False),
]


@pytest.mark.parametrize("case", CONCAT_FIT_CASES, ids=[c[0] for c in CONCAT_FIT_CASES])
def test_the_concat_check_fast_path_vouches_only_for_what_python_passes(case, monkeypatch):
    from fusedskip._C import operands_fit
    module = sys.modules["fusedskip.fuse"]
    _, inputs, widths, python_passes, c_vouches = case
    weight = _t(4, 5)
    assert operands_fit(inputs, weight, None, widths) is c_vouches

    def python_check():
        return all(module._takes(x, weight) for x in inputs) and (
            widths is None or module._widths_are(inputs, widths))
    monkeypatch.setattr(module, "_operands_fit", None)
    assert python_check() is python_passes
