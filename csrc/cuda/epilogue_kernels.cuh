// CUDA kernels of the element-wise passes: one thread per unit of csrc/epilogue.h, grid-stride.
// Launched through launch_kernel (csrc/cuda/launch.cuh), so each waits for the kernels before it
// first.
#pragma once

#include "cuda/launch.cuh"
#include "epilogue.h"

namespace fusedskip {

// Unit = (row, mask byte): 8 output columns of one row.
// `gemm` is x W^T, (rows, cols) contiguous, in the output dtype. kVec: every unit is 8 whole
// columns on 16-byte boundaries in gemm, out, residual and bias (forward_epilogue_vectorizable),
// so a thread moves each operand's 8 values as whole words and runs the shared per-element code
// (forward_epilogue_cols) on registers: 16-byte accesses instead of 2-byte ones for half types.
template <bool kRelu, Residual kResidual, bool kBias, bool kVec, typename scalar_t>
__global__ void forward_epilogue_kernel(ForwardEpilogueParams<scalar_t> p, const scalar_t* gemm) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t units = p.rows * bytes_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    const int64_t row = unit / bytes_per_row, byte = unit % bytes_per_row;
    const int64_t col = byte * kMaskBitsPerByte;
    if constexpr (kVec) {
      const Pack8<scalar_t> values = load_pack8(gemm + row * p.cols + col);
      Pack8<scalar_t> bias{}, residual{}, out;
      if constexpr (kBias) bias = load_pack8(p.bias + col);
      if constexpr (kResidual != Residual::kNone) {
        residual = load_pack8(p.residual + row * p.residual_stride_row + col);
      }
      ForwardEpilogueParams<scalar_t> unit_params = p;  // the same unit, in registers
      unit_params.out = out.v;
      unit_params.out_stride_row = 0;
      unit_params.bias = bias.v;
      unit_params.residual = residual.v;
      unit_params.residual_stride_row = 0;
      const uint8_t bits = forward_epilogue_cols<kRelu, kResidual, kBias, true>(
          unit_params, values.v, 0, 0, kMaskBitsPerByte);
      store_pack8(p.out + row * p.out_stride_row + col, out);
      if constexpr (kRelu) p.mask[unit] = bits;
    } else {
      forward_epilogue_unit<kRelu, kResidual, kBias>(p, gemm + row * p.cols + col, row, byte);
    }
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
