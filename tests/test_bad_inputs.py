"""Bad input: a clear exception naming the argument, the same from the C++ op (eager), the
reference path and the fake kernel (torch.compile); never a crash or a silent answer."""

import contextlib
import os
import re
import subprocess
import sys
import warnings

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.utils.parametrizations
import torch.nn.utils.prune
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fusedskip
from fusedskip import reference


def t(*shape, dtype=torch.float32):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape).to(dtype)
    return torch.zeros(shape, dtype=dtype)


X, W, B, R = t(4, 3), t(5, 3), t(5), t(4, 5)


def nested(*parts, layout=torch.strided):
    with warnings.catch_warnings():  # the strided layout's "prototype stage" warning
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor(list(parts), layout=layout)


def quantized(tensor, dtype):
    with warnings.catch_warnings():  # torch deprecates quantized tensors; users still pass them
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(tensor, 0.1, 0, dtype)


# (id, function name, args, kwargs, exception type, text the message must contain)
CASES = [
    ("int-input", "linear_relu_residual", (t(4, 3, dtype=torch.int64), W), {}, TypeError,
     "input has dtype torch.int64"),
    ("bool-input", "linear_relu_residual", (t(4, 3, dtype=torch.bool), W), {}, TypeError,
     "input has dtype torch.bool"),
    ("int-weight", "linear_relu_residual", (X, t(5, 3, dtype=torch.int32)), {}, TypeError,
     "weight has dtype torch.int32"),
    ("complex-input", "linear_relu_residual", (t(4, 3, dtype=torch.complex64), W), {}, TypeError,
     "input has dtype torch.complex64"),
    ("dtype-mismatch", "linear_relu_residual", (X.double(), W), {}, TypeError,
     "input has dtype torch.float64 but weight has dtype torch.float32"),
    ("bias-dtype", "linear_relu_residual", (X, W, B.half()), {}, TypeError,
     "bias has dtype torch.float16"),
    ("residual-dtype", "linear_relu_residual", (X, W, B, R.bfloat16()), {}, TypeError,
     "residual has dtype torch.bfloat16"),
    ("sparse-input", "linear_relu_residual", (X.to_sparse(), W), {}, TypeError,
     "input must be a dense (strided) tensor"),
    ("nested-input", "linear_relu_residual", (nested(t(2, 3), t(1, 3)), W), {}, TypeError,
     "input is a nested tensor; pass a dense one"),
    ("concat-nested", "linear_concat", ([t(2, 1), nested(t(2, 2), layout=torch.jagged)], W), {},
     TypeError, "inputs[1] is a nested tensor; pass a dense one"),
    ("weight-1d", "linear_relu_residual", (X, t(3)), {}, ValueError, "weight must be 2-D"),
    ("weight-3d", "linear_relu_residual", (X, t(1, 5, 3)), {}, ValueError, "weight must be 2-D"),
    ("input-0d", "linear_relu_residual", (t(), W), {}, ValueError,
     "input must have at least one dimension"),
    ("in-features", "linear_relu_residual", (t(4, 4), W), {}, ValueError,
     "input has 4 features (its last dim) but weight has in_features 3"),
    ("bias-shape", "linear_relu_residual", (X, W, t(6)), {}, ValueError,
     "bias must have shape [5]"),
    ("bias-2d", "linear_relu_residual", (X, W, t(1, 5)), {}, ValueError,
     "bias must have shape [5]"),
    ("residual-shape", "linear_relu_residual", (X, W, B, t(4, 6)), {}, ValueError,
     "residual must have the output's shape [4, 5], got [4, 6]"),
    ("residual-broadcast", "linear_relu_residual", (X, W, B, t(5)), {}, ValueError,
     "residuals are not broadcast"),
    ("residual-leading", "linear_relu_residual", (X, W, B, t(2, 4, 5)), {}, ValueError,
     "residual must have the output's shape"),
    ("order", "linear_relu_residual", (X, W), {"order": "add"}, ValueError,
     "order must be 'relu_add'"),
    ("input-not-tensor", "linear_relu_residual", ([[1.0, 2.0, 3.0]], W), {}, TypeError,
     "input must be a Tensor"),
    ("weight-not-tensor", "linear_relu_residual", (X, [[1.0] * 3] * 5), {}, TypeError,
     "weight must be a Tensor, got list"),
    ("bias-not-tensor", "linear_relu_residual", (X, W, 1.0), {}, TypeError,
     "bias must be a Tensor, got float"),
    ("residual-not-tensor", "linear_relu_residual", (X, W, B, 1.0), {}, TypeError,
     "residual must be a Tensor, got float"),
    ("concat-weight-not-tensor", "linear_concat", ([X], 3.0), {}, TypeError,
     "weight must be a Tensor, got float"),
    ("concat-bias-not-tensor", "linear_concat", ([X], W, 2), {}, TypeError,
     "bias must be a Tensor, got int"),
    ("concat-widths", "linear_concat", ([t(4, 1), t(4, 1)], W), {}, ValueError,
     "the inputs' last dims [1, 1] sum to 2 but weight has in_features 3"),
    ("concat-leading", "linear_concat", ([t(4, 1), t(3, 2)], W), {}, ValueError,
     "inputs[1] has leading dims [3] but inputs[0] has [4]"),
    ("concat-none", "linear_concat", ([], W), {}, ValueError, "inputs must hold 1 to 8 tensors"),
    ("concat-nine", "linear_concat", ([t(4, 1)] * 9, t(5, 9)), {}, ValueError,
     "inputs must hold 1 to 8 tensors, got 9"),
    ("concat-tensor", "linear_concat", (X, W), {}, TypeError,
     "inputs must be a sequence of tensors"),
    ("concat-not-tensor", "linear_concat", ([X, 3.0], W), {}, TypeError,
     "inputs[1] must be a Tensor"),
    ("concat-dtype", "linear_concat", ([t(4, 1), t(4, 2).double()], W), {}, TypeError,
     "inputs[1] has dtype torch.float64"),
    ("activation", "linear_concat", ([X], W), {"activation": "gelu"}, ValueError,
     "activation must be None or 'relu'"),
    ("device", "linear_relu_residual", (X.to("meta"), W), {}, RuntimeError,
     "input is on device meta but weight is on cpu"),
    ("quantized-input", "linear_relu_residual",
     (quantized(X, torch.qint8), W), {}, TypeError,
     "input has dtype torch.qint8"),
    ("quantized-residual", "linear_relu_residual",
     (X, W, B, quantized(R, torch.quint8)), {}, TypeError,
     "residual has dtype torch.quint8"),
    ("concat-quantized", "linear_concat",
     ([t(4, 1), quantized(t(4, 2), torch.qint8)], W), {}, TypeError,
     "inputs[1] has dtype torch.qint8"),
] + ([("mkldnn-weight", "linear_relu_residual", (X, W.to_mkldnn()), {}, TypeError,
       "weight must be a dense (strided) tensor, got layout torch._mkldnn")]
     if torch.backends.mkldnn.is_available() else [])


