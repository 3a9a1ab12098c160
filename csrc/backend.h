// How the op computes x W^T and its epilogue: the one place that chooses, per call.
//
//   FUSEDSKIP_BACKEND (read at import) / fusedskip.set_backend(name) (at run time):
//     auto            per shape, below (the default): on CUDA the native kernel for small
//                     layers; above, cutlass where it applies, else gemm_epilogue
//     native          CUDA: the native fused kernel (csrc/cuda/tile_kernels.cu);
//                     CPU: the direct loops (csrc/cpu/fused_linear_cpu.cpp)
//     gemm_epilogue   the library GEMM (cuBLAS / CPU BLAS through ATen) + one element-wise pass
//     cuda_emulation  CPU tensors: the native CUDA kernel's own code run on the host, thread by
//                     thread, and the backward pass in the CUDA pass's units (slow: a test of
//                     the GPU's code without a GPU); CUDA tensors: native
//     cutlass         CUDA: the forward's GEMM, bias, ReLU + mask and residual in one CUTLASS
//                     GEMM on sm_90 (csrc/cuda/fused_gemm_sm90.cu); for a concat layer the
//                     forward's K loop over the inputs, never building the cat
//                     (csrc/cuda/concat_gemm_sm90.cu), and the backward's GEMMs as two grouped
//                     GEMMs (csrc/cuda/grouped_gemm_sm90.cu); where they apply, else
//                     gemm_epilogue
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

#include "fused_linear.h"

namespace fusedskip {

enum class Backend : int { kAuto = 0, kNative, kGemmEpilogue, kCudaEmulation, kCutlass };

Backend current_backend();
// Raises ValueError naming the choices for an unknown name.
void set_backend(const std::string& name);
const char* backend_name(Backend backend);
// The names set_backend takes, quoted, for messages: "'auto', 'native', ...".
std::string backend_choices();

enum class GemmPath {
  kLibrary,   // ATen GEMM(s) + the element-wise pass
  kCpuLoops,  // CPU direct loops + the element-wise pass
  kTiles,     // the native kernel (on CUDA) or its host emulation (on CPU)
  kFusedGemm, // CUDA: the CUTLASS GEMM with the epilogue inside, else as kLibrary
};

GemmPath choose_gemm_path(const at::Tensor& weight, const Geometry& g);

// Whether the library path's concat backward runs one GEMM per block, each weight-gradient
// column block (and, when only some inputs want one, each wanted input's gradient) written in
// place, rather than one GEMM over the whole width (over a cat of the inputs for the weight's).
bool library_gemm_per_block(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight);
// Whether a concat layer on the library path tries the CUTLASS kernels that take its inputs
// one by one (forward: csrc/cuda/concat_gemm_sm90.cu, its K loop over the inputs; backward:
// csrc/cuda/grouped_gemm_sm90.cu) before the cat / one cuBLAS GEMM per block.
bool cutlass_concat_wanted(const at::Tensor& weight, const Geometry& g);

// The CUTLASS GEMM's output tile, which its LibraryConfig (csrc/cuda/fused_gemm_sm90.cuh) is
// built from and choose_gemm_path counts tiles by.
constexpr int kFusedGemmTileRows = 128;
constexpr int kFusedGemmTileCols = 256;

// Whether the CUTLASS GEMMs were compiled in (CUTLASS headers found, sm_90a among the archs), and
// how many times each has run in this process (tests check that it did): the forward's fused
// GEMM, the concat forward's, and the grouped GEMMs of the concat backward (one count per
// launch).
bool fused_gemm_built();
int64_t fused_gemm_launches();
void count_fused_gemm_launch();
int64_t concat_gemm_launches();
void count_concat_gemm_launch();
int64_t grouped_gemm_launches();
void count_grouped_gemm_launch();
// How many times the backward's element-wise pass (mask and bias gradient) has run, any device:
// where the native kernel reads the mask itself, tests check that the pass did not run.
int64_t backward_pass_runs();
void count_backward_pass_run();

// Empty where the CUTLASS GEMM's mask store meets the register layout it assumes, checked on the
// host for every instantiated kernel (csrc/cuda/fused_gemm_sm90.cu); else what is wrong. Only in
// CUDA builds.
std::string fused_gemm_mask_layout_error();

// Test hooks of csrc/cuda/launch_probe.cu, only in CUDA builds: whether the library's kernels
// launched now on the current device use programmatic dependent launch (csrc/cuda/launch.cuh),
// and a copy of src into dst (contiguous, one size in bytes) by a kernel that lets the next one
// launch at once and writes only delay_ns later.
bool programmatic_launch_active();
void late_copy_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t delay_ns);

}  // namespace fusedskip
