"""What was built and how the package behaves without it."""

import os
import subprocess
import sys

import pytest
import torch

import fusedskip

pytestmark = pytest.mark.build


def test_extension_loaded():
    assert fusedskip.extension_loaded(), fusedskip._ops.LOAD_ERROR


# Expected where CI says so, and wherever a GPU is: there a build without them would skip every
# CUDA test, and `pytest -m cuda` would pass having run none. Not where FUSEDSKIP_FORCE_CPU=1
# (a CPU-only build on purpose), or FUSEDSKIP_EXPECT_CUDA_BUILD=0.
CUDA_BUILD_EXPECTED = os.environ.get(
    "FUSEDSKIP_EXPECT_CUDA_BUILD",
    "1" if torch.cuda.is_available() and os.environ.get("FUSEDSKIP_FORCE_CPU") != "1" else "0",
) == "1"


@pytest.mark.cuda  # `pytest -m cuda` runs it too
@pytest.mark.skipif(not CUDA_BUILD_EXPECTED,
                    reason="no GPU here; set FUSEDSKIP_EXPECT_CUDA_BUILD=1 where the CUDA build "
                           "is expected all the same")
def test_cuda_kernels_were_compiled():
    """CI sets FUSEDSKIP_EXPECT_CUDA_BUILD=1: a silent fall-back to a CPU-only build would leave
    the .cu files untested."""
    assert fusedskip._ops.HAS_CUDA_KERNELS, (
        "this build has no CUDA kernels, so every CUDA test skipped: rebuild where nvcc and "
        "CUDA_HOME are found (pip install --no-build-isolation -e .), or set "
        "FUSEDSKIP_EXPECT_CUDA_BUILD=0 for a CPU-only build "
        f"(load error: {fusedskip._ops.LOAD_ERROR})")


@pytest.mark.skipif(os.environ.get("FUSEDSKIP_EXPECT_CUTLASS") != "1",
                    reason="set FUSEDSKIP_EXPECT_CUTLASS=1 where CUTLASS's headers are installed")
def test_cutlass_gemm_was_compiled():
    """CI installs nvidia-cutlass (make setup): the sm_90a GEMM must then be in the build."""
    assert fusedskip.cutlass_built()


@pytest.mark.skipif(not fusedskip.cutlass_built(), reason="the CUTLASS GEMM is not in this build")
def test_cutlass_mask_store_matches_the_register_layout():
    """The CUTLASS GEMM's mask store builds each 32-bit mask word from a warp's ballots, assuming
    where each register value of the epilogue sits (csrc/cuda/fused_gemm_sm90.cu). The check runs
    on the host, over the partition the kernel makes, for every instantiated kernel: no GPU
    needed."""
    assert fusedskip._ops._C._fused_gemm_mask_layout_error() == ""


def test_cutlass_configs_mask_layout():
    """The same check for every configuration benchmarks/cutlass_configs.py times, where the
    build has them (FUSEDSKIP_CUTLASS_CONFIGS=1)."""
    configs = pytest.importorskip("fusedskip._cutlass_configs",
                                  reason="built only with FUSEDSKIP_CUTLASS_CONFIGS=1")
    names = configs.names()
    assert len(names) == 9
    assert names[0] == "Cooperative 128x256 cluster 2x1"  # the library's (its NOTES say why)
    for name in names:
        assert configs.mask_layout_error(name) == "", name


def test_cutlass_configs_refuse_unknown_tile_orders():
    configs = pytest.importorskip("fusedskip._cutlass_configs",
                                  reason="built only with FUSEDSKIP_CUTLASS_CONFIGS=1")
    name, t = configs.names()[0], torch.empty(0)
    with pytest.raises(ValueError, match="swizzle must be 1, 2, 4 or 8, got 3"):
        configs.gemm(name, t, t, t, swizzle=3)
    with pytest.raises(ValueError, match="raster must be .* got 'diagonal'"):
        configs.gemm(name, t, t, t, raster="diagonal")
    with pytest.raises(ValueError, match="no configuration named 'Cooperative 1x1'"):
        configs.gemm("Cooperative 1x1", t, t, t)


def test_cuda_available_needs_a_gpu():
    assert fusedskip.cuda_available() == (fusedskip._ops.HAS_CUDA_KERNELS
                                          and torch.cuda.is_available())


def test_import_without_extension_falls_back_with_one_warning():
    script = """
import sys, warnings
sys.modules["fusedskip._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fusedskip, torch
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    y = fusedskip.linear_relu_residual(x, w, None, torch.ones(3, 5))
    z = fusedskip.linear_concat([x[:, :1], x[:, 1:]], w, activation="relu")
    m = fusedskip.ConcatLinear([1, 3], 5)(x[:, :1], x[:, 1:])
assert not fusedskip.extension_loaded() and not fusedskip.cuda_available()
assert torch.equal(y, torch.relu(x @ w.T) + 1)
assert torch.equal(z, torch.relu(x @ w.T))
ours = [w for w in caught if "fusedskip" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("could not be loaded (it was not built" in str(ours[0].message))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"