NO_OP_CHECKS = "the compiled extension is not loaded: the reference path checks in Python"
needs_op_checks = pytest.mark.skipif(reference._op_check_args is None, reason=NO_OP_CHECKS)


@pytest.fixture(params=["op-checks", "python-checks"])
def reference_checks(request, monkeypatch):
    """The reference functions check their arguments with the op's C++ code where the extension
    is loaded, and with reference.check_args (the fake kernels' checks) where it is not: both."""
    if request.param == "op-checks" and reference._op_check_args is None:
        pytest.skip(NO_OP_CHECKS)
    if request.param == "python-checks":
        monkeypatch.setattr(reference, "_op_check_args", None)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly(case):
    _, name, args, kwargs, error, text = case
    with pytest.raises(error) as info:
        getattr(fusedskip, name)(*args, **kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_on_the_reference_path(case, reference_checks):
    _, name, args, kwargs, error, text = case
    with pytest.raises(error) as info:
        getattr(reference, name)(*args, **kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_and_reference_messages_agree(case, reference_checks):
    """One set of rules: the C++ checks and their Python mirror say the same thing."""
    _, name, args, kwargs, error, _ = case
    messages = []
    for api in (fusedskip, reference):
        with pytest.raises(error) as info:
            getattr(api, name)(*args, **kwargs)
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]


@needs_op_checks
def test_reference_path_runs_the_op_checks_and_compile_the_python_ones(monkeypatch):
    """Off the GPU the modules run the reference ops behind the op's C++ checks (a tenth of the
    Python ones' host time); torch.compile, which cannot trace into C++, traces check_args."""
    op_calls, python_calls = [], []
    op_checks, python_checks = reference._op_check_args, reference.check_args
    monkeypatch.setattr(reference, "_op_check_args",
                        lambda *args: op_calls.append(1) or op_checks(*args))
    monkeypatch.setattr(reference, "check_args",
                        lambda *args, **kwargs: python_calls.append(1) or python_checks(*args,
                                                                                         **kwargs))
    layer, concat = fusedskip.LinearReLUResidual(3, 5), fusedskip.ConcatLinear((1, 2), 5)
    layer(X, R)
    concat(t(4, 1), t(4, 2))
    assert (len(op_calls), len(python_calls)) == (2, 0)
    op_calls.clear()
    torch.compile(layer, backend="eager", fullgraph=True)(X, R)
    assert len(op_calls) == 0 and len(python_calls) >= 1


def test_reference_path_checks_symbolic_shapes_in_python():
    """The op's C++ checks need concrete sizes; traced with symbolic ones (make_fx, as
    torch.export's non-strict mode traces), the reference path checks in Python instead."""
    def layer(x, w, r):
        return reference.linear_relu_residual(x, w, None, r)

    graph = make_fx(layer, tracing_mode="symbolic")(t(4, 3), W, R)
    x, r = t(6, 3), t(6, 5)
    torch.testing.assert_close(graph(x, W, r), layer(x, W, r), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[s\d+, s\d+\]"):
        make_fx(layer, tracing_mode="symbolic")(t(4, 3), W, t(5))


def test_bad_input_under_compile_fails_at_trace_time():
    fn = torch.compile(fusedskip.linear_relu_residual, backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="input has 4 features"):
        fn(t(4, 4), W)


@pytest.mark.parametrize("case", [c for c in CASES if c[0].endswith("not-tensor")],
                         ids=[c[0] for c in CASES if c[0].endswith("not-tensor")])
def test_a_non_tensor_argument_is_named_under_compile(case):
    """Under torch.compile the eager entry's checks do not run: the traced call names the
    argument as eager does, not with the dispatcher's schema error."""
    _, name, args, kwargs, _, text = case
    torch._dynamo.reset()
    fn = torch.compile(getattr(fusedskip, name), backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=re.escape(text)):
        fn(*args, **kwargs)


class ScaledLinear(nn.Linear):
    """A Linear subclass computing more than nn.Linear (as QAT's Linear and LinearBn1d do)."""

    def forward(self, x):
        return super().forward(x) * 2


def with_instance_forward(linear):
    linear.forward = lambda x: nn.Linear.forward(linear, x) * 2
    return linear


def with_hook(linear):
    linear.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return linear


MODULE_CASES = [
    ("concat-count", lambda: fusedskip.ConcatLinear([2, 3], 4)(t(1, 2)), ValueError,
     "expected 2 inputs"),
    ("concat-width", lambda: fusedskip.ConcatLinear([2, 3], 4)(t(1, 3), t(1, 2)), ValueError,
     "inputs[0] has 3 features (its last dim) but in_features[0] is 2"),
    ("concat-list", lambda: fusedskip.ConcatLinear([2, 3], 4)([t(1, 2), t(1, 3)]), ValueError,
     "pass the inputs as separate arguments"),
    ("concat-generator", lambda: fusedskip.ConcatLinear([2, 3], 4)(x for x in (t(1, 2), t(1, 3))),
     ValueError, "got 1; pass the inputs as separate arguments"),
    ("concat-one-in-a-list", lambda: fusedskip.ConcatLinear([5], 4)([t(1, 5)]), TypeError,
     "inputs[0] must be a Tensor, got list; pass the inputs as separate arguments"),
    ("concat-int-features", lambda: fusedskip.ConcatLinear(5, 4), TypeError,
     "in_features must be a sequence of ints"),
    ("concat-no-features", lambda: fusedskip.ConcatLinear([], 4), ValueError,
     "in_features must list 1 to 8"),
    ("concat-negative", lambda: fusedskip.ConcatLinear([2, -1], 4), ValueError,
     "in_features[1] must be a non-negative int"),
    ("concat-activation", lambda: fusedskip.ConcatLinear([2], 4, activation="tanh"), ValueError,
     "activation must be None or 'relu'"),
    ("residual-order", lambda: fusedskip.LinearReLUResidual(2, 2, order="relu"), ValueError,
     "order must be"),
    ("residual-shape", lambda: fusedskip.LinearReLUResidual(3, 5)(X, t(5)), ValueError,
     "residual must have the output's shape"),
    ("residual-dtype", lambda: fusedskip.LinearReLUResidual(3, 5)(X.double()), TypeError,
     "input has dtype torch.float64 but weight has dtype torch.float32"),
    ("from-linear-type", lambda: fusedskip.LinearReLUResidual.from_linear(nn.Conv1d(1, 1, 1)),
     TypeError, "linear must be a torch.nn.Linear, got torch.nn.modules.conv.Conv1d"),
    ("from-linear-lazy", lambda: fusedskip.LinearReLUResidual.from_linear(nn.LazyLinear(5)),
     ValueError, "LazyLinear whose in_features are not known yet; run one forward pass"),
    ("concat-float-width", lambda: fusedskip.ConcatLinear([2, 3.0], 4), ValueError,
     "in_features[1] must be a non-negative int, got 3.0"),
    ("concat-bool-width", lambda: fusedskip.ConcatLinear([True, 3], 4), ValueError,
     "in_features[0] must be a non-negative int, got True"),
    ("from-linear-sum", lambda: fusedskip.ConcatLinear.from_linear(nn.Linear(5, 2), [2, 2]),
     ValueError, "sum to 4 but linear has in_features 5"),
    ("from-linear-pruned", lambda: fusedskip.LinearReLUResidual.from_linear(
        torch.nn.utils.prune.random_unstructured(nn.Linear(5, 2), "weight", 0.5)),
     TypeError, "linear.weight is a Tensor, not an nn.Parameter; a forward pre-hook computes it"),
    ("from-linear-parametrized", lambda: fusedskip.LinearReLUResidual.from_linear(
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 2))), TypeError,
     "not an nn.Parameter; a parametrization computes it: apply the parametrization to the "
     "fused layer instead"),
    ("from-linear-kwargs", lambda: fusedskip.LinearReLUResidual.from_linear(
        nn.Linear(5, 2), dtype=torch.float64), TypeError,
     "unexpected keyword argument(s) dtype; the shape, bias, device and dtype come from linear, "
     "and the only option is order"),
    ("from-linear-concat-kwargs", lambda: fusedskip.ConcatLinear.from_linear(
        nn.Linear(5, 2), [2, 3], order="relu_add"), TypeError,
     "unexpected keyword argument(s) order;"),
    ("from-linear-subclass", lambda: fusedskip.LinearReLUResidual.from_linear(ScaledLinear(5, 2)),
     TypeError, "linear is a test_bad_inputs.ScaledLinear, whose forward computes more than "
     "nn.Linear's"),
    ("from-linear-instance-forward", lambda: fusedskip.ConcatLinear.from_linear(
        with_instance_forward(nn.Linear(5, 2)), [2, 3]), TypeError,
     "linear has a forward set on the instance"),
    ("from-linear-hook", lambda: fusedskip.LinearReLUResidual.from_linear(
        with_hook(nn.Linear(5, 2))), TypeError, "linear has hooks, which the fused layer would "
     "not run"),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_bad_input(case):
    _, call, error, text = case
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)


