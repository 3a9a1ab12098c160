"""Which implementation the fused op uses (see csrc/backend.h for the full story).

    fusedskip.get_backend() -> str
    fusedskip.set_backend(name)           process-wide; FUSEDSKIP_BACKEND sets it at import
    with fusedskip.use_backend(name): ... one thread's block at a time

Backends: ``auto`` (the default: per shape, the faster path measured: on CUDA ``native`` for
small layers, ``cutlass`` for the largest where it applies, else ``gemm_epilogue``),
``native`` (CUDA: the one-launch fused kernel; CPU: the direct loops), ``gemm_epilogue`` (the
library GEMM, cuBLAS or CPU BLAS, then one fused element-wise pass), ``cuda_emulation`` (CPU
tensors: the native CUDA kernel's own code run on the host, thread by thread; slow, it checks
the GPU kernel without a GPU),
``cutlass`` (CUDA, on an sm_90 GPU where the build has it (``cutlass_built()``) and the shapes
allow: the forward with ReLU as one CUTLASS kernel (GEMM, bias, ReLU mask and residual); for
concat layers the forward as one CUTLASS GEMM whose K loop runs over the inputs (no cat) and the
backward's GEMMs as two grouped CUTLASS GEMMs; ``gemm_epilogue`` everywhere else).
The choice is read at each call, so it also applies inside compiled graphs.
"""

from __future__ import annotations

import contextlib
import threading

from . import _ops

BACKENDS = ("auto", "native", "gemm_epilogue", "cuda_emulation", "cutlass")

if _ops.AVAILABLE:
    _ops._C._get_backend()  # reads FUSEDSKIP_BACKEND now, at import, and warns of a bad value

# use_backend's blocks, one thread at a time (see there).
_switching = threading.RLock()


def _require_extension():
    if not _ops.AVAILABLE:
        raise RuntimeError("fusedskip: the compiled extension is not loaded, so there are no "
                           f"backends to choose from (load error: {_ops.LOAD_ERROR})")


def get_backend() -> str:
    """The backend the fused op uses now."""
    _require_extension()
    return _ops._C._get_backend()


def set_backend(name: str) -> None:
    """Choose the fused op's backend for the whole process (one of ``BACKENDS``)."""
    _require_extension()
    _ops._C._set_backend(name)


def cutlass_built() -> bool:
    """True when the ``cutlass`` backend's sm_90a GEMM was compiled into the extension (the
    build found CUTLASS headers: ``pip install --no-deps nvidia-cutlass``)."""
    return _ops.AVAILABLE and _ops._C._fused_gemm_built()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("native"): ...`` -- the backend inside the block, restored after.

    The backend is process-wide, not per thread: autograd runs a CUDA backward on threads of its
    own, which must see it too. So a block holds a lock, and another thread's ``use_backend``
    waits until it ends (otherwise each would see the other's backend, and the one restored last
    would stay); ops called meanwhile from other threads run on the block's backend."""
    with _switching:
        previous = get_backend()
        set_backend(name)
        try:
            yield
        finally:
            set_backend(previous)
