// Element-wise maths of the fused linear layer, written once as __host__ __device__ code.
//
// The CUDA kernels call the per-unit bodies below. On a CPU the element-wise passes run row-wise
// loops of their own around the same per-element maths (epilogue_value, relu_active), adding in
// the same order; the per-unit bodies themselves run there under the cuda_emulation backend
// (forward_epilogue_pass_unit, backward_epilogue_unit; the native kernel's epilogue,
// tile_epilogue in csrc/tile_gemm.h, under its emulation). So CPU tests exercise the exact
// arithmetic (order of adds, NaN handling, mask packing) the GPU runs.
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS_HOST_DEVICE inline
#endif
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler does not know the pragma
#define FS_UNROLL _Pragma("unroll")
#define FS_NO_UNROLL _Pragma("unroll 1")
#else
#define FS_UNROLL
#define FS_NO_UNROLL
#endif

namespace fusedskip {

// Where the residual joins the layer.
enum class Residual : int {
  kNone = 0,
  kAfterRelu = 1,   // order="relu_add": relu(x W^T + b) + r     (ResNet-style)
  kBeforeRelu = 2,  // order="add_relu": relu(x W^T + b + r)
};

// The ReLU mask packs 8 output columns per byte, row-major, each row padded to whole bytes:
// one bit per output instead of a saved pre-activation (1/16 of a bf16 activation's memory).
constexpr int kMaskBitsPerByte = 8;
FS_HOST_DEVICE int64_t mask_bytes_per_row(int64_t cols) {
  return (cols + kMaskBitsPerByte - 1) / kMaskBitsPerByte;
}

// The 8 columns of one mask byte as whole 16-byte words: the element-wise passes load and store
// a unit this way when every unit is 8 whole columns on 16-byte boundaries (checked by the
// caller), one wide access instead of 8 narrow ones.
template <typename T>
struct alignas(16) Pack8 {
  T v[kMaskBitsPerByte];
};
template <typename T>
FS_HOST_DEVICE Pack8<T> load_pack8(const T* from) {
  return *reinterpret_cast<const Pack8<T>*>(from);
}
template <typename T>
FS_HOST_DEVICE void store_pack8(T* to, const Pack8<T>& pack) {
  *reinterpret_cast<Pack8<T>*>(to) = pack;
}
FS_HOST_DEVICE bool aligned_for_pack8(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % alignof(Pack8<uint8_t>) == 0;
}

// Bit `col` of mask row `row`: whether the ReLU let the output through.
FS_HOST_DEVICE bool mask_bit(const uint8_t* mask, int64_t row_bytes, int64_t row, int64_t col) {
  return (mask[row * row_bytes + col / kMaskBitsPerByte] >> (col % kMaskBitsPerByte)) & 1;
}

// torch.relu's semantics: NaN stays NaN. (`v > 0 ? v : 0` would turn NaN into 0, as cuBLASLt's
// ReLU epilogue does.)
template <typename T>
FS_HOST_DEVICE T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// The bit torch.relu's backward tests (threshold_backward: result <= 0 ? 0 : grad). It is set
// for NaN (the gradient flows through a NaN, as in torch) and clear for both zeros.
template <typename T>
FS_HOST_DEVICE bool relu_active(T preact) {
  return !(preact <= T(0));
}

// ---------------------------------------------------------------------------------------------
// Forward: out = epilogue(x W^T), plus the mask.

template <typename scalar_t>
struct ForwardEpilogueParams {
  scalar_t* out;  // (rows, cols), row stride out_stride_row, unit column stride
  int64_t out_stride_row;
  const scalar_t* bias;      // (cols) contiguous, or nullptr
  const scalar_t* residual;  // (rows, cols), row stride residual_stride_row, or nullptr
  int64_t residual_stride_row;
  uint8_t* mask;  // (rows, mask_bytes_per_row(cols)), contiguous; nullptr without ReLU
  int64_t rows;
  int64_t cols;
};

// One output element, in opmath: x W^T, + bias, + residual (before the ReLU), ReLU (setting
// `active`, the mask bit), + residual (after it). Every epilogue of every device computes its
// elements through this function, so the order of the adds and the NaN handling are one.
template <bool kRelu, Residual kResidual, bool kBias, typename acc_t>
FS_HOST_DEVICE acc_t epilogue_value(acc_t value, acc_t bias, acc_t residual, bool& active) {
  if constexpr (kBias) value += bias;
  if constexpr (kResidual == Residual::kBeforeRelu) value += residual;
  if constexpr (kRelu) {
    active = relu_active(value);
    value = relu(value);
  }
  if constexpr (kResidual == Residual::kAfterRelu) value += residual;
  return value;
}

// One unit: columns [first_col, first_col + count) of one row, count <= 8; returns its mask byte
// (0 without ReLU). `gemm` points at x W^T's element (row, first_col), wherever it lives (global
// memory, registers). With kFull the count is 8 and the loops have no bounds test: straight-line
// code the compiler vectorises. Every operand is read before any output is written: the
// compiler cannot tell `out` from `residual` or `gemm` apart, so a read after a write would wait
// for it, one memory round trip per column where there is no 16-byte form.
template <bool kRelu, Residual kResidual, bool kBias, bool kFull, typename scalar_t,
          typename gemm_t>
FS_HOST_DEVICE uint8_t forward_epilogue_cols(const ForwardEpilogueParams<scalar_t>& p,
                                             const gemm_t* gemm, int64_t row, int64_t first_col,
                                             int count) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* bias = p.bias + first_col;
  const scalar_t* residual = p.residual + row * p.residual_stride_row + first_col;
  acc_t gemm_v[kMaskBitsPerByte] = {}, bias_v[kMaskBitsPerByte] = {},
        residual_v[kMaskBitsPerByte] = {};
FS_UNROLL
  for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
    if (kFull || bit < count) {
      gemm_v[bit] = static_cast<acc_t>(gemm[bit]);
      if constexpr (kBias) bias_v[bit] = static_cast<acc_t>(bias[bit]);
      if constexpr (kResidual != Residual::kNone) {
        residual_v[bit] = static_cast<acc_t>(residual[bit]);
      }
    }
  }
  scalar_t* out = p.out + row * p.out_stride_row + first_col;
  uint8_t bits = 0;