# ConcatLinear's width check: the C fast path (fusedskip._C.widths_match) may only vouch for
# calls the Python check passes, and must vouch for the plain ones, or it saves nothing.
# (id, inputs, in_features, whether the Python check passes, whether the C check vouches)
WIDTH_CASES = [
    ("match", (t(4, 2), t(4, 3)), (2, 3), True, True),
    ("match-list", [t(4, 2), t(4, 3)], [2, 3], True, True),
    ("match-batched", (t(2, 4, 2), t(2, 4, 3)), (2, 3), True, True),
    ("match-parameter", (nn.Parameter(t(4, 2)), t(4, 3)), (2, 3), True, True),
    ("zero-dim", (torch.tensor(1.0), t(4, 3)), (2, 3), True, True),  # the op's checks name it
    ("first-wide", (t(4, 3), t(4, 3)), (2, 3), False, False),
    ("last-narrow", (t(4, 2), t(4, 1, 2)), (2, 3), False, False),
    ("not-a-tensor", (t(4, 2), [[1.0, 2.0, 3.0]]), (2, 3), False, False),
    ("huge-width", (t(4, 2), t(4, 3)), (2, 2 ** 70), False, False),
    ("count", (t(4, 2),), (2, 3), None, False),  # check_layer_inputs counts before either
]


