"""The drop-in modules: nn.Linear's parameters and init, state_dicts, from_linear, parity."""

import pytest
import torch
from torch import nn

import fusedskip
from conftest import assert_close_rel

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def make_pair(kind, dtype, **kw):
    torch.manual_seed(0)
    if kind == "residual":
        fused = fusedskip.LinearReLUResidual(6, 6, dtype=dtype, **kw)
        ref = fusedskip.reference.LinearReLUResidual(6, 6, dtype=dtype, **kw)
    else:
        fused = fusedskip.ConcatLinear([2, 5, 3], 7, dtype=dtype, **kw)
        ref = fusedskip.reference.ConcatLinear([2, 5, 3], 7, dtype=dtype, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def run(module, kind, dtype, seed=1):
    torch.manual_seed(seed)
    if kind == "residual":
        x = torch.randn(4, 3, 6, dtype=dtype, requires_grad=True)
        args = (x, torch.randn(4, 3, 6, dtype=dtype, requires_grad=True))
    else:
        args = tuple(torch.randn(4, 3, w, dtype=dtype, requires_grad=True) for w in (2, 5, 3))
    out = module(*args)
    grads = torch.autograd.grad(out.float().square().sum(), [*args, *module.parameters()])
    return out, grads


FORMS = [("residual", {"order": "relu_add"}), ("residual", {"order": "add_relu"}),
         ("residual", {"bias": False}),
         ("concat", {}), ("concat", {"activation": "relu"}), ("concat", {"bias": False})]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,kw", FORMS)
def test_module_on_a_cpu_is_the_reference(kind, kw, dtype):
    """On a CPU the modules compute through the reference path: the same bits as the reference
    layers (the test below checks the fused branch)."""
    fused, ref = make_pair(kind, dtype, **kw)
    out, grads = run(fused, kind, dtype)
    ref_out, ref_grads = run(ref, kind, dtype)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert torch.equal(g, rg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,kw", FORMS)
def test_module_through_the_op_matches_reference(kind, kw, dtype, monkeypatch):
    """The modules' fused branch (the one CUDA tensors take), here run on the op's CPU kernel,
    against the reference layer in float64 on the same values. The output gradient is a fixed
    random tensor, so the reference's gradients do not inherit the rounding of the output. (The
    ReLU's side is the same in both: the op sums these few terms in float32 at least, far from
    flipping a sign at these fixed seeds.)"""
    from fusedskip import modules
    monkeypatch.setattr(modules, "_use_fused", lambda tensor: True)
    fused, ref = make_pair(kind, torch.float64, **kw)
    fused.to(dtype)
    ref.load_state_dict(fused.state_dict())  # the values the fused layer holds, in float64
    torch.manual_seed(1)
    widths = (6, 6) if kind == "residual" else (2, 5, 3)
    args = [torch.randn(4, 3, w, dtype=dtype, requires_grad=True) for w in widths]
    out = fused(*args)
    grad = torch.randn(out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, [*args, *fused.parameters()], grad)
    monkeypatch.undo()
    args64 = [a.detach().double().requires_grad_() for a in args]
    ref_out = ref(*args64)
    ref_grads = torch.autograd.grad(ref_out, [*args64, *ref.parameters()], grad.double())
    assert out.dtype == dtype
    assert_close_rel(out, ref_out, dtype, "output")
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_close_rel(g, rg, dtype, "grad")


def test_same_init_as_nn_linear():
    torch.manual_seed(3)
    linear = nn.Linear(25, 20)
    torch.manual_seed(3)
    concat = fusedskip.ConcatLinear([15, 10], 20)
    torch.manual_seed(3)
    residual = fusedskip.LinearReLUResidual(25, 20)
    for module in (concat, residual):
        assert torch.equal(module.weight, linear.weight)
        assert torch.equal(module.bias, linear.bias)


def test_state_dict_round_trips():
    linear = nn.Linear(25, 20)
    modules = [fusedskip.ConcatLinear([15, 10], 20), fusedskip.reference.ConcatLinear([15, 10], 20),
               fusedskip.LinearReLUResidual(25, 20), fusedskip.reference.LinearReLUResidual(25, 20),
               nn.Linear(25, 20)]
    state = linear.state_dict()
    for module in modules:
        assert module.state_dict().keys() == state.keys()
        module.load_state_dict(state)
        state = module.state_dict()
    for key, value in linear.state_dict().items():
        assert torch.equal(state[key], value)
    no_bias = fusedskip.LinearReLUResidual(4, 3, bias=False)
    assert list(no_bias.state_dict()) == ["weight"]
    nn.Linear(4, 3, bias=False).load_state_dict(no_bias.state_dict())


def test_from_linear_shares_parameters():
    linear = nn.Linear(25, 20)
    concat = fusedskip.ConcatLinear.from_linear(linear, [15, 10], activation="relu")
    residual = fusedskip.LinearReLUResidual.from_linear(linear, order="add_relu")
    for module in (concat, residual):
        assert module.weight is linear.weight and module.bias is linear.bias
        assert module.out_features == 20
    assert concat.in_features == (15, 10) and concat.activation == "relu"
    assert residual.in_features == 25 and residual.order == "add_relu"
    x1, x2 = torch.randn(3, 15), torch.randn(3, 10)
    torch.testing.assert_close(concat(x1, x2), torch.relu(linear(torch.cat([x1, x2], -1))))
    no_bias = fusedskip.LinearReLUResidual.from_linear(nn.Linear(4, 3, bias=False))
    assert no_bias.bias is None
    assert no_bias(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("training", [True, False])
def test_from_linear_keeps_the_training_mode(training):
    linear = nn.Linear(6, 4).train(training)
    assert fusedskip.LinearReLUResidual.from_linear(linear).training is training
    assert fusedskip.ConcatLinear.from_linear(linear, [2, 4]).training is training


def test_from_linear_keeps_dtype_and_device():
    linear = nn.Linear(6, 4, dtype=torch.float64)
    module = fusedskip.LinearReLUResidual.from_linear(linear)
    assert module.weight.dtype == torch.float64 and module.weight.device.type == "cpu"


def test_reset_parameters_and_extra_repr():
    module = fusedskip.ConcatLinear([3, 4], 5, activation="relu")
    before = module.weight.detach().clone()
    module.reset_parameters()
    assert not torch.equal(before, module.weight)
    assert repr(module) == ("ConcatLinear(in_features=(3, 4), out_features=5, bias=True, "
                            "activation='relu')")
    assert repr(fusedskip.LinearReLUResidual(3, 4, bias=False, order="add_relu")) == (
        "LinearReLUResidual(in_features=3, out_features=4, bias=False, order='add_relu')")


def test_meta_device_runs_reference_path():
    module = fusedskip.LinearReLUResidual(8, 8, device="meta")
    out = module(torch.empty(2, 8, device="meta"), torch.empty(2, 8, device="meta"))
    assert out.shape == (2, 8) and out.device.type == "meta"


def test_residual_optional():
    module = fusedskip.LinearReLUResidual(5, 3)
    x = torch.randn(2, 5)
    torch.testing.assert_close(module(x), torch.relu(x @ module.weight.T + module.bias))


def test_widths_of_any_integer_type():
    """nn.Linear takes numpy ints (e.g. from a shape computed with numpy); so does ConcatLinear,
    and it stores plain ints."""
    import numpy as np
    layer = fusedskip.ConcatLinear([np.int64(2), 3], np.int32(4))
    assert layer.in_features == (2, 3) and all(type(w) is int for w in layer.in_features)
    lazy = nn.LazyLinear(4)
    lazy(torch.randn(1, 5))
    assert fusedskip.ConcatLinear.from_linear(lazy, [np.int64(2), 3]).in_features == (2, 3)


def test_a_gpu_older_than_sm80_takes_the_reference_path_with_one_warning(monkeypatch):
    """The CUDA kernels are built for compute capability 8.0 on: on an older GPU (a T4, 7.5)
    the modules use the reference path, saying so once per device, and cuda_available() is
    False there; an sm_80 GPU takes the fused op. Checked with torch's answers stood in for."""
    import warnings

    from fusedskip import _ops, modules

    class OnGPU(torch.Tensor):  # what _use_fused reads of a tensor on cuda:0
        is_cuda = property(lambda self: True)

        def get_device(self):
            return 0

    tensor = torch.Tensor._make_subclass(OnGPU, torch.zeros(1))
    capability = {"value": (7, 5)}
    monkeypatch.setattr(_ops, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(_ops, "gpu_runs_kernels_known", {})
    monkeypatch.setattr(modules, "_warned_old_gpu", set())
    layer = fusedskip.LinearReLUResidual(1, 1)
    with pytest.warns(RuntimeWarning, match=r"Tesla T4 \(cuda:0\) has compute capability "
                      r"7\.5") as record:
        layer(tensor)  # the reference path: nothing here runs on a GPU
    assert record[0].filename == __file__  # the warning points at the call, not into the library
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device
        assert not modules._use_fused(tensor)
    assert not fusedskip.cuda_available()
    capability["value"] = (8, 0)
    monkeypatch.setattr(_ops, "gpu_runs_kernels_known", {})
    assert modules._use_fused(tensor) and fusedskip.cuda_available()


def test_modules_route_cuda_tensors_to_the_fused_op(monkeypatch):
    """Where _use_fused says yes (CUDA tensors and CUDA kernels), the modules call the fused op,
    else the reference path: checked here by standing in for that answer."""
    from fusedskip import functional, modules, reference

    calls = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(f"{module.__name__.split('.')[-1]}.{name}")
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module in (functional, reference):
        spy(module, "linear_relu_residual")
        spy(module, "linear_concat")
    add = fusedskip.LinearReLUResidual(4, 4)
    cat = fusedskip.ConcatLinear([2, 2], 3)
    x = torch.randn(3, 4)
    for fused in (True, False):
        monkeypatch.setattr(modules, "_use_fused", lambda tensor, fused=fused: fused)
        calls.clear()
        add(x, x)
        cat(x[:, :2], x[:, 2:])
        kind = "functional" if fused else "reference"
        assert calls == [f"{kind}.linear_relu_residual", f"{kind}.linear_concat"]
