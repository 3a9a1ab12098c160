"""Drop-in layers: nn.Linear's parameters and initialisation, fused maths on the GPU.

On CUDA tensors they call the fused op; elsewhere (CPU, meta, ...) they compute through the
reference PyTorch path, which on a CPU is as fast as the fused kernel and bit-identical to the
reference layers. The fused op's CPU kernel stays reachable through fusedskip.functional.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _ops, functional, reference

__all__ = ["LinearReLUResidual", "ConcatLinear"]

_warned_no_cuda_kernels = False


def _use_fused(tensor) -> bool:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
        return False
    if _ops.HAS_CUDA_KERNELS:
        return True
    global _warned_no_cuda_kernels
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn("fusedskip: this build has no CUDA kernels (built without CUDA, or the "
                      "extension failed to load); the layers use the reference PyTorch path on "
                      "the GPU. Rebuild on a machine with the CUDA toolkit to get the fused ops.",
                      RuntimeWarning, stacklevel=3)
    return False


class LinearReLUResidual(reference.LinearReLUResidual):
    __doc__ = reference.LinearReLUResidual.__doc__

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if _use_fused(input):
            return functional.linear_relu_residual(input, self.weight, self.bias, residual,
                                                   order=self.order)
        return super().forward(input, residual)


class ConcatLinear(reference.ConcatLinear):
    __doc__ = reference.ConcatLinear.__doc__

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if inputs and _use_fused(inputs[0]):
            self._check_inputs(inputs)
            return functional.linear_concat(inputs, self.weight, self.bias,
                                            activation=self.activation)
        return super().forward(*inputs)
