"""The functional API: each call is one dispatch of the C++ op ``fusedskip::fused_linear``
(its CPU kernel on CPU tensors, its CUDA kernel on CUDA tensors), autograd included.

Argument checks live in the op itself (C++), so the Python here stays a few attribute look-ups:
at the small sizes of a skip-connection MLP, host time per call is the cost that matters. For the
same reason eager calls enter the op through ``fusedskip._C.fused_linear`` (no per-argument
boxing), while torch.compile traces ``torch.ops.fusedskip.fused_linear``: one op either way.

Each function follows the ``__torch_function__`` protocol, as ``torch.nn.functional`` does, so
torch.fx records a call as one node and tensor subclasses can override it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.compiler import is_compiling
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_variadic

from . import _ops, reference

__all__ = ["linear_relu_residual", "linear_concat"]


def _refuse_non_tensor(name, value, optional=False):
    """Under torch.compile, where the eager entry's checks do not run: the same message, not the
    dispatcher's schema error."""
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        raise TypeError(f"fusedskip: {name} must be a Tensor, got {type(value).__name__}")


def linear_relu_residual(input: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None,
                         residual: Optional[torch.Tensor] = None, *,
                         order: str = "relu_add") -> torch.Tensor:
    """Fused ``relu(input @ weight.T + bias) + residual`` (order="relu_add") or
    ``relu(input @ weight.T + bias + residual)`` (order="add_relu").

    input: (..., in_features); weight: (out_features, in_features); bias: (out_features) or None;
    residual: the output's shape (..., out_features) or None (then the result is just the ReLU).
    """
    # A torch.fx Proxy or a tensor subclass among the arguments decides what the call does.
    if has_torch_function_variadic(input, weight, bias, residual):
        args = (input, weight, bias, residual)
        return handle_torch_function(linear_relu_residual, args, *args, order=order)
    if order == "relu_add":
        residual_before_relu = False
    elif order == "add_relu":
        residual_before_relu = True
    else:
        reference.check_order(order)
    if not _ops.AVAILABLE:
        return reference.linear_relu_residual(input, weight, bias, residual, order=order)
    if not is_compiling():
        return _ops.fused_linear_eager([input], weight, bias, residual, True, residual_before_relu)
    _refuse_non_tensor("input", input)
    _refuse_non_tensor("weight", weight)
    _refuse_non_tensor("bias", bias, optional=True)
    _refuse_non_tensor("residual", residual, optional=True)
    return _ops.fused_linear([input], weight, bias, residual, True, residual_before_relu)[0]


def linear_concat(inputs: Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *,
                  activation: Optional[str] = None) -> torch.Tensor:
    """Fused ``F.linear(torch.cat(inputs, -1), weight, bias)`` (then ReLU if activation="relu"),
    without saving the concatenation for backward (small and mid-size layers never build it;
    larger ones on a BLAS GEMM build it transiently for that GEMM).

    inputs: 1 to 8 tensors (..., k_i) with the same leading dims; weight: (out_features, sum(k_i)).
    """
    relevant = reference.concat_dispatch_args(inputs, weight, bias)
    if has_torch_function(relevant):
        return handle_torch_function(linear_concat, relevant, inputs, weight, bias,
                                     activation=activation)
    inputs = reference.as_input_list(inputs)
    if activation is None:
        relu = False
    elif activation == "relu":
        relu = True
    else:
        reference.check_activation(activation)
    if not _ops.AVAILABLE:
        return reference.linear_concat(inputs, weight, bias, activation=activation)
    if not is_compiling():
        return _ops.fused_linear_eager(inputs, weight, bias, None, relu, False)
    for i, x in enumerate(inputs):
        _refuse_non_tensor(f"inputs[{i}]", x)
    _refuse_non_tensor("weight", weight)
    _refuse_non_tensor("bias", bias, optional=True)
    return _ops.fused_linear(inputs, weight, bias, None, relu, False)[0]