@pytest.mark.parametrize("case", WIDTH_CASES, ids=[c[0] for c in WIDTH_CASES])
def test_concat_width_check_fast_path_vouches_only_for_what_python_passes(case):
    from fusedskip._C import widths_match
    _, inputs, in_features, python_passes, c_vouches = case
    assert widths_match(inputs, in_features) is c_vouches
    if python_passes is not None:
        try:
            fusedskip.reference._check_widths(inputs, in_features, "ConcatLinear")
            passed = True
        except (TypeError, ValueError):
            passed = False
        assert passed is python_passes
    if not c_vouches:  # the layer's own check still refuses, naming the input
        with pytest.raises((TypeError, ValueError), match=r"inputs(\[\d\])?"):
            fusedskip.reference.check_layer_inputs(inputs, in_features, "ConcatLinear")
    else:
        fusedskip.reference.check_layer_inputs(inputs, in_features, "ConcatLinear")


MASK = torch.zeros(4, 1, dtype=torch.uint8)  # (rows, ceil(out_features / 8)) of a 4x3 -> 5 layer
# (id, arguments of the backward op changed from a valid call's, exception type, message)
BACKWARD_CASES = [
    ("output-mask", dict(output_mask=[True]), ValueError,
     "output_mask must have 4 entries (one per input, then weight, bias, pre-activation), got 1"),
    ("grad-shape", dict(grad_output=t(4, 6)), ValueError,
     "grad_output must have the output's shape [4, 5], got [4, 6]"),
    ("grad-dtype", dict(grad_output=t(4, 5).double()), TypeError,
     "grad_output has dtype torch.float64 but weight has dtype torch.float32; all tensors must "
     "share one dtype"),
    ("grad-sparse", dict(grad_output=t(4, 5).to_sparse()), TypeError,
     "grad_output must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ("grad-device", dict(grad_output=t(4, 5).to("meta")), RuntimeError,
     "grad_output is on device meta but weight is on cpu; all tensors must be on one device"),
    ("mask-dtype", dict(relu_mask=MASK.float()), TypeError,
     "relu_mask must be torch.uint8, got torch.float32"),
    ("mask-shape", dict(relu_mask=MASK.new_zeros(4, 2)), ValueError,
     "relu_mask must have shape [4, 1], got [4, 2]"),
    ("mask-sparse", dict(relu_mask=MASK.to_sparse()), TypeError,
     "relu_mask must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ("mask-device", dict(relu_mask=MASK.to("meta")), RuntimeError,
     "relu_mask is on device meta but weight is on cpu"),
    ("mask-none", dict(relu_mask=None), ValueError,
     "relu_mask is None but relu is True; pass the mask fused_linear returned with the output"),
    # Without ReLU the mask goes unread, but a sparse or quantized one sends the call to a kernel
    # that only checks (csrc/fused_linear.cpp): it must not compute there unguarded.
    ("unread-mask-sparse", dict(relu=False, relu_mask=MASK.to_sparse()), TypeError,
     "relu_mask must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ("unread-mask-quantized", dict(relu=False, relu_mask=quantized(MASK.float(), torch.quint8)),
     TypeError, "relu_mask must be torch.uint8, got torch.quint8"),
    ("unread-mask-device", dict(relu=False, relu_mask=MASK.to("meta")), RuntimeError,
     "relu_mask is on device meta but weight is on cpu"),
]


