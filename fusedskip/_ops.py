"""Loads the compiled ops (``fusedskip._C``) and registers their fake kernels.

The fake kernels give torch.compile / torch.export the output shapes without running anything;
they validate with the same rules as the C++ kernels, so a bad call fails at trace time with the
same message as in eager mode.
"""

from __future__ import annotations

import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.fusedskip.*)

    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR = error

AVAILABLE = LOAD_ERROR is None
HAS_CUDA_KERNELS = False

# The CUDA kernels are built for compute capability 8.0 and newer (setup.py: bfloat16 and TF32
# tensor cores): an older GPU (a V100, a T4) has no kernel image for them.
MIN_CAPABILITY = (8, 0)
gpu_runs_kernels_known = {}  # device index -> bool, asked once per device


def gpu_runs_kernels(index: int) -> bool:
    """Whether the GPU of this index can run the extension's CUDA kernels (initialises CUDA)."""
    runs = gpu_runs_kernels_known.get(index)
    if runs is None:
        runs = gpu_runs_kernels_known[index] = \
            tuple(torch.cuda.get_device_capability(index)) >= MIN_CAPABILITY
    return runs

if not AVAILABLE:
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        # Python's message would be of a circular import: there is simply no library.
        LOAD_ERROR = ImportError("it was not built: there is no fusedskip/_C*.so")
    warnings.warn(
        f"fusedskip: the compiled extension could not be loaded ({LOAD_ERROR}); the functional "
        "API and the modules compute through the reference PyTorch path. Build it with "
        "`pip install --no-build-isolation -e .` (or `make build`).",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    fused_linear = torch.ops.fusedskip.fused_linear.default
    # Same op, entered without the torch.ops argument boxing (csrc/python_bindings.cpp);
    # returns the output only. Eager only: torch.compile traces `fused_linear`.
    fused_linear_eager = _C.fused_linear
    fused_linear_backward = torch.ops.fusedskip.fused_linear_backward.default
    HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fusedskip::fused_linear", "CUDA")

    def _mask_shape(rows, out_features, relu):
        return (rows, (out_features + 7) // 8) if relu else (0,)

    def _rows(shape):
        """The rows of a (..., features) shape: the product of its leading dims."""
        rows = 1
        for size in shape[:-1]:
            rows *= size
        return rows

    @torch.library.register_fake("fusedskip::fused_linear")
    def _fused_linear_fake(inputs, weight, bias, residual, relu, residual_before_relu):
        out_shape = reference.check_args(inputs, weight, bias, residual)
        output = weight.new_empty(out_shape)
        mask = weight.new_empty(_mask_shape(_rows(out_shape), weight.shape[0], relu),
                                dtype=torch.uint8)
        return output, mask

    # torch.utils.flop_counter (FlopCounterMode, and what is built on it) counts the GEMMs, as it
    # does for aten.addmm / aten.mm; the element-wise work is not counted there either.
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.fusedskip.fused_linear)
    def _fused_linear_flops(inputs_shape, weight_shape, *args, out_shape=None, **kwargs):
        out_features, in_total = weight_shape
        return 2 * _rows(inputs_shape[0]) * in_total * out_features

    @register_flop_formula(torch.ops.fusedskip.fused_linear_backward)
    def _fused_linear_backward_flops(grad_output_shape, inputs_shape, weight_shape, relu_mask_shape,
                                     relu, output_mask, out_shape=None, **kwargs):
        out_features, in_total = weight_shape
        per_column = 2 * _rows(grad_output_shape) * out_features
        flops = sum(per_column * shape[-1] for shape, wanted in zip(inputs_shape, output_mask)
                    if wanted)  # each input's gradient
        if output_mask[len(inputs_shape)]:  # the weight's
            flops += per_column * in_total
        return flops

    @torch.library.register_fake("fusedskip::fused_linear_backward")
    def _fused_linear_backward_fake(grad_output, inputs, weight, relu_mask, relu, output_mask):
        # The checks of fused_linear_backward in csrc/fused_linear.cpp, in its order. This kernel
        # also serves meta tensors, where a call mixing them with others lands whatever the
        # others' device: unchecked, it would hand back gradients never computed.
        out_shape = reference.check_args(inputs, weight)
        count = len(inputs)
        if len(output_mask) != count + 3:
            raise ValueError(f"fusedskip: output_mask must have {count + 3} entries (one per "
                             f"input, then weight, bias, pre-activation), got {len(output_mask)}")
        reference.check_tensor("grad_output", grad_output, weight)
        if list(grad_output.shape) != out_shape:
            raise ValueError(f"fusedskip: grad_output must have the output's shape {out_shape}, "
                             f"got {list(grad_output.shape)}")
        if relu and relu_mask is None:
            raise ValueError("fusedskip: relu_mask is None but relu is True; pass the mask "
                             "fused_linear returned with the output")
        if relu_mask is not None:
            if relu_mask.layout != torch.strided:
                raise TypeError("fusedskip: relu_mask must be a dense (strided) tensor, got "
                                f"layout {relu_mask.layout}")
            if relu_mask.dtype != torch.uint8:
                raise TypeError(f"fusedskip: relu_mask must be torch.uint8, got {relu_mask.dtype}")
            if relu_mask.device != weight.device:
                raise RuntimeError(f"fusedskip: relu_mask is on device {relu_mask.device} but "
                                   f"weight is on {weight.device}")
        if relu:
            mask_shape = list(_mask_shape(_rows(out_shape), weight.shape[0], relu))
            if list(relu_mask.shape) != mask_shape:
                raise ValueError(f"fusedskip: relu_mask must have shape {mask_shape}, got "
                                 f"{list(relu_mask.shape)}")

        def wanted(flag, shape):
            return weight.new_empty(shape if flag else (0,))

        # The gradient of cat(inputs, -1): every input's is a column block of it.
        grad_input = wanted(any(output_mask[:count]), out_shape[:-1] + [weight.shape[1]])
        return (grad_input, wanted(output_mask[count], weight.shape),
                wanted(output_mask[count + 1], weight.shape[:1]),
                wanted(relu and output_mask[count + 2], grad_output.shape))
