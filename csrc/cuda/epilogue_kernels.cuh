// CUDA kernels of the element-wise passes: one thread per unit of csrc/epilogue.h, grid-stride.
#pragma once

#include "epilogue.h"

namespace fusedskip {

// Unit = (row, mask byte): 8 output columns of one row.
// `gemm` is x W^T, (rows, cols) contiguous, in the output dtype. kVec: every unit is 8 whole
// columns on 16-byte boundaries in gemm, out, residual and bias (forward_epilogue_vectorizable),
// so a thread moves each operand's 8 values as whole words and runs the shared per-element code
// (forward_epilogue_cols) on registers: 16-byte accesses instead of 2-byte ones for half types.
template <bool kRelu, Residual kResidual, bool kBias, bool kVec, typename scalar_t>
__global__ void forward_epilogue_kernel(ForwardEpilogueParams<scalar_t> p, const scalar_t* gemm) {
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
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t units = bias_row_blocks(p.rows, p.rows_per_block) * bytes_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < units;
       unit += stride) {
    backward_epilogue_unit<kRelu, kBias, kVec>(p, unit / bytes_per_row, unit % bytes_per_row);
  }
}

// Second stage of the bias gradient: one thread block per column. Each thread sums a fixed,
// strided subset of the row blocks in order, then a fixed-shape tree in shared memory adds the
// threads' sums: the same bits on every run (no atomics), and no single thread walking all of
// a tall, narrow layer's row blocks (65536 rows are 4096 of them).
constexpr int kBiasGradThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kBiasGradThreads)
    bias_grad_kernel(const at::opmath_type<scalar_t>* bias_partials, int64_t row_blocks,
                     int64_t cols, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kBiasGradThreads];
  for (int64_t col = blockIdx.x; col < cols; col += gridDim.x) {
    acc_t sum = 0;
    for (int64_t block = threadIdx.x; block < row_blocks; block += kBiasGradThreads) {
      sum += bias_partials[block * cols + col];
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kBiasGradThreads / 2; width > 0; width /= 2) {
      if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_bias[col] = static_cast<scalar_t>(sums[0]);
    __syncthreads();  // sums is refilled for the next column
  }
}

}  // namespace fusedskip
