// CPU kernels: the element-wise passes, with csrc/epilogue.h's per-element maths, in one parallel
// sweep each; the direct loops (GEMM and epilogue in one pass, for layers too small for BLAS);
// and the op's CPU registration. The BLAS GEMMs are ATen's, called from csrc/fused_linear.cpp.
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif
// The mask's bytes are read and written as 64-bit words of eight 0/1 bytes (the packing below,
// kSpreadBits), byte i holding bit i: little-endian order.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fusedskip's CPU passes assume a little-endian CPU"
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "backend.h"
#include "dispatch.h"
#include "fused_linear.h"

namespace fusedskip {
namespace {

// Enough elements per task that a tiny layer runs inline on the calling thread.
constexpr int64_t kElementsPerTask = 32768;

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
}

// Elements of the forward epilogue per call of forward_epilogue_rows.
constexpr int64_t kChunk = 4096;

// One row's 0/1 bytes `on` -> its `bytes` mask bytes, bit i of byte j from on[8 j + i]. Reads
// 8 bytes per mask byte, up to 7 past the row's last column: those belong to the next row (or
// the buffer's zero tail), and their bits are cleared.
inline void pack_row_bits(const uint8_t* on, int64_t cols, int64_t bytes, uint8_t* mask) {
  int64_t byte = 0;
#if defined(__SSE2__) || defined(_M_X64)
  // Sixteen bytes -> two mask bytes: each byte's low bit shifted to its top bit, where one
  // movemask gathers them (little-endian: the first eight bytes make the first mask byte).
  for (; byte + 2 <= bytes; byte += 2) {
    const __m128i sixteen =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(on + byte * kMaskBitsPerByte));
    const auto bits = static_cast<uint16_t>(_mm_movemask_epi8(_mm_slli_epi64(sixteen, 7)));
    std::memcpy(mask + byte, &bits, sizeof bits);
  }
#endif
  for (; byte < bytes; ++byte) {
    // One multiply gathers the eight bytes' low bits into the top byte (each lands at a
    // distinct bit; no carries).
    uint64_t eight;
    std::memcpy(&eight, on + byte * kMaskBitsPerByte, sizeof eight);
    mask[byte] = static_cast<uint8_t>((eight * 0x0102040810204080ull) >> 56);
  }
  const int64_t tail = cols % kMaskBitsPerByte;
  if (tail != 0) mask[bytes - 1] &= static_cast<uint8_t>((1u << tail) - 1);
}

// Rows [first, first + count) of the forward epilogue, with count * cols <= kChunk. The element
// loop vectorises (the GPU's per-byte units would not): over the whole chunk at once where the
// rows lie back to back (no bias, out and residual rows contiguous; at the narrow widths of a
// skip-connection MLP a loop per 30-column row costs more in set-up than in work), else row by
// row. `active` receives a byte per element; the mask bytes are packed from it afterwards.
template <bool kRelu, Residual kResidual, bool kBias, typename scalar_t, typename gemm_t>
void forward_epilogue_rows(const ForwardEpilogueParams<scalar_t>& p, const gemm_t* gemm,
                           int64_t first, int64_t count, uint8_t* active) {
  using acc_t = at::opmath_type<scalar_t>;
  // Locals, and restrict: a store through the byte pointer `active` may alias anything, so with
  // p's fields read in the loop the compiler reloads them each iteration and cannot vectorise.
  // Not on `in` and `out`, which are one buffer where the GEMM wrote the output's dtype (the
  // pass then runs in place); without it the pass took as long (x86-64-2026-11-28/).
  const int64_t cols = p.cols;
  const bool flat = !kBias && p.out_stride_row == cols &&
                    (kResidual == Residual::kNone || p.residual_stride_row == cols);
  const int64_t runs = flat ? 1 : count;
  const int64_t run_length = flat ? count * cols : cols;
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t row = first + run;
    const gemm_t* in = gemm + run * cols;
    scalar_t* out = p.out + row * p.out_stride_row;
    const scalar_t* __restrict__ bias = p.bias;
    const scalar_t* __restrict__ residual =
        kResidual != Residual::kNone ? p.residual + row * p.residual_stride_row : nullptr;
    uint8_t* __restrict__ on = kRelu ? active + run * cols : nullptr;
    for (int64_t i = 0; i < run_length; ++i) {
      bool is_on = false;
      const acc_t value = epilogue_value<kRelu, kResidual, kBias>(
          static_cast<acc_t>(in[i]), kBias ? static_cast<acc_t>(bias[i]) : acc_t(0),
          kResidual != Residual::kNone ? static_cast<acc_t>(residual[i]) : acc_t(0), is_on);
      out[i] = static_cast<scalar_t>(value);
      if constexpr (kRelu) on[i] = is_on;
    }
  }
  if constexpr (kRelu) {
    const int64_t bytes = mask_bytes_per_row(cols);
    for (int64_t r = 0; r < count; ++r) {
      pack_row_bits(active + r * cols, cols, bytes, p.mask + (first + r) * bytes);
    }
  }
}

