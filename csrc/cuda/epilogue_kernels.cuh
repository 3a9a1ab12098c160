// CUDA kernels of the element-wise passes: one thread per unit of csrc/epilogue.h, grid-stride.
#pragma once

#include "epilogue.h"

namespace fusedskip {

// Unit = (row, mask byte): 8 output columns of one row.
// `gemm` is x W^T, (rows, cols) contiguous.
template <bool kRelu, Residual kResidual, bool kBias, typename scalar_t, typename gemm_t>
__global__ void forward_epilogue_kernel(ForwardEpilogueParams<scalar_t> p, const gemm_t* gemm) {
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t units = p.rows * bytes_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    const int64_t row = unit / bytes_per_row, byte = unit % bytes_per_row;
    forward_epilogue_unit<kRelu, kResidual, kBias>(
        p, gemm + row * p.cols + byte * kMaskBitsPerByte, row, byte);
  }
}

// Unit = (block of kBiasRowsPerBlock rows, mask byte). Neighbouring threads take neighbouring
// bytes of the same rows, so a warp reads contiguous stretches of grad_out.
template <bool kRelu, bool kBias, typename scalar_t>
__global__ void backward_epilogue_kernel(BackwardEpilogueParams<scalar_t> p) {
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t units = bias_row_blocks(p.rows) * bytes_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    backward_epilogue_unit<kRelu, kBias>(p, unit / bytes_per_row, unit % bytes_per_row);
  }
}

// One thread per column: the fixed-order sum over row blocks (deterministic).
template <typename scalar_t>
__global__ void bias_grad_kernel(const at::opmath_type<scalar_t>* bias_partials,
                                 int64_t row_blocks, int64_t cols, scalar_t* grad_bias) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < cols;
       col += stride) {
    bias_grad_unit<scalar_t>(bias_partials, row_blocks, cols, col, grad_bias);
  }
}

}  // namespace fusedskip
