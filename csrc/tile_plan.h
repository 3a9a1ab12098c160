// Host side of the native kernel (csrc/tile_gemm.h): tensors -> TileParams, the grid, split-K.
// Included by the two places that run it, each with its own Executor:
//
//   csrc/cuda/tile_kernels.cu      launches CUDA kernels (tensor cores through WMMA)
//   csrc/cpu/tile_emulation.cpp    runs the same blocks on the host (FUSEDSKIP_BACKEND=cuda_emulation)
//
// An Executor provides
//   template <typename scalar_t> using TensorCoreMath = ...;   the fragment maths
//   static int multiprocessors();                              sizes split-K
//   template <class Math, bool kRelu, Residual kResidual, bool kBias, bool kStoresPreact,
//             class Params>
//   static void run_tiles(const Params&, int64_t blocks);   blocks 0 .. blocks-1 of the 1-D grid
//   template <typename scalar_t>
//   static void split_sum(const SplitSumParams<scalar_t>&);
//   static constexpr bool kPoison;   fill outputs and workspaces with NaN before the blocks run,
//                                    so that an element no block writes fails the tests
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "dispatch.h"
#include "fused_linear.h"
#include "tile_gemm.h"

namespace fusedskip {

static_assert(kTileForwardSegments >= kMaxInputs && kTileBackwardProblems >= 2 * kMaxInputs + 1,
              "the native kernel's parameter blocks must hold every input of the concat form");

// Tensor cores for float16 / bfloat16, and for float32 when TF32 is allowed for matmuls
// (torch.backends.cuda.matmul.allow_tf32, as cuBLAS reads it); SIMT otherwise.
template <class Executor, typename scalar_t, class F>
void with_tile_math(F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f.template operator()<SimtMath<double>>();
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (at::globalContext().allowTF32CuBLAS()) {
      f.template operator()<typename Executor::template TensorCoreMath<float>>();
    } else {
      f.template operator()<SimtMath<float>>();
    }
  } else {
    f.template operator()<typename Executor::template TensorCoreMath<scalar_t>>();
  }
}

// out = epilogue(sum_i inputs_2d[i] W_i^T): the whole forward in one launch. `out` is (rows, cols)
// with unit column stride, `residual_2d` likewise or undefined, `bias` contiguous or absent,
// `mask` (rows, mask bytes) or undefined without ReLU.
template <class Executor>
void tile_forward(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                  const at::Tensor& out, const at::Tensor& mask, Residual where) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const bool has_bias = bias.has_value() && bias->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fused_linear_native", [&] {
    TileParams<scalar_t, kTileForwardSegments, 1, false> p{};
    TileProblem<scalar_t, kTileForwardSegments>& problem = p.problem[0];
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    int64_t offset = 0;
    for (size_t i = 0; i < inputs_2d.size(); ++i) {
      const at::Tensor& x = inputs_2d[i];
      // B(k, n) = weight[n, offset + k]: column block i of weight, read transposed in place.
      problem.segment[i] = {.a = x.const_data_ptr<scalar_t>(),
                            .a_stride_m = x.stride(0),
                            .a_stride_k = x.stride(1),
                            .b = w + offset * weight.stride(1),
                            .b_stride_k = weight.stride(1),
                            .b_stride_n = weight.stride(0),
                            .k = x.size(1),
                            .mask = nullptr,
                            .mask_row_bytes = 0,
                            .mask_on = MaskedOperand::kNone};
      offset += x.size(1);
    }
    problem.num_segments = static_cast<int>(inputs_2d.size());
    problem.splits = 1;
    problem.k_per_split = std::max<int64_t>(offset, 1);
    problem.m = rows;
    problem.n = cols;
    problem.tiles_m = ceil_div(rows, kTileEdge);
    problem.tiles_n = ceil_div(cols, kTileEdge);
    problem.out = out.data_ptr<scalar_t>();
    problem.out_stride_m = out.stride(0);
    p.num_problems = 1;
    p.first_block[0] = 0;
    p.first_block[1] = problem.tiles_m * problem.tiles_n;
    p.bias = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    p.residual = residual_2d.defined() ? residual_2d.const_data_ptr<scalar_t>() : nullptr;
    p.residual_stride_row = residual_2d.defined() ? residual_2d.stride(0) : 0;
    p.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
    if constexpr (Executor::kPoison) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
      if (mask.defined()) mask.fill_(0xa5);
    }
    with_tile_math<Executor, scalar_t>([&]<class Math>() {
      FS_BOOL_SWITCH(mask.defined(), kRelu, [&] {
        FS_RESIDUAL_SWITCH(where, kResidual, [&] {
          FS_BOOL_SWITCH(has_bias, kBias, [&] {
            Executor::template run_tiles<Math, kRelu, kResidual, kBias, false>(p, p.first_block[1]);
          });
        });
      });
    });
  });
}