// Mask byte -> eight 0/1 bytes, byte i from bit i: the inverse of the packing above.
constexpr std::array<uint64_t, 256> spread_bits_table() {
  std::array<uint64_t, 256> table{};
  for (int bits = 0; bits < 256; ++bits) {
    for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
      table[bits] |= static_cast<uint64_t>((bits >> bit) & 1) << (8 * bit);
    }
  }
  return table;
}
constexpr std::array<uint64_t, 256> kSpreadBits = spread_bits_table();

// One block of p.rows_per_block rows of the backward pass: the output gradient through the mask
// into grad_preact, and the block's column sums into its row of bias_partials. The GPU's units
// (backward_epilogue_unit) walk 8 columns down the block, a strided walk that is slow here
// (benchmarks/NOTES.md, "CPU element-wise pass"). Here the block goes in chunks of rows of up to
// kChunk elements, which stay in cache between two loops: the masked copy, over the whole chunk
// at once where its rows lie back to back (at 30 columns a loop per row costs more in set-up than
// in work), else row by row; then the sums, eight columns at a time down the chunk's rows in
// registers, reading back what the copy wrote. Both add each column's rows in the same order:
// the same bits.
// `active`: room for a chunk's mask as bytes, max(kChunk, cols) + 8.
template <bool kRelu, bool kBias, bool kUnitStride, typename scalar_t>
void backward_epilogue_block(const BackwardEpilogueParams<scalar_t>& p, int64_t block,
                             uint8_t* active) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cols = p.cols, bytes = mask_bytes_per_row(cols);
  const int64_t stride_col = kUnitStride ? 1 : p.grad_out_stride_col;
  const int64_t block_first = block * p.rows_per_block;
  const int64_t block_end = std::min(block_first + p.rows_per_block, p.rows);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1));
  acc_t* __restrict__ sums = kBias ? p.bias_partials + block * cols : nullptr;
  if constexpr (kBias) std::fill(sums, sums + cols, acc_t(0));
  for (int64_t first = block_first; first < block_end; first += chunk_rows) {
    const int64_t count = std::min(chunk_rows, block_end - first);
    if constexpr (kRelu) {
      // A byte per element, rows back to back: each row's last word spills into the next
      // row's first bytes, which that row's own words then overwrite.
      for (int64_t r = 0; r < count; ++r) {
        const uint8_t* mask = p.mask + (first + r) * bytes;
        for (int64_t byte = 0; byte < bytes; ++byte) {
          std::memcpy(active + r * cols + byte * kMaskBitsPerByte, &kSpreadBits[mask[byte]],
                      sizeof(uint64_t));
        }
      }
      const bool flat = kUnitStride && p.grad_out_stride_row == cols;
      const int64_t runs = flat ? 1 : count, run_length = flat ? count * cols : cols;
      for (int64_t run = 0; run < runs; ++run) {
        // Restricted from here to the run's end, where nothing else writes what they point to.
        const scalar_t* __restrict__ grad = p.grad_out + (first + run) * p.grad_out_stride_row;
        scalar_t* __restrict__ preact = p.grad_preact + (first + run) * cols;
        const uint8_t* __restrict__ on = active + run * cols;
        for (int64_t i = 0; i < run_length; ++i) {
          // Loaded whatever the mask says, then a select (as in the units: NaN where off gives
          // 0): a load under the mask's branch would not vectorise.
          const scalar_t g = grad[i * stride_col];
          preact[i] = on[i] ? g : scalar_t(0);
        }
      }
    }
    if constexpr (kBias) {
      // What the mask let through (unit stride), or the output gradient itself. Eight columns
      // at a time go down the chunk's rows in registers, each column's rows added in order.
      const scalar_t* src = kRelu ? p.grad_preact + first * cols
                                  : p.grad_out + first * p.grad_out_stride_row;
      const int64_t row_step = kRelu ? cols : p.grad_out_stride_row;
      const int64_t col_step = kRelu ? 1 : stride_col;
      int64_t col = 0;
      for (; col + kMaskBitsPerByte <= cols; col += kMaskBitsPerByte) {
        acc_t acc[kMaskBitsPerByte];
        for (int j = 0; j < kMaskBitsPerByte; ++j) acc[j] = sums[col + j];
        for (int64_t r = 0; r < count; ++r) {
          const scalar_t* row = src + r * row_step + col * col_step;
          for (int j = 0; j < kMaskBitsPerByte; ++j) {
            acc[j] += static_cast<acc_t>(row[j * col_step]);
          }
        }
        for (int j = 0; j < kMaskBitsPerByte; ++j) sums[col + j] = acc[j];
      }
      for (; col < cols; ++col) {
        acc_t acc = sums[col];
        for (int64_t r = 0; r < count; ++r) {
          acc += static_cast<acc_t>(src[r * row_step + col * col_step]);
        }
        sums[col] = acc;
      }
    }
  }
}

}  // namespace

