// CUDA kernels of the element-wise passes: one thread per unit of csrc/epilogue.h, grid-stride.
// Launched through launch_kernel (csrc/cuda/launch.cuh), so each waits for the kernels before it
// first.
#pragma once

#include "cuda/launch.cuh"
#include "epilogue.h"

namespace fusedskip {

// Unit = (row, mask byte): 8 output columns of one row (forward_epilogue_pass_unit).
// `gemm` is x W^T, (rows, cols) contiguous, in the output dtype.
template <bool kRelu, Residual kResidual, bool kBias, bool kVec, typename scalar_t>
__global__ void forward_epilogue_kernel(ForwardEpilogueParams<scalar_t> p, const scalar_t* gemm) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  const int64_t units = p.rows * mask_bytes_per_row(p.cols);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    forward_epilogue_pass_unit<kRelu, kResidual, kBias, kVec>(p, gemm, unit);
  }
}

// Unit = (block of p.rows_per_block rows, mask byte). Neighbouring threads take neighbouring
// bytes of the same rows, so a warp reads contiguous stretches of grad_out.
template <bool kRelu, bool kBias, bool kVec, typename scalar_t>
__global__ void backward_epilogue_kernel(BackwardEpilogueParams<scalar_t> p) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t units = bias_row_blocks(p.rows, p.rows_per_block) * bytes_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    backward_epilogue_unit<kRelu, kBias, kVec>(p, unit / bytes_per_row, unit % bytes_per_row);
  }
}

}  // namespace fusedskip