// Split-K of the weight gradient (K = rows, often large while the output is small): slices of at
// least this many rows, at most kTileMaxSplits (csrc/tile_gemm.h) of them, as many as give every
// multiprocessor kTileSplitBlocksPerSm of the row-summing blocks. Why 4 and not 2: at 65536x30x30
// two per SM (64 slices of 1024 rows) left the backward at 11% achieved occupancy against 50%
// possible, ~128 blocks of 4 warps each walking 32 K steps after the other blocks had finished
// (ncu on an H200, benchmarks/results/h200-2026-11-27). Not yet timed at 4.
constexpr int64_t kTileMinRowsPerSplit = 256;
constexpr int64_t kTileSplitBlocksPerSm = 4;

// The whole backward in one launch: grad_inputs_2d[i] = G W_i (where defined, (rows, width_i)
// with unit column stride: column blocks of one gradient), grad_weight[:, block i] =
// G^T inputs_2d[i] (when defined, (cols, in_features) contiguous) and grad_bias = 1^T G (when
// defined), with G = grad_out (any strides) read through the ReLU `mask` where that is defined,
// else as it is. grad_preact (when defined; (rows, cols), unit column stride; needs the mask and
// at least one of the gradients above) gets G itself, stored by the blocks that load it.
template <class Executor>
void tile_backward(const at::Tensor& grad_out, const at::Tensor& mask,
                   const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                   const std::vector<at::Tensor>& grad_inputs_2d, const at::Tensor& grad_weight,
                   const at::Tensor& grad_bias, const at::Tensor& grad_preact) {
  const int64_t rows = grad_out.size(0), cols = grad_out.size(1);
  const int64_t in_total = weight.size(1);
  const uint8_t* mask_data = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  const int64_t mask_row_bytes = mask_bytes_per_row(cols);
  auto masked = [&](MaskedOperand operand) {
    return mask.defined() ? operand : MaskedOperand::kNone;
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fused_linear_backward_native", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_tile_math<Executor, scalar_t>([&]<class Math>() {
      // The weight and bias gradients sum over the rows (their K): split it into enough slices
      // to give every multiprocessor kTileSplitBlocksPerSm blocks.
      int64_t splits = 1;
      int64_t k_per_split = std::max<int64_t>(rows, 1);
      if ((grad_weight.defined() || grad_bias.defined()) && rows > 0) {
        int64_t row_sum_tiles = grad_bias.defined() ? ceil_div(cols, kTileEdge) : 0;
        if (grad_weight.defined()) {
          for (const at::Tensor& x : inputs_2d) {
            row_sum_tiles += ceil_div(cols, kTileEdge) * ceil_div(x.size(1), kTileEdge);
          }
        }
        const int64_t wanted =
            ceil_div(kTileSplitBlocksPerSm * Executor::multiprocessors(),
                     std::max<int64_t>(row_sum_tiles, 1));
        const int64_t most =
            std::min(kTileMaxSplits, std::max<int64_t>(1, rows / kTileMinRowsPerSplit));
        splits = std::clamp<int64_t>(wanted, 1, most);
        if (splits > 1) {
          k_per_split = ceil_div(ceil_div(rows, splits), Math::kBK) * Math::kBK;
          splits = ceil_div(rows, k_per_split);
        }
      }
      // Split partial sums, one slab per slice: the weight gradient, then the bias gradient.
      const int64_t weight_count = grad_weight.defined() ? cols * in_total : 0;
      const int64_t bias_count = grad_bias.defined() ? cols : 0;
      const at::Tensor partial =
          splits > 1 ? at::empty({splits, weight_count + bias_count},
                                 weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                     : at::Tensor();
      if constexpr (Executor::kPoison) {
        const double nan = std::numeric_limits<double>::quiet_NaN();
        for (const at::Tensor& t : {partial, grad_weight, grad_bias, grad_preact}) {
          if (t.defined()) t.fill_(nan);
        }
        for (const at::Tensor& grad : grad_inputs_2d) {
          if (grad.defined()) grad.fill_(nan);
        }
      }

      TileParams<scalar_t, 1, kTileBackwardProblems, true> p{};
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
      acc_t* partial_data = splits > 1 ? partial.data_ptr<acc_t>() : nullptr;
      int problems = 0;
      int64_t blocks = 0;
      auto add = [&](const TileSegment<scalar_t>& segment, int64_t m, int64_t n, scalar_t* out,
                     int64_t out_stride_m, bool sums_rows, int64_t partial_offset) {
        TileProblem<scalar_t, 1>& problem = p.problem[problems];
        problem.segment[0] = segment;
        problem.num_segments = 1;
        problem.splits = sums_rows ? static_cast<int>(splits) : 1;
        problem.k_per_split = sums_rows ? k_per_split : std::max<int64_t>(segment.k, 1);
        problem.m = m;
        problem.n = n;
        problem.tiles_m = ceil_div(m, kTileEdge);
        problem.tiles_n = ceil_div(n, kTileEdge);
        problem.out = out;
        problem.out_stride_m = out_stride_m;
        problem.partial = sums_rows && partial_data ? partial_data + partial_offset : nullptr;
        problem.partial_stride_split = weight_count + bias_count;
        p.first_block[problems] = blocks;
        blocks += problem.tiles_m * problem.tiles_n * problem.splits;
        ++problems;
      };
      int64_t offset = 0;
      for (size_t i = 0; i < inputs_2d.size(); ++i) {
        const at::Tensor& x = inputs_2d[i];
        const int64_t width = x.size(1);
        if (grad_inputs_2d[i].defined()) {
          // A = G (rows, cols); B(k, n) = weight[k, offset + n].
          add({.a = g,
               .a_stride_m = grad_out.stride(0),
               .a_stride_k = grad_out.stride(1),
               .b = w + offset * weight.stride(1),
               .b_stride_k = weight.stride(0),
               .b_stride_n = weight.stride(1),
               .k = cols,
               .mask = mask_data,
               .mask_row_bytes = mask_row_bytes,
               .mask_on = masked(MaskedOperand::kA)},
              rows, width, grad_inputs_2d[i].data_ptr<scalar_t>(), grad_inputs_2d[i].stride(0),
              false, 0);
        }
        if (grad_weight.defined()) {
          // A(m, k) = G[k, m] (its transpose); B = inputs[i] (rows, width).
          add({.a = g,
               .a_stride_m = grad_out.stride(1),
               .a_stride_k = grad_out.stride(0),
               .b = x.const_data_ptr<scalar_t>(),
               .b_stride_k = x.stride(0),
               .b_stride_n = x.stride(1),
               .k = rows,
               .mask = mask_data,
               .mask_row_bytes = mask_row_bytes,
               .mask_on = masked(MaskedOperand::kATransposed)},
              cols, width, grad_weight.data_ptr<scalar_t>() + offset, in_total, true, offset);
        }
        offset += width;
      }
      if (grad_bias.defined()) {
        // A = a row of ones (1, rows); B = G.
        add({.a = nullptr,
             .a_stride_m = 0,
             .a_stride_k = 0,
             .b = g,
             .b_stride_k = grad_out.stride(0),
             .b_stride_n = grad_out.stride(1),
             .k = rows,
             .mask = mask_data,
             .mask_row_bytes = mask_row_bytes,
             .mask_on = masked(MaskedOperand::kB)},
            1, cols, grad_bias.data_ptr<scalar_t>(), cols, true, weight_count);
      }
      p.num_problems = problems;
      p.first_block[problems] = blocks;
      if (grad_preact.defined()) {
        // Every problem reads all of G through the mask, but one with no tiles (an input 0 wide)
        // reads none of it: the first with tiles stores it. The caller sees that one exists.
        TORCH_INTERNAL_ASSERT(mask.defined() && grad_preact.stride(1) == 1);
        while (p.preact_problem < problems &&
               p.first_block[p.preact_problem + 1] == p.first_block[p.preact_problem]) {
          ++p.preact_problem;
        }
        TORCH_INTERNAL_ASSERT(p.preact_problem < problems || grad_preact.numel() == 0);
        p.grad_preact = grad_preact.data_ptr<scalar_t>();
        p.grad_preact_stride_row = grad_preact.stride(0);
      }
      if (blocks == 0) return;
      // Where grad_preact is wanted, kernels of their own: the extra stores in every backward
      // kernel's K loop cost registers, and the tensor-core kernels have none to spare.
      FS_BOOL_SWITCH(grad_preact.defined(), kStoresPreact, [&] {
        Executor::template run_tiles<Math, false, Residual::kNone, false, kStoresPreact>(p, blocks);
      });
      if (splits > 1) {
        Executor::template split_sum<scalar_t>(SplitSumParams<scalar_t>{
            partial.const_data_ptr<acc_t>(), static_cast<int>(splits), weight_count + bias_count,
            grad_weight.defined() ? grad_weight.data_ptr<scalar_t>() : nullptr, weight_count,
            grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr, bias_count});
      }
    });
  });
}

}  // namespace fusedskip