void forward_epilogue_cpu(const at::Tensor& gemm, const at::Tensor& out,
                          const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                          const at::Tensor& mask, Residual where) {
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t rows = out.size(0), cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_linear", [&] {
    auto run = [&]<typename gemm_t>() {
      const auto p = forward_epilogue_params<scalar_t>(out, bias, residual, mask);
      const gemm_t* gemm_data = gemm.const_data_ptr<gemm_t>();
      FS_BOOL_SWITCH(mask.defined(), kRelu, [&] {
        FS_RESIDUAL_SWITCH(where, kResidual, [&] {
          FS_BOOL_SWITCH(has_bias, kBias, [&] {
            if (current_backend() == Backend::kCudaEmulation) {
              // The GPU's element-wise units themselves, so that CPU tests run their code.
              bool vec = false;
              if constexpr (std::is_same_v<gemm_t, scalar_t>) {
                vec = forward_epilogue_vectorizable(p, gemm_data);
              }
              FS_BOOL_SWITCH(vec, kVec, [&] {
                if constexpr (!kVec || std::is_same_v<gemm_t, scalar_t>) {
                  const int64_t units = rows * mask_bytes_per_row(cols);
                  at::parallel_for(0, units, grain_rows(kMaskBitsPerByte),
                                   [&](int64_t begin, int64_t end) {
                    for (int64_t unit = begin; unit < end; ++unit) {
                      forward_epilogue_pass_unit<kRelu, kResidual, kBias, kVec>(p, gemm_data,
                                                                                unit);
                    }
                  });
                }
              });
              return;
            }
            at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
              // Chunks of whole rows, at least one; 8 zero bytes after the last element so
              // the mask packing may read 8 bytes from any column.
              const int64_t chunk_rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1));
              std::vector<uint8_t> active(kRelu ? chunk_rows * cols + kMaskBitsPerByte : 0, 0);
              for (int64_t row = begin; row < end; row += chunk_rows) {
                const int64_t count = std::min(chunk_rows, end - row);
                forward_epilogue_rows<kRelu, kResidual, kBias>(p, gemm_data + row * cols, row,
                                                               count, active.data());
              }
            });
          });
        });
      });
    };
    FS_GEMM_TYPE_SWITCH(gemm.scalar_type(), scalar_t, run);
  });
}