FS_UNROLL
  for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
    if (kFull || bit < count) {
      bool active = false;
      const acc_t value = epilogue_value<kRelu, kResidual, kBias>(gemm_v[bit], bias_v[bit],
                                                                  residual_v[bit], active);
      if constexpr (kRelu) bits |= static_cast<uint8_t>(active) << bit;
      out[bit] = static_cast<scalar_t>(value);
    }
  }
  return bits;
}

// One row, the 8 columns of one mask byte: the unit of work of a CUDA thread in the element-wise
// pass (the native kernel's epilogue, tile_epilogue in csrc/tile_gemm.h, walks a tile's columns
// instead, through the same epilogue_value). Everything is computed in opmath (float for half
// types), rounded once at the end. `gemm` points at x W^T's element (row, 8 * byte).
template <bool kRelu, Residual kResidual, bool kBias, typename scalar_t, typename gemm_t>
FS_HOST_DEVICE void forward_epilogue_unit(const ForwardEpilogueParams<scalar_t>& p,
                                          const gemm_t* gemm, int64_t row, int64_t byte) {
  const int64_t first_col = byte * kMaskBitsPerByte;
  const int64_t left = p.cols - first_col;
  const uint8_t bits =
      left >= kMaskBitsPerByte
          ? forward_epilogue_cols<kRelu, kResidual, kBias, true>(p, gemm, row, first_col, 8)
          : forward_epilogue_cols<kRelu, kResidual, kBias, false>(p, gemm, row, first_col,
                                                                  static_cast<int>(left));
  if constexpr (kRelu) p.mask[row * mask_bytes_per_row(p.cols) + byte] = bits;
}

// Whether a pass over these tensors may move each unit as whole 16-byte words (Pack8): every
// unit is 8 whole columns, and every row of x W^T (`gemm`, contiguous), out and the residual,
// and the bias, starts on a 16-byte boundary.
template <typename scalar_t>
FS_HOST_DEVICE bool forward_epilogue_vectorizable(const ForwardEpilogueParams<scalar_t>& p,
                                                  const scalar_t* gemm) {
  return p.cols % kMaskBitsPerByte == 0 && aligned_for_pack8(gemm) && aligned_for_pack8(p.out) &&
         p.out_stride_row % kMaskBitsPerByte == 0 &&
         (p.bias == nullptr || aligned_for_pack8(p.bias)) &&
         (p.residual == nullptr ||
          (aligned_for_pack8(p.residual) && p.residual_stride_row % kMaskBitsPerByte == 0));
}

// Unit `unit` of the element-wise forward pass: row unit / bytes, mask byte unit % bytes (bytes =
// mask_bytes_per_row(cols)); `gemm` is x W^T, (rows, cols) contiguous. What one CUDA thread does
// per unit (csrc/cuda/epilogue_kernels.cuh), and a CPU under cuda_emulation, so that CPU tests run
// it. kVec: every unit is 8 whole columns on 16-byte boundaries in gemm, out, residual and bias
// (forward_epilogue_vectorizable), so each operand's 8 values move as whole words and the shared
// per-element code (forward_epilogue_cols) runs on registers: 16-byte accesses instead of 2-byte
// ones for half types.
template <bool kRelu, Residual kResidual, bool kBias, bool kVec, typename scalar_t,
          typename gemm_t>
