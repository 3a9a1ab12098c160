"""Pure-PyTorch reference layers: the ground truth every fused result is tested against.

The modules here keep ``nn.Linear``'s parameter names, shapes and initialisation, so their
state_dicts load into ``nn.Linear``, into these and into the fused modules alike. Their maths is
plain PyTorch. Their argument checks are the C++ op's own where the compiled extension is loaded
(check_call), else check_args, a Python copy of the same rules and messages that also serves the
fake kernels: so a bad call fails the same way on every path.
"""

from __future__ import annotations

import collections.abc
import operator
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.compiler import is_compiling
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_variadic

__all__ = ["LinearReLUResidual", "ConcatLinear", "linear_relu_residual", "linear_concat"]

MAX_INPUTS = 8  # csrc/fused_linear.h: kMaxInputs
ORDERS = ("relu_add", "add_relu")
ACTIVATIONS = (None, "relu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -------------------------------------------------------------------------------------------------
# Argument checks (mirror of check_forward_args in csrc/fused_linear.cpp)


def check_order(order, where="linear_relu_residual"):
    if order not in ORDERS:
        raise ValueError(f"{where}: order must be 'relu_add' (relu(x W^T + b) + residual) or "
                         f"'add_relu' (relu(x W^T + b + residual)), got {order!r}")


def check_activation(activation, where="linear_concat"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be None or 'relu', got {activation!r}")


def as_input_list(inputs, where="linear_concat"):
    """The concat form's inputs as a list; a lone tensor is refused (iterating it would silently
    split it into rows)."""
    if isinstance(inputs, torch.Tensor):
        raise TypeError(f"{where}: inputs must be a sequence of tensors, e.g. [x1, x2], "
                        f"got a single Tensor of shape {list(inputs.shape)}")
    if not isinstance(inputs, (list, tuple)):
        try:
            inputs = list(inputs)
        except TypeError:
            raise TypeError(f"{where}: inputs must be a sequence of tensors, "
                            f"got {type(inputs).__name__}") from None
    return inputs


def concat_dispatch_args(inputs, weight, bias):
    """What the __torch_function__ protocol looks at in a concat call: each input, or `inputs`
    itself where it is no list or tuple (a traced value such as x.chunk(2, -1) under torch.fx,
    which must not be iterated)."""
    if isinstance(inputs, (list, tuple)):
        return (*inputs, weight, bias)
    return (inputs, weight, bias)


def _check_unpacked(name, tensor):
    """What the C++ entry points check as they unpack an argument (csrc/python_bindings.cpp)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fusedskip: {name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.is_nested:
        raise TypeError(f"fusedskip: {name} is a nested tensor; pass a dense one "
                        "(e.g. t.to_padded_tensor(0.0))")


def check_tensor(name, tensor, weight, same_dtype=True):
    _check_unpacked(name, tensor)
    if tensor.layout != torch.strided:
        raise TypeError(f"fusedskip: {name} must be a dense (strided) tensor, "
                        f"got layout {tensor.layout}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fusedskip: {name} has dtype {tensor.dtype}; expected torch.float16, "
                        "torch.bfloat16, torch.float32 or torch.float64")
    if tensor is weight:
        return
    if same_dtype and tensor.dtype != weight.dtype:
        raise TypeError(f"fusedskip: {name} has dtype {tensor.dtype} but weight has dtype "
                        f"{weight.dtype}; all tensors must share one dtype")
    if tensor.device != weight.device:
        raise RuntimeError(f"fusedskip: {name} is on device {tensor.device} but weight is on "
                           f"{weight.device}; all tensors must be on one device")


def check_args(inputs, weight, bias=None, residual=None, *, wider_residual=False):
    """Validate a call of the fused op family; raise ValueError / TypeError / RuntimeError naming
    the argument. Returns the output shape. wider_residual: the residual may have a wider dtype
    than the rest (under autocast, see autocast_residual)."""
    count = len(inputs)

    def input_name(i):
        return "input" if count == 1 else f"inputs[{i}]"

    # In the C++ checks' order, so that a call with several faults gets the same message: the
    # arguments as unpacked, then the op's checks (check_forward_args in csrc/fused_linear.cpp).
    for i, x in enumerate(inputs):
        _check_unpacked(input_name(i), x)
    for name, tensor in (("weight", weight), ("bias", bias), ("residual", residual)):
        if tensor is not None or name == "weight":
            _check_unpacked(name, tensor)
    if not 1 <= count <= MAX_INPUTS:
        raise ValueError(f"fusedskip: inputs must hold 1 to {MAX_INPUTS} tensors, got {count}")
    check_tensor("weight", weight, weight)
    if weight.dim() != 2:
        raise ValueError("fusedskip: weight must be 2-D (out_features, in_features), "
                         f"got shape {list(weight.shape)}")
    leading = None
    for i, x in enumerate(inputs):
        check_tensor(input_name(i), x, weight)
        if x.dim() < 1:
            raise ValueError(f"fusedskip: {input_name(i)} must have at least one dimension "
                             "(..., in_features), got a 0-d tensor")
        if leading is None:
            leading = list(x.shape[:-1])
        elif list(x.shape[:-1]) != leading:
            raise ValueError(f"fusedskip: {input_name(i)} has leading dims {list(x.shape[:-1])} "
                             f"but inputs[0] has {leading}; all inputs must share their leading "
                             "dims (only the last dim may differ)")
    widths = [x.shape[-1] for x in inputs]
    if sum(widths) != weight.shape[1]:
        if count == 1:
            raise ValueError(f"fusedskip: input has {widths[0]} features (its last dim) but weight "
                             f"has in_features {weight.shape[1]} (weight shape "
                             f"{list(weight.shape)})")
        raise ValueError(f"fusedskip: the inputs' last dims {widths} sum to {sum(widths)} but "
                         f"weight has in_features {weight.shape[1]} (weight shape "
                         f"{list(weight.shape)})")
    out_shape = leading + [weight.shape[0]]
    if bias is not None:
        check_tensor("bias", bias, weight)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"fusedskip: bias must have shape [{weight.shape[0]}] "
                             f"(out_features), got {list(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual, weight, same_dtype=not wider_residual)
        if list(residual.shape) != out_shape:
            raise ValueError(f"fusedskip: residual must have the output's shape {out_shape}, got "
                             f"{list(residual.shape)} (residuals are not broadcast)")
    return out_shape


try:  # the op's own argument checks, run by its C++ code (csrc/python_bindings.cpp)
    from ._C import check_args as _op_check_args, widths_match as _op_widths_match
except ImportError:  # the extension is not built, or cannot be loaded here
    _op_check_args = _op_widths_match = None


def check_call(inputs, weight, bias=None, residual=None, *, wider_residual=False):
    """check_args for a call the reference functions are about to run. These are the modules'
    path off the GPU, where check_args' Python costs as much as half the layer's eager ops at
    64x10->10; so where the compiled extension is loaded, the op's C++ code runs the same checks.
    check_args itself runs where that code cannot: under torch.compile (which traces Python
    only), for symbolic shapes, and for a residual wider than the rest (autocast only)."""
    if (_op_check_args is None or wider_residual or is_compiling()
            or not _op_check_args(inputs, weight, bias, residual)):
        check_args(inputs, weight, bias, residual, wider_residual=wider_residual)


# Whether autocast is on for any device: one C call, where autocast_args would look up weight's
# device first, on every call of the modules' CPU path. A torch without it always asks.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_on(weight) -> bool:
    if not isinstance(weight, torch.Tensor):
        return False
    try:
        return torch.is_autocast_enabled(weight.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def autocast_args(weight, bias, inputs):
    """`(weight, bias, inputs)` as the op's autocast kernel hands them on to the linear
    (csrc/autocast.cpp): under torch.autocast on weight's device, each floating tensor there other
    than float64 cast to the autocast dtype, as nn.Linear's are. So a layer gives the same dtype on
    the reference path (the modules' CPU path) as through the op, and the same error where a
    float64 operand meets others autocast casts (csrc/fused_linear.cpp, check_autocast_operands)."""
    if not _autocast_on(weight):
        return weight, bias, inputs
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device)

    def castable(t):
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device

    named = [("input" if len(inputs) == 1 else f"inputs[{i}]", x) for i, x in enumerate(inputs)]
    named += [("weight", weight), ("bias", bias)]
    wide = next((name for name, t in named if castable(t) and t.dtype == torch.float64), None)
    narrow = next(((name, t.dtype) for name, t in named
                   if castable(t) and t.dtype != torch.float64), None)
    if wide and narrow:
        raise TypeError(f"fusedskip: under torch.autocast, {narrow[0]} ({narrow[1]}) is cast to "
                        f"{dtype} but {wide} is torch.float64, which autocast leaves alone; pass "
                        "the inputs, weight and bias all as float64, or none of them")

    def cast(t):
        return t.to(dtype) if castable(t) and t.dtype != torch.float64 else t

    return cast(weight), cast(bias), [cast(x) for x in inputs]


def autocast_residual(weight, residual):
    """The residual under autocast, given the linear's (cast) weight: as eager's add meets
    `relu(linear(x))`, in the promoted dtype. Returns (residual, wider): cast to the linear's dtype
    where that loses nothing (wider False), else as it is, for an add in its own, wider dtype
    (float32 next to bfloat16) after the linear, as csrc/autocast.cpp does. A dtype the op does
    not compute in is left for the checks to name (promote_types would raise first for some,
    float8 among them, without naming the argument)."""
    if not (isinstance(residual, torch.Tensor) and residual.dtype in _FLOAT_DTYPES
            and isinstance(weight, torch.Tensor) and weight.dtype in _FLOAT_DTYPES):
        return residual, False
    if torch.promote_types(weight.dtype, residual.dtype) == weight.dtype:
        return residual.to(weight.dtype), False
    return residual, True


# -------------------------------------------------------------------------------------------------
# Functional reference


def linear_relu_residual(input, weight, bias=None, residual=None, *, order="relu_add"):
    """relu(input @ weight.T + bias) + residual  (order="relu_add"), or
    relu(input @ weight.T + bias + residual)      (order="add_relu"), in eager PyTorch."""
    # A torch.fx Proxy or a tensor subclass among the arguments decides what the call does.
    if has_torch_function_variadic(input, weight, bias, residual):
        args = (input, weight, bias, residual)
        return handle_torch_function(linear_relu_residual, args, *args, order=order)
    check_order(order)
    wider_residual = False
    if _any_autocast() and _autocast_on(weight):
        weight, bias, (input,) = autocast_args(weight, bias, [input])
        residual, wider_residual = autocast_residual(weight, residual)
    check_call([input], weight, bias, residual, wider_residual=wider_residual)
    out = F.linear(input, weight, bias)
    if residual is not None and order == "add_relu":
        return torch.relu(out + residual)
    out = torch.relu(out)
    return out if residual is None else out + residual


def linear_concat(inputs, weight, bias=None, *, activation=None):
    """F.linear(torch.cat(inputs, -1), weight, bias), then ReLU if activation == "relu"."""
    relevant = concat_dispatch_args(inputs, weight, bias)
    if has_torch_function(relevant):
        return handle_torch_function(linear_concat, relevant, inputs, weight, bias,
                                     activation=activation)
    inputs = as_input_list(inputs)
    check_activation(activation)
    if _any_autocast():
        weight, bias, inputs = autocast_args(weight, bias, inputs)
    check_call(inputs, weight, bias)
    out = F.linear(torch.cat(inputs, -1), weight, bias)
    return torch.relu(out) if activation == "relu" else out


def check_layer_inputs(inputs, in_features, layer):
    """A ConcatLinear's check of its call: one input per entry of `in_features`, each as wide.

    A function the __torch_function__ protocol sees, so that torch.fx records it as a node, kept
    by dead-code elimination: a traced graph checks each call it runs, and tracing a bare layer
    works, whose `*inputs` FX hands over as one value that cannot be counted while tracing. Every
    call of the layer runs this (the modules' CPU path costs host time per call): messages are
    built only on failure."""
    relevant = inputs if isinstance(inputs, tuple) else (inputs,)
    if has_torch_function(relevant):
        return handle_torch_function(check_layer_inputs, relevant, inputs, in_features, layer)
    if len(inputs) != len(in_features):
        raise ValueError(f"{layer}: expected {len(in_features)} inputs (in_features="
                         f"{in_features}), got {len(inputs)}{_one_iterable_hint(inputs)}")
    # The common case in one C call (a shape read per tensor from Python cost ~2.5 µs a call of a
    # two-input 64x10 layer); anything it does not vouch for goes through the Python check, which
    # names it.
    # Not under torch.compile, which would break the graph at a C function it cannot trace.
    if _op_widths_match is not None and not is_compiling() and \
            _op_widths_match(inputs, in_features):
        return None
    if torch.jit.is_tracing():
        # torch.jit.trace hands out sizes as tensors, and comparing one warns that the trace may
        # be wrong. It is not (the check feeds no value into the graph); the trace just does not
        # repeat the check when it runs, as it repeats no Python.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _check_widths(inputs, in_features, layer)
    return _check_widths(inputs, in_features, layer)


torch.fx.node.has_side_effect(check_layer_inputs)


def _one_iterable_hint(inputs):
    """What to do where the inputs came as one list, tuple or generator (the functional API's
    form) instead of one argument each."""
    if len(inputs) == 1 and isinstance(inputs[0], (list, tuple, collections.abc.Iterator)):
        return "; pass the inputs as separate arguments: layer(x1, x2), or layer(*inputs)"
    return ""


def _check_widths(inputs, in_features, layer):
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer}: inputs[{i}] must be a Tensor, got {type(x).__name__}"
                            f"{_one_iterable_hint(inputs)}")
        if x.dim() >= 1 and x.shape[-1] != in_features[i]:
            raise ValueError(f"{layer}: inputs[{i}] has {x.shape[-1]} features (its last dim) but "
                             f"in_features[{i}] is {in_features[i]}")


# -------------------------------------------------------------------------------------------------
# Modules


class _LinearParameters(nn.Module):
    """weight (out_features, in_features) and optional bias (out_features), initialised exactly as
    nn.Linear initialises them."""

    def _init_parameters(self, in_total, out_features, bias, device, dtype):
        factory = {"device": device, "dtype": dtype}
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_total), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling it; without it, the user
        # would get TorchScript's complaint about a keyword-only argument deep inside the layer.
        raise RuntimeError(f"fusedskip: {self._get_name()} does not support TorchScript "
                           "(torch.jit.script); use torch.compile, torch.export or "
                           "torch.jit.trace instead")

    # What from_linear's kwargs may set: the rest comes from the Linear.
    _FROM_LINEAR_OPTIONS = ()

    @classmethod
    def _check_linear(cls, linear, kwargs):
        if not isinstance(linear, nn.Linear):
            kind = type(linear)
            raise TypeError(f"{cls.__name__}.from_linear: linear must be a torch.nn.Linear, "
                            f"got {kind.__module__}.{kind.__qualname__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{cls.__name__}.from_linear: linear is a LazyLinear whose "
                             "in_features are not known yet; run one forward pass through it "
                             "first")
        for name in ("weight", "bias"):
            value = getattr(linear, name)
            if value is None or isinstance(value, nn.Parameter):
                continue
            if parametrize.is_parametrized(linear, name):
                how = ("a parametrization computes it: apply the parametrization to the fused "
                       "layer instead, or make it permanent first "
                       f"(torch.nn.utils.parametrize.remove_parametrizations(linear, '{name}'))")
            elif linear._forward_pre_hooks:
                how = ("a forward pre-hook computes it (torch.nn.utils.prune, the old weight_norm "
                       "or spectral_norm): make it permanent first "
                       f"(torch.nn.utils.prune.remove(linear, '{name}'), remove_weight_norm)")
            else:
                how = "the fused layer shares the Linear's parameters, so it needs them to be ones"
            raise TypeError(f"{cls.__name__}.from_linear: linear.{name} is a "
                            f"{type(value).__qualname__}, not an nn.Parameter; {how}")
        # The fused layer computes nn.Linear's maths on the Linear's parameters: whatever else
        # the Linear's call would run, it would silently leave out.
        kind = type(linear)
        if kind.forward is not nn.Linear.forward:
            raise TypeError(f"{cls.__name__}.from_linear: linear is a "
                            f"{kind.__module__}.{kind.__qualname__}, whose forward computes "
                            "more than nn.Linear's (e.g. quantization-aware training's fake "
                            "quantization or folded BatchNorm), which the fused layer would "
                            "leave out; convert it to a plain nn.Linear first")
        if "forward" in vars(linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear has a forward set on the "
                            "instance (as adapters do), which the fused layer would leave out; "
                            "merge it into the weights first")
        if (linear._forward_pre_hooks or linear._forward_hooks or linear._backward_hooks
                or linear._backward_pre_hooks):
            raise TypeError(f"{cls.__name__}.from_linear: linear has hooks, which the fused "
                            "layer would not run; remove them, or register them on the fused "
                            "layer instead")
        unknown = sorted(set(kwargs) - set(cls._FROM_LINEAR_OPTIONS))
        if unknown:
            allowed = ", ".join(cls._FROM_LINEAR_OPTIONS)
            raise TypeError(f"{cls.__name__}.from_linear: unexpected keyword argument(s) "
                            f"{', '.join(unknown)}; the shape, bias, device and dtype come from "
                            f"linear, and the only option is {allowed}")

    @classmethod
    def _wrap(cls, linear, *args, **kwargs):
        # Built on the meta device (no allocation, no init), then given linear's own parameters.
        module = cls(*args, bias=linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype, **kwargs)
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)  # in an eval model, an eval layer
        return module


class LinearReLUResidual(_LinearParameters):
    """y = relu(x W^T + b) + residual (order="relu_add", ResNet-style) or
    y = relu(x W^T + b + residual) (order="add_relu"); residual is optional.

    Args: in_features, out_features, bias, device, dtype as nn.Linear's (the same parameters,
    names and initialisation); order: "relu_add" or "add_relu".

    Shapes: input (..., in_features), residual None or the output's shape (..., out_features),
    not broadcast. float16, bfloat16, float32 or float64. fusedskip.LinearReLUResidual runs the
    fused op on CUDA tensors and fusedskip.reference.LinearReLUResidual's PyTorch ops
    elsewhere. Bad arguments raise TypeError / ValueError naming them."""

    _FROM_LINEAR_OPTIONS = ("order",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 order: str = "relu_add", device=None, dtype=None) -> None:
        """The arguments are the class docstring's."""
        super().__init__()
        check_order(order, type(self).__name__)
        self.in_features = in_features
        self.order = order
        self._init_parameters(in_features, out_features, bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A layer sharing `linear`'s weight and bias (no copy); kwargs: order."""
        cls._check_linear(linear, kwargs)
        return cls._wrap(linear, linear.in_features, linear.out_features, **kwargs)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input (..., in_features); residual, if given, the output's shape (..., out_features),
        added after the ReLU (order="relu_add") or before it (order="add_relu")."""
        return linear_relu_residual(input, self.weight, self.bias, residual, order=self.order)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, order={self.order!r}")


def _check_in_features(in_features, where):
    if isinstance(in_features, int) or not isinstance(in_features, Sequence):
        raise TypeError(f"{where}: in_features must be a sequence of ints, one per input "
                        f"(e.g. (15, 10)), got {in_features!r}")
    widths = tuple(in_features)
    if not 1 <= len(widths) <= MAX_INPUTS:
        raise ValueError(f"{where}: in_features must list 1 to {MAX_INPUTS} input widths, "
                         f"got {len(widths)}")
    checked = []
    for i, width in enumerate(widths):
        try:  # any integer type (numpy's too), as nn.Linear takes; not bools, floats, tensors
            value = operator.index(width)
        except TypeError:
            value = None
        if isinstance(width, (bool, torch.Tensor)) or value is None or value < 0:
            raise ValueError(f"{where}: in_features[{i}] must be a non-negative int, "
                             f"got {width!r}")
        checked.append(value)
    return tuple(checked)


class ConcatLinear(_LinearParameters):
    """y = cat(inputs, -1) W^T + b, then ReLU if activation == "relu" (UNet/DenseNet-style skip).

    `in_features` lists the width of each input; the weight is (out_features, sum(in_features)),
    so a state_dict moves to and from an nn.Linear(sum(in_features), out_features).

    Args: in_features, a sequence of 1 to 8 widths; out_features, bias, device, dtype as
    nn.Linear's; activation: None or "relu".

    Shapes: one input per width, (..., in_features[i]), the same leading dims. float16,
    bfloat16, float32 or float64. fusedskip.ConcatLinear runs the fused op on CUDA tensors
    (never saving the concatenation) and fusedskip.reference.ConcatLinear's PyTorch ops
    elsewhere. Bad arguments
    raise TypeError / ValueError naming them."""

    _FROM_LINEAR_OPTIONS = ("activation",)

    def __init__(self, in_features: Sequence[int], out_features: int, bias: bool = True, *,
                 activation: Optional[str] = None, device=None, dtype=None) -> None:
        """The arguments are the class docstring's."""
        super().__init__()
        self.in_features = _check_in_features(in_features, type(self).__name__)
        check_activation(activation, type(self).__name__)
        self.activation = activation
        self._init_parameters(sum(self.in_features), out_features, bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_features: Sequence[int], **kwargs):
        """A layer sharing `linear`'s weight and bias (no copy), splitting its input into widths
        `in_features`; kwargs: activation."""
        cls._check_linear(linear, kwargs)
        widths = _check_in_features(in_features, f"{cls.__name__}.from_linear")
        if sum(widths) != linear.in_features:
            raise ValueError(f"{cls.__name__}.from_linear: in_features {list(widths)} sum to "
                             f"{sum(widths)} but linear has in_features {linear.in_features}")
        return cls._wrap(linear, widths, linear.out_features, **kwargs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The inputs in the order of in_features, each (..., in_features[i]), passed
        separately: layer(h2, h3) for cat([h2, h3], -1)."""
        check_layer_inputs(inputs, self.in_features, type(self).__name__)
        return linear_concat(inputs, self.weight, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")

