"""fusedskip: fused skip-connection layers for PyTorch.

    linear_relu_residual(input, weight, bias=None, residual=None, *, order="relu_add")
    linear_concat(inputs, weight, bias=None, *, activation=None)
    LinearReLUResidual, ConcatLinear          drop-in nn.Modules (nn.Linear's parameters)
    fuse(model, example_inputs=...)           rewrite an existing model to use them
    fusedskip.reference                       the pure-PyTorch ground truth
    set_backend / get_backend / use_backend   which implementation the fused op uses
"""

import torch

from . import _ops, reference
from .functional import linear_concat, linear_relu_residual
from .backends import BACKENDS, cutlass_built, get_backend, set_backend, use_backend
from .fuse import FuseReport, fuse
from .modules import ConcatLinear, LinearReLUResidual

__all__ = ["linear_relu_residual", "linear_concat", "LinearReLUResidual", "ConcatLinear",
           "fuse", "FuseReport", "reference", "cuda_available", "extension_loaded",
           "BACKENDS", "cutlass_built", "get_backend", "set_backend", "use_backend"]
__version__ = "0.1.0"


def extension_loaded() -> bool:
    """True when the compiled ops (fusedskip._C) loaded; False means the reference path runs."""
    return _ops.AVAILABLE


def cuda_available() -> bool:
    """True when the extension was built with CUDA kernels and the current GPU can run them
    (compute capability 8.0 or newer; asking initialises CUDA, as torch's device queries do)."""
    return (_ops.HAS_CUDA_KERNELS and torch.cuda.is_available()
            and _ops.gpu_runs_kernels(torch.cuda.current_device()))