FS_HOST_DEVICE void forward_epilogue_pass_unit(const ForwardEpilogueParams<scalar_t>& p,
                                               const gemm_t* gemm, int64_t unit) {
  const int64_t bytes_per_row = mask_bytes_per_row(p.cols);
  const int64_t row = unit / bytes_per_row, byte = unit % bytes_per_row;
  const int64_t col = byte * kMaskBitsPerByte;
  if constexpr (kVec) {
    static_assert(std::is_same_v<gemm_t, scalar_t>, "whole words of x W^T in the output dtype");
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

// ---------------------------------------------------------------------------------------------
// Backward: grad_preact = grad_out masked by the ReLU, and the bias gradient's partial sums.

// The bias gradient is summed over fixed blocks of rows, then over the blocks in a fixed order:
// the same bits on every run and for every thread count (no atomics, no thread-dependent split).
// The block height is the device's: a CPU thread takes many rows; the GPU needs many units to
// keep its memory busy (4096 x 1024 in blocks of 128 rows would be only 4096 threads).
constexpr int64_t kCpuRowsPerBlock = 128;
constexpr int64_t kCudaRowsPerBlock = 16;
FS_HOST_DEVICE int64_t bias_row_blocks(int64_t rows, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block;
}

template <typename scalar_t>
struct BackwardEpilogueParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;  // (rows, cols) with the two strides
  int64_t grad_out_stride_row;
  int64_t grad_out_stride_col;
  const uint8_t* mask;   // as in the forward; nullptr without ReLU
  scalar_t* grad_preact;  // (rows, cols) contiguous; written only with ReLU
  acc_t* bias_partials;   // (bias_row_blocks(rows, rows_per_block), cols) contiguous, or nullptr
  int64_t rows;
  int64_t cols;
  int64_t rows_per_block;
};

// One block of rows_per_block rows, the 8 columns of one mask byte. kVec: grad_out has unit
// column stride, every unit is 8 whole columns and every row of grad_out and grad_preact starts
// on a 16-byte boundary (the caller checks), so each row's 8 gradients move as whole words.
template <bool kRelu, bool kBias, bool kVec, typename scalar_t>
FS_HOST_DEVICE void backward_epilogue_unit(const BackwardEpilogueParams<scalar_t>& p,
                                           int64_t row_block, int64_t byte) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t first_col = byte * kMaskBitsPerByte;
  const int64_t first_row = row_block * p.rows_per_block;
  const int64_t end_row =
      first_row + p.rows_per_block < p.rows ? first_row + p.rows_per_block : p.rows;
  const int64_t mask_row_bytes = mask_bytes_per_row(p.cols);
  acc_t sums[kMaskBitsPerByte] = {};
  for (int64_t row = first_row; row < end_row; ++row) {
    uint8_t bits = 0xff;
    if constexpr (kRelu) bits = p.mask[row * mask_row_bytes + byte];
    const scalar_t* grad_row = p.grad_out + row * p.grad_out_stride_row;
    Pack8<scalar_t> grads;
    if constexpr (kVec) grads = load_pack8(grad_row + first_col);
FS_UNROLL
    for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
      const int64_t col = first_col + bit;
      if (kVec || col < p.cols) {
        scalar_t grad = kVec ? grads.v[bit] : grad_row[col * p.grad_out_stride_col];
        if constexpr (kRelu) {
          // A select, not a multiply: a NaN or Inf gradient where the ReLU was off gives 0.
          grad = ((bits >> bit) & 1) ? grad : scalar_t(0);
          if constexpr (kVec) {
            grads.v[bit] = grad;
          } else {
            p.grad_preact[row * p.cols + col] = grad;
          }
        }
        if constexpr (kBias) sums[bit] += static_cast<acc_t>(grad);
      }
    }
    if constexpr (kRelu && kVec) store_pack8(p.grad_preact + row * p.cols + first_col, grads);
  }
  if constexpr (kBias) {
FS_UNROLL
    for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
      const int64_t col = first_col + bit;
      if (col < p.cols) p.bias_partials[row_block * p.cols + col] = sums[bit];
    }
  }
}

// Whether backward_epilogue_unit may take its kVec form for these tensors.
template <typename scalar_t>
FS_HOST_DEVICE bool backward_epilogue_vectorizable(const BackwardEpilogueParams<scalar_t>& p) {
  return p.cols % kMaskBitsPerByte == 0 && p.grad_out_stride_col == 1 &&
         p.grad_out_stride_row % kMaskBitsPerByte == 0 && aligned_for_pack8(p.grad_out) &&
         (p.grad_preact == nullptr || aligned_for_pack8(p.grad_preact));
}

// Second stage of the bias gradient on the CPU: one column, blocks summed in order. (The GPU
// adds the same partials with ATen's column sum instead: backward_epilogue_cuda.)
template <typename scalar_t>
FS_HOST_DEVICE void bias_grad_unit(const at::opmath_type<scalar_t>* bias_partials,
                                   int64_t row_blocks, int64_t cols, int64_t col,
                                   scalar_t* grad_bias) {
  at::opmath_type<scalar_t> sum = 0;
  for (int64_t block = 0; block < row_blocks; ++block) sum += bias_partials[block * cols + col];
  grad_bias[col] = static_cast<scalar_t>(sum);
}

}  // namespace fusedskip