void backward_epilogue_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                           const at::Tensor& grad_preact, const at::Tensor& grad_bias) {
  const int64_t rows = grad_out.size(0), cols = grad_out.size(1);
  const int64_t bytes_per_row = mask_bytes_per_row(cols);
  const int64_t row_blocks = bias_row_blocks(rows, kCpuRowsPerBlock);
  const bool relu = grad_preact.defined();
  const bool has_bias = grad_bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "fused_linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partials(has_bias ? row_blocks * cols : 0);
    const auto p = backward_epilogue_params<scalar_t>(grad_out, mask, grad_preact,
                                                      has_bias ? partials.data() : nullptr,
                                                      kCpuRowsPerBlock);
    const int64_t grain = grain_rows(kCpuRowsPerBlock * cols);
    FS_BOOL_SWITCH(relu, kRelu, [&] {
      FS_BOOL_SWITCH(has_bias, kBias, [&] {
        if (current_backend() == Backend::kCudaEmulation) {
          // The GPU's element-wise units themselves, so that CPU tests run their code.
          FS_BOOL_SWITCH(backward_epilogue_vectorizable(p), kVec, [&] {
            at::parallel_for(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
              for (int64_t block = begin; block < end; ++block) {
                for (int64_t byte = 0; byte < bytes_per_row; ++byte) {
                  backward_epilogue_unit<kRelu, kBias, kVec>(p, block, byte);
                }
              }
            });
          });
          return;
        }
        FS_BOOL_SWITCH(p.grad_out_stride_col == 1, kUnitStride, [&] {
          at::parallel_for(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
            std::vector<uint8_t> active(kRelu ? std::max(kChunk, cols) + kMaskBitsPerByte : 0);
            for (int64_t block = begin; block < end; ++block) {
              backward_epilogue_block<kRelu, kBias, kUnitStride>(p, block, active.data());
            }
          });
        });
      });
    });
    if (has_bias) {
      scalar_t* grad_bias_data = grad_bias.data_ptr<scalar_t>();
      at::parallel_for(0, cols, grain_rows(row_blocks), [&](int64_t begin, int64_t end) {
        for (int64_t col = begin; col < end; ++col) {
          bias_grad_unit<scalar_t>(p.bias_partials, row_blocks, cols, col, grad_bias_data);
        }
      });
    }
  });
}

TORCH_LIBRARY_IMPL(fusedskip, CPU, m) {
  m.impl("fused_linear", &fused_linear);
  m.impl("fused_linear_backward", &fused_linear_backward);
}

}  // namespace fusedskip

// ---------------------------------------------------------------------------------------------
// Small layers: the GEMMs as direct loops.
//
// At the widths of a skip-connection MLP an ATen GEMM call costs more in dispatch and BLAS
// set-up than in arithmetic, and the concat form would make one per input. Below a work
// threshold (csrc/backend.cpp) one pass computes all of x W^T, its K loop running over the inputs in turn (the
// CPU counterpart of a fused mainloop), accumulating in opmath.

namespace fusedskip {
namespace {

// Pointer and strides of each input viewed as (rows, width).
template <typename scalar_t>
struct InputBlocks {
  const scalar_t* data[kMaxInputs];
  int64_t stride_row[kMaxInputs];
  int64_t stride_col[kMaxInputs];
  int64_t width[kMaxInputs];
  int64_t count;
};

template <typename scalar_t>
InputBlocks<scalar_t> input_blocks(const std::vector<at::Tensor>& inputs_2d) {
  InputBlocks<scalar_t> blocks{};
  blocks.count = static_cast<int64_t>(inputs_2d.size());
  for (size_t i = 0; i < inputs_2d.size(); ++i) {
    blocks.data[i] = inputs_2d[i].const_data_ptr<scalar_t>();
    blocks.stride_row[i] = inputs_2d[i].stride(0);
    blocks.stride_col[i] = inputs_2d[i].stride(1);
    blocks.width[i] = inputs_2d[i].size(1);
  }
  return blocks;
}

}  // namespace

at::Tensor direct_gemm_forward_cpu(const std::vector<at::Tensor>& inputs_2d,
                                   const at::Tensor& weight, const Geometry& g) {
  const int64_t rows = g.rows, cols = g.cols, in_total = weight.size(1);
  const at::ScalarType acc_type = at::toOpMathType(weight.scalar_type());
  at::Tensor gemm = at::empty({rows, cols}, weight.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fused_linear_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // weight^T as (in_total, cols): the innermost loop then runs over contiguous output columns.
    std::vector<acc_t> weight_t(in_total * cols);
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < cols; ++n) {
      for (int64_t k = 0; k < in_total; ++k) {
        weight_t[k * cols + n] = static_cast<acc_t>(w[n * weight.stride(0) + k * weight.stride(1)]);
      }
    }
    const InputBlocks<scalar_t> blocks = input_blocks<scalar_t>(inputs_2d);
    acc_t* out = gemm.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows(cols * in_total), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        acc_t* out_row = out + row * cols;
        std::fill(out_row, out_row + cols, acc_t(0));
        const acc_t* w_row = weight_t.data();
        for (int64_t b = 0; b < blocks.count; ++b) {
          const scalar_t* x = blocks.data[b] + row * blocks.stride_row[b];
          for (int64_t k = 0; k < blocks.width[b]; ++k, w_row += cols) {
            const acc_t xv = static_cast<acc_t>(x[k * blocks.stride_col[b]]);
            for (int64_t n = 0; n < cols; ++n) out_row[n] += xv * w_row[n];
          }
        }
      }
    });
  });
  return gemm;
}

