// Host side of the native kernel (csrc/tile_gemm.h): tensors -> TileParams, the grid, split-K.
// Included by the two places that run it, each with its own Executor:
//
//   csrc/cuda/tile_kernels.cu      launches CUDA kernels (tensor cores through WMMA)
//   csrc/cpu/tile_emulation.cpp    runs the same blocks on the host (FUSEDSKIP_BACKEND=cuda_emulation)
//
// An Executor provides
//   template <typename scalar_t> using TensorCoreMath = ...;   the fragment maths
//   static int multiprocessors();                              sizes split-K
//   template <class Math, bool kRelu, Residual kResidual, bool kBias, class Params>
//   static void run_tiles(const Params&, int64_t blocks);   blocks 0 .. blocks-1 of the 1-D grid
//   template <typename scalar_t>
//   static void split_sum(const acc_t* partial, int splits, int64_t stride, int64_t count,
//                         scalar_t* out);
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

static_assert(kTileForwardSegments >= kMaxInputs && kTileBackwardProblems >= 2 * kMaxInputs,
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
    TileParams<scalar_t, kTileForwardSegments, 1> p{};
    TileProblem<scalar_t, kTileForwardSegments>& problem = p.problem[0];
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    int64_t offset = 0, k_max = 1;
    for (size_t i = 0; i < inputs_2d.size(); ++i) {
      const at::Tensor& x = inputs_2d[i];
      // B(k, n) = weight[n, offset + k]: column block i of weight, read transposed in place.
      problem.segment[i] = {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                            w + offset * weight.stride(1), weight.stride(1), weight.stride(0),
                            x.size(1)};
      offset += x.size(1);
      k_max = std::max(k_max, x.size(1));
    }
    problem.num_segments = static_cast<int>(inputs_2d.size());
    problem.splits = 1;
    problem.k_per_split = k_max;
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
            Executor::template run_tiles<Math, kRelu, kResidual, kBias>(p, p.first_block[1]);
          });
        });
      });
    });
  });
}

// Split-K of the weight gradient (K = rows, often large while the output is small): slices of at
// least this many rows, at most kTileMaxSplits (csrc/tile_gemm.h) of them.
constexpr int64_t kTileMinRowsPerSplit = 256;

// The GEMMs of the backward in one launch: grad_inputs_2d[i] = grad_preact W_i (where defined,
// (rows, width_i) contiguous) and grad_weight[:, block i] = grad_preact^T inputs_2d[i] (when
// defined, (cols, in_features) contiguous). grad_preact may have any strides.
template <class Executor>
void tile_backward(const at::Tensor& grad_preact, const std::vector<at::Tensor>& inputs_2d,
                   const at::Tensor& weight, const std::vector<at::Tensor>& grad_inputs_2d,
                   const at::Tensor& grad_weight) {
  const int64_t rows = grad_preact.size(0), cols = grad_preact.size(1);
  const int64_t in_total = weight.size(1);
  const size_t count = inputs_2d.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fused_linear_backward_native", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_tile_math<Executor, scalar_t>([&]<class Math>() {
      // Enough slices of the weight gradient's K (rows) to give every multiprocessor two blocks.
      int64_t splits = 1;
      int64_t k_per_split = std::max<int64_t>(rows, 1);
      if (grad_weight.defined() && rows > 0) {
        int64_t weight_tiles = 0;
        for (const at::Tensor& x : inputs_2d) {
          weight_tiles += ceil_div(cols, kTileEdge) * ceil_div(x.size(1), kTileEdge);
        }
        const int64_t wanted = ceil_div(2 * Executor::multiprocessors(), std::max<int64_t>(weight_tiles, 1));
        const int64_t most = std::min(kTileMaxSplits, std::max<int64_t>(1, rows / kTileMinRowsPerSplit));
        splits = std::clamp<int64_t>(wanted, 1, most);
        if (splits > 1) {
          k_per_split = ceil_div(ceil_div(rows, splits), Math::kBK) * Math::kBK;
          splits = ceil_div(rows, k_per_split);
        }
      }
      const at::Tensor partial =
          splits > 1 ? at::empty({splits, cols, in_total},
                                 weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                     : at::Tensor();
      if constexpr (Executor::kPoison) {
        const double nan = std::numeric_limits<double>::quiet_NaN();
        if (partial.defined()) partial.fill_(nan);
        if (grad_weight.defined()) grad_weight.fill_(nan);
        for (const at::Tensor& grad : grad_inputs_2d) {
          if (grad.defined()) grad.fill_(nan);
        }
      }

      TileParams<scalar_t, 1, kTileBackwardProblems> p{};
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* g = grad_preact.const_data_ptr<scalar_t>();
      int problems = 0;
      int64_t blocks = 0;
      auto add = [&](const TileSegment<scalar_t>& segment, int64_t m, int64_t n, scalar_t* out,
                     int64_t out_stride_m, int64_t problem_splits, int64_t problem_k_per_split,
                     acc_t* problem_partial) {
        TileProblem<scalar_t, 1>& problem = p.problem[problems];
        problem.segment[0] = segment;
        problem.num_segments = 1;
        problem.splits = static_cast<int>(problem_splits);
        problem.k_per_split = problem_k_per_split;
        problem.m = m;
        problem.n = n;
        problem.tiles_m = ceil_div(m, kTileEdge);
        problem.tiles_n = ceil_div(n, kTileEdge);
        problem.out = out;
        problem.out_stride_m = out_stride_m;
        problem.partial = problem_partial;
        problem.partial_stride_split = cols * in_total;
        p.first_block[problems] = blocks;
        blocks += problem.tiles_m * problem.tiles_n * problem_splits;
        ++problems;
      };
      int64_t offset = 0;
      for (size_t i = 0; i < count; ++i) {
        const at::Tensor& x = inputs_2d[i];
        const int64_t width = x.size(1);
        if (grad_inputs_2d[i].defined()) {
          // A = grad_preact (rows, cols); B(k, n) = weight[k, offset + n].
          add({g, grad_preact.stride(0), grad_preact.stride(1), w + offset * weight.stride(1),
               weight.stride(0), weight.stride(1), cols},
              rows, width, grad_inputs_2d[i].data_ptr<scalar_t>(), width, 1,
              std::max<int64_t>(cols, 1), nullptr);
        }
        if (grad_weight.defined()) {
          // A(m, k) = grad_preact[k, m] (its transpose); B = inputs[i] (rows, width).
          add({g, grad_preact.stride(1), grad_preact.stride(0), x.const_data_ptr<scalar_t>(),
               x.stride(0), x.stride(1), rows},
              cols, width, grad_weight.data_ptr<scalar_t>() + offset, in_total, splits,
              k_per_split, splits > 1 ? partial.data_ptr<acc_t>() + offset : nullptr);
        }
        offset += width;
      }
      p.num_problems = problems;
      p.first_block[problems] = blocks;
      if (blocks == 0) return;
      Executor::template run_tiles<Math, false, Residual::kNone, false>(p, blocks);
      if (splits > 1) {
        Executor::template split_sum<scalar_t>(partial.const_data_ptr<acc_t>(),
                                               static_cast<int>(splits), cols * in_total,
                                               cols * in_total, grad_weight.data_ptr<scalar_t>());
      }
    });
  });
}

}  // namespace fusedskip
