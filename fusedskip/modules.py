"""Drop-in layers: nn.Linear's parameters and initialisation, fused maths on the GPU.

On CUDA tensors they call the fused op; elsewhere (CPU, meta, ...) they compute through the
reference PyTorch path, bit-identical to the reference layers. The fused op's CPU kernel stays
reachable through fusedskip.functional, which costs less host time per call at small sizes.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_variadic

from . import _ops, functional, reference

__all__ = ["LinearReLUResidual", "ConcatLinear"]

_warned_no_cuda_kernels = False
_warned_old_gpu = set()  # device indices
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, for its caller, that points at the user's code: past
    fusedskip's frames and torch's (a module call's _call_impl, __torch_function__ dispatch),
    however many there are."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_HERE, _TORCH)):
        level, frame = level + 1, frame.f_back
    return level


def _use_fused(tensor) -> bool:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        return False
    if not _ops.HAS_CUDA_KERNELS:
        global _warned_no_cuda_kernels
        if not _warned_no_cuda_kernels and not torch.compiler.is_compiling():
            _warned_no_cuda_kernels = True
            warnings.warn("fusedskip: this build has no CUDA kernels (built without CUDA, or the "
                          "extension failed to load); the layers use the reference PyTorch path "
                          "on the GPU. Rebuild on a machine with the CUDA toolkit to get the "
                          "fused ops.", RuntimeWarning, stacklevel=_user_stacklevel())
        return False
    # Whether this GPU can run the kernels, asked of torch once per device. A dict read here, which
    # torch.compile traces (and guards on); where the first call of a device is being compiled,
    # the answer is not asked there (torch's device queries would break the graph): the fused op
    # is taken, and on a GPU too old for it the op itself says so.
    index = tensor.get_device()
    runs = _ops.gpu_runs_kernels_known.get(index)
    if runs is None:
        if torch.compiler.is_compiling():
            return True
        runs = _ops.gpu_runs_kernels(index)
    if runs:
        return True
    if index not in _warned_old_gpu and not torch.compiler.is_compiling():
        _warned_old_gpu.add(index)
        major, minor = torch.cuda.get_device_capability(index)
        warnings.warn(f"fusedskip: {torch.cuda.get_device_name(index)} (cuda:{index}) has compute "
                      f"capability {major}.{minor}, and the CUDA kernels need 8.0 or newer; the "
                      "layers use the reference PyTorch path on it.", RuntimeWarning,
                      stacklevel=_user_stacklevel())
    return False


# What the layers compute, as functions of their own: torch.fx records each layer's call as one
# node (the __torch_function__ protocol), and a traced graph then still chooses by device when it
# runs.

def linear_relu_residual_layer(input, weight, bias=None, residual=None, *, order="relu_add"):
    """LinearReLUResidual's computation: the fused op on CUDA tensors, the reference elsewhere."""
    if has_torch_function_variadic(input, weight, bias, residual):
        args = (input, weight, bias, residual)
        return handle_torch_function(linear_relu_residual_layer, args, *args, order=order)
    if _use_fused(input):
        return functional.linear_relu_residual(input, weight, bias, residual, order=order)
    return reference.linear_relu_residual(input, weight, bias, residual, order=order)


def linear_concat_layer(inputs, weight, bias=None, *, activation=None):
    """ConcatLinear's computation: the fused op on CUDA tensors, the reference elsewhere."""
    relevant = reference.concat_dispatch_args(inputs, weight, bias)
    if has_torch_function(relevant):
        return handle_torch_function(linear_concat_layer, relevant, inputs, weight, bias,
                                     activation=activation)
    if inputs and _use_fused(inputs[0]):
        return functional.linear_concat(inputs, weight, bias, activation=activation)
    return reference.linear_concat(inputs, weight, bias, activation=activation)


class LinearReLUResidual(reference.LinearReLUResidual):
    __doc__ = reference.LinearReLUResidual.__doc__

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_relu_residual_layer(input, self.weight, self.bias, residual,
                                          order=self.order)

    forward.__doc__ = reference.LinearReLUResidual.forward.__doc__


class ConcatLinear(reference.ConcatLinear):
    __doc__ = reference.ConcatLinear.__doc__

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        reference.check_layer_inputs(inputs, self.in_features, type(self).__name__)
        return linear_concat_layer(inputs, self.weight, self.bias,
                                   activation=self.activation)

    forward.__doc__ = reference.ConcatLinear.forward.__doc__