void direct_gemm_backward_cpu(const at::Tensor& grad_preact, const std::vector<at::Tensor>& inputs_2d,
                              const at::Tensor& weight, const Geometry& g,
                              const std::vector<at::Tensor>& grad_inputs_2d,
                              const at::Tensor& grad_weight) {
  const int64_t rows = g.rows, cols = g.cols, in_total = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fused_linear_backward_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_preact.const_data_ptr<scalar_t>();
    const int64_t gp_row = grad_preact.stride(0), gp_col = grad_preact.stride(1);
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t w_row = weight.stride(0), w_col = weight.stride(1);
    const InputBlocks<scalar_t> blocks = input_blocks<scalar_t>(inputs_2d);

    bool any_input = false;
    for (const at::Tensor& grad : grad_inputs_2d) any_input |= grad.defined();
    if (any_input) {
      // grad_input[row, :] = sum_n grad_preact[row, n] * weight[n, :], all blocks in one row pass.
      at::parallel_for(0, rows, grain_rows(cols * in_total), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(in_total);
        for (int64_t row = begin; row < end; ++row) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t n = 0; n < cols; ++n) {
            const acc_t gv = static_cast<acc_t>(gp[row * gp_row + n * gp_col]);
            const scalar_t* w_n = w + n * w_row;
            for (int64_t k = 0; k < in_total; ++k) acc[k] += gv * static_cast<acc_t>(w_n[k * w_col]);
          }
          int64_t offset = 0;
          for (int64_t b = 0; b < blocks.count; ++b) {
            if (grad_inputs_2d[b].defined()) {
              scalar_t* dst =
                  grad_inputs_2d[b].data_ptr<scalar_t>() + row * grad_inputs_2d[b].stride(0);
              for (int64_t k = 0; k < blocks.width[b]; ++k) {
                dst[k] = static_cast<scalar_t>(acc[offset + k]);
              }
            }
            offset += blocks.width[b];
          }
        }
      });
    }
    if (grad_weight.defined()) {
      // grad_weight[n, :] = sum_row grad_preact[row, n] * cat(inputs)[row, :]; rows summed in
      // order, so the result does not depend on the thread count.
      scalar_t* gw = grad_weight.data_ptr<scalar_t>();
      at::parallel_for(0, cols, grain_rows(rows * in_total), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(in_total);
        for (int64_t n = begin; n < end; ++n) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t row = 0; row < rows; ++row) {
            const acc_t gv = static_cast<acc_t>(gp[row * gp_row + n * gp_col]);
            int64_t offset = 0;
            for (int64_t b = 0; b < blocks.count; ++b) {
              const scalar_t* x = blocks.data[b] + row * blocks.stride_row[b];
              for (int64_t k = 0; k < blocks.width[b]; ++k) {
                acc[offset + k] += gv * static_cast<acc_t>(x[k * blocks.stride_col[b]]);
              }
              offset += blocks.width[b];
            }
          }
          for (int64_t k = 0; k < in_total; ++k) gw[n * in_total + k] = static_cast<scalar_t>(acc[k]);
        }
      });
    }
  });
}

}  // namespace fusedskip