# Fake tensors cannot be quantized: that case reaches the op alone.
BACKWARD_CALLS = [pytest.param(kernel, case, id=f"{kernel}-{case[0]}")
                  for kernel in ("op", "fake") for case in BACKWARD_CASES
                  if not (kernel == "fake" and "quantized" in case[0])]


@pytest.mark.parametrize("kernel, case", BACKWARD_CALLS)
def test_backward_op_bad_input(case, kernel):
    """The backward op called directly: its C++ checks and its fake kernel's (which also serves
    any call with a meta tensor in it, and would otherwise return gradients never computed)
    refuse the same calls with the same message."""
    _, change, error, text = case
    args = dict(grad_output=t(4, 5), inputs=[X], weight=W, relu_mask=MASK, relu=True,
                output_mask=[True] * 4)
    args.update(change)
    with contextlib.ExitStack() as stack:
        if kernel == "fake":
            mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
            args = {k: [mode.from_tensor(x) for x in v] if k == "inputs" else
                    mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                    for k, v in args.items()}
        with pytest.raises(error) as info:
            torch.ops.fusedskip.fused_linear_backward(**args)
    assert str(info.value).splitlines()[0] == "fusedskip: " + text


@pytest.mark.skipif(not fusedskip._ops.HAS_CUDA_KERNELS, reason="a build without CUDA kernels")
@pytest.mark.parametrize("op_name", ["fused_linear", "fused_linear_backward"])
def test_cuda_kernel_checks_before_it_guards_the_weights_device(op_name):
    """A call with any argument on a GPU lands in the CUDA kernel, whose device guard must not
    stand before the op's checks: with the weight still on the CPU (a model not moved) they name
    the arguments; a guard set from it said only "CUDAGuardImpl initialized with non-CUDA
    DeviceType: cpu". Reached here without a GPU by calling the CUDA kernel directly, with the
    input on the meta device in the GPU's place."""
    op = getattr(torch.ops.fusedskip, op_name).default
    x = t(4, 3).to("meta")
    args = ([x], W, None, None, True, False) if op_name == "fused_linear" else \
        (t(4, 5), [x], W, MASK, True, [True] * 4)
    with pytest.raises(RuntimeError, match="^fusedskip: input is on device meta but weight is on "
                                           "cpu; all tensors must be on one device"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


class _TruthTestRaises:
    def __bool__(self):
        raise RuntimeError("no truth value")


@needs_op_checks
@pytest.mark.parametrize("flag", ["no", 1, None, _TruthTestRaises()],
                         ids=["str", "int", "None", "bool-raises"])
def test_eager_entry_takes_bools_only(flag):
    """fusedskip._C.fused_linear, the eager entry the functional API calls, takes the schema's
    bools and nothing else, as the op entered through torch.ops does."""
    for position, name in ((4, "relu"), (5, "residual_before_relu")):
        args = [[X], W, None, None, True, False]
        args[position] = flag
        with pytest.raises(TypeError, match=f"^fusedskip: {name} must be a bool, got "
                                            f"{type(flag).__name__}$"):
            fusedskip._C.fused_linear(*args)


def test_bad_inputs_never_crash_the_interpreter():
    """A sample of bad calls in a fresh interpreter: each raises, the process exits normally."""
    script = """
import torch, fusedskip
calls = [
    lambda: fusedskip.linear_relu_residual(torch.randn(4, 3), torch.randn(5, 4)),
    lambda: fusedskip.linear_concat([torch.randn(4, 1)] * 9, torch.randn(5, 9)),
    lambda: fusedskip.linear_relu_residual(torch.randn(4, 3), torch.randn(5, 3), None, torch.randn(5)),
    lambda: torch.ops.fusedskip.fused_linear_backward(torch.randn(4, 5), [torch.randn(4, 3)],
        torch.randn(5, 3), torch.zeros(1, dtype=torch.uint8), True, [True] * 4),
    lambda: torch.ops.fusedskip.fused_linear_backward(torch.randn(4, 6), [torch.randn(4, 3)],
        torch.randn(5, 3), torch.zeros(4, 1, dtype=torch.uint8), True, [True] * 4),
    lambda: torch.ops.fusedskip.fused_linear_backward(torch.randn(4, 5), [torch.randn(4, 3)],
        torch.randn(5, 3), torch.zeros(4, 1, dtype=torch.uint8), True, [True]),
    lambda: torch.ops.fusedskip.fused_linear([], torch.randn(5, 3), None, None, True, False),
    # The argument checks' own entry point, misused (the reference path calls it).
    lambda: fusedskip._C.check_args([torch.randn(4, 3)], torch.randn(5, 3)),
    lambda: fusedskip._C.check_args(torch.randn(4, 3), torch.randn(5, 3), None, None),
    lambda: fusedskip._C.check_args([None], torch.randn(5, 3), None, None),
    lambda: fusedskip._C.check_args([torch.randn(4, 3)] * 1000, torch.randn(5, 3000), None, None),
]
for call in calls:
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as error:
        print(type(error).__name__)
    else:
        raise SystemExit("no exception")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ValueError"] * 7 + ["TypeError"] * 3 + ["ValueError"]


FUZZ = settings(max_examples=int(os.environ.get("FUSEDSKIP_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# Calls with no fault, one, or several, drawn at random: the op's C++ checks (which the reference
# path runs where the extension is loaded) and reference.check_args (which runs under
# torch.compile, as the fake kernel's checks) accept the same calls, and refuse each faulty one
# with the same exception and message.
FAULTS = ["count-0", "count-9", "input-dtype", "input-device", "input-sparse", "input-0d",
          "input-leading", "input-width", "input-not-tensor", "weight-dtype", "weight-1d",
          "weight-3d", "weight-not-tensor", "bias-dtype", "bias-shape", "bias-device",
          "residual-dtype", "residual-shape", "residual-device", "residual-not-tensor"]


def _odd_dtypes():
    """Tensors of dtypes the op refuses, named by Python and C++ alike."""
    def qint8(t):
        with warnings.catch_warnings():  # quantized tensors are deprecated; still a dtype to refuse
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)

    makers = [lambda t: t.long(), lambda t: t.bool(), lambda t: t.to(torch.complex64), qint8]
    for name in ("float8_e4m3fn", "uint16"):
        if hasattr(torch, name):
            makers.append(lambda t, dtype=getattr(torch, name): t.to(dtype))
    return makers


@st.composite
def faulty_calls(draw):
    # At most one fault per argument (the first drawn), so that each stays what it is.
    faults = draw(st.lists(st.sampled_from(FAULTS), max_size=3,
                           unique_by=lambda f: f.split("-")[0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    floats = [d for d in (torch.float32, torch.float64, torch.float16) if d != dtype]
    odd = draw(st.sampled_from([lambda t, d=d: t.to(d) for d in floats] + _odd_dtypes()))
    # The weight's is never a float dtype: the rest could then be changed to match it.
    odd_weight = draw(st.sampled_from(_odd_dtypes()))
    not_tensor = draw(st.sampled_from([1.0, [0.0], "x", numpy.zeros(1)]))
    leading = draw(st.sampled_from([(), (0,), (3,), (2, 4)]))
    widths = [1] * 9 if "count-9" in faults else draw(
        st.lists(st.integers(1, 5), min_size=1, max_size=8))
    if "input-leading" in faults and len(widths) == 1:  # a lone input's are the output's dims
        widths = widths + [1]
    out = draw(st.integers(1, 6))
    i = draw(st.integers(1 if "input-leading" in faults else 0, len(widths) - 1))

    def tensor(*shape, kind=dtype):
        return torch.zeros(shape, dtype=kind)

    inputs = [tensor(*leading, w) for w in widths]
    weight = tensor(out, sum(widths))
    bias = tensor(out) if draw(st.booleans()) else None
    residual = tensor(*leading, out) if draw(st.booleans()) else None
    if any(f.startswith("bias") for f in faults) and bias is None:
        bias = tensor(out)
    if any(f.startswith("residual") for f in faults) and residual is None:
        residual = tensor(*leading, out)
    wrong_residual = [tensor(*leading, out + 1), tensor(2, *leading, out)]
    wrong_residual += [tensor(out)] if leading else []
    changes = {
        "input-dtype": lambda: inputs.__setitem__(i, odd(inputs[i])),
        "input-device": lambda: inputs.__setitem__(i, inputs[i].to("meta")),
        "input-sparse": lambda: inputs.__setitem__(i, inputs[i].to_sparse()),
        "input-0d": lambda: inputs.__setitem__(i, tensor()),
        "input-leading": lambda: inputs.__setitem__(i, tensor(*leading, 1, widths[i])),
        "input-width": lambda: inputs.__setitem__(i, tensor(*leading, widths[i] + 1)),
        "input-not-tensor": lambda: inputs.__setitem__(i, not_tensor),
    }
    # count-0 after the inputs' own faults, which it then takes away.
    for fault in sorted(faults, key=lambda f: f == "count-0"):
        if fault in changes:
            changes[fault]()
        elif fault == "count-0":
            inputs.clear()
        elif fault == "weight-dtype":
            weight = odd_weight(weight)
        elif fault == "weight-1d":
            weight = tensor(sum(widths))
        elif fault == "weight-3d":
            weight = tensor(1, out, sum(widths))
        elif fault == "weight-not-tensor":
            weight = not_tensor
        elif fault == "bias-dtype":
            bias = odd(bias)
        elif fault == "bias-shape":
            bias = draw(st.sampled_from([tensor(out + 1), tensor(1, out), tensor()]))
        elif fault == "bias-device":
            bias = bias.to("meta")
        elif fault == "residual-dtype":
            residual = odd(residual)
        elif fault == "residual-shape":
            residual = draw(st.sampled_from(wrong_residual))
        elif fault == "residual-device":
            residual = residual.to("meta")
        elif fault == "residual-not-tensor":
            residual = not_tensor
    return faults, (inputs, weight, bias, residual)


def _outcome(check, args):
    try:
        check(*args)
    except (TypeError, ValueError, RuntimeError) as error:
        return type(error), str(error).splitlines()[0]
    return None, None


@needs_op_checks
@FUZZ
@given(faulty_calls())
def test_op_checks_and_python_checks_agree(call):
    faults, args = call
    op_error, op_message = _outcome(reference._op_check_args, args)
    python_error, python_message = _outcome(reference.check_args, args)
    assert (op_error is None) == (not faults), (faults, op_message)
    assert (op_error, op_message) == (python_error, python_message), faults
