// The native CUDA kernel run on the host (FUSEDSKIP_BACKEND=cuda_emulation, CPU tensors): the
// block body of csrc/tile_gemm.h and the launch planning of csrc/tile_plan.h, unchanged, with
// each block's threads run one after another between the syncs and the tensor-core fragment
// maths replaced by plain loops. Slow; it exists so the CPU tests check the GPU kernel's
// tiling, bounds, concat segments, split-K and epilogue without a GPU.
#include <cstring>
#include <memory>

#include <ATen/Parallel.h>

#include "tile_plan.h"

namespace fusedskip {
namespace {

template <class Math>
struct HostBlock {
  typename Math::Acc acc[Math::kWorkers];

  template <class F>
  void for_each_thread(F&& f) {
    for (int thread = 0; thread < Math::kThreads; ++thread) f(thread);
  }
  template <class F>
  void for_each_worker(F&& f) {
    for (int worker = 0; worker < Math::kWorkers; ++worker) f(worker, acc[worker]);
  }
  void sync() {}
};

// What the GPU's TF32 conversion does to a float32 operand: round to nearest (ties away from
// zero) to 10 mantissa bits.
float round_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) {  // finite: round; Inf / NaN pass through
    bits += 0x1000u;
    bits &= 0xffffe000u;
  }
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

// The warp-level fragment maths, one warp's 32x32 accumulator at a time, in float32 as the
// tensor cores accumulate.
template <typename scalar_t>
struct TensorCoreEmulation : TensorCoreShape<scalar_t> {
  using Shape = TensorCoreShape<scalar_t>;
  using Smem = typename Shape::Smem;
  struct Acc {
    float c[Shape::kWarpM][Shape::kWarpN];
  };

  static float operand(scalar_t value) {
    if constexpr (Shape::kTf32) return round_to_tf32(value);
    return static_cast<float>(value);
  }

  static void zero(Acc& acc) { std::memset(acc.c, 0, sizeof acc.c); }

  static void mma(const Smem& smem, Acc& acc, int warp) {
    const int row = Shape::warp_row(warp), col = Shape::warp_col(warp);
    for (int kk = 0; kk < Shape::kBK; kk += Shape::kFragK) {
      for (int r = 0; r < Shape::kWarpM; ++r) {
        for (int c = 0; c < Shape::kWarpN; ++c) {
          float sum = 0;
          for (int t = 0; t < Shape::kFragK; ++t) {
            sum += operand(smem.a()[(row + r) * Shape::kALd + kk + t]) *
                   operand(smem.b()[(kk + t) * Shape::kBLd + col + c]);
          }
          acc.c[r][c] += sum;
        }
      }
    }
  }

  static void store(Smem& smem, const Acc& acc, int warp) {
    const int row = Shape::warp_row(warp), col = Shape::warp_col(warp);
    for (int r = 0; r < Shape::kWarpM; ++r) {
      for (int c = 0; c < Shape::kWarpN; ++c) smem.c()[(row + r) * Shape::kCLd + col + c] = acc.c[r][c];
    }
  }
};

struct HostExecutor {
  template <typename scalar_t>
  using TensorCoreMath = TensorCoreEmulation<scalar_t>;

  // A small GPU: split-K then happens at test sizes (rows >= 2 * kTileMinRowsPerSplit).
  static int multiprocessors() { return 4; }
  static constexpr bool kPoison = true;

  template <class Math, bool kRelu, Residual kResidual, bool kBias, bool kStoresPreact,
            class Params>
  static void run_tiles(const Params& p, int64_t blocks) {
    TORCH_INTERNAL_ASSERT(blocks <= kTileMaxBlocks);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      auto smem = std::make_unique<typename Math::Smem>();
      auto block = std::make_unique<HostBlock<Math>>();
      for (int64_t index = begin; index < end; ++index) {
        tile_gemm_block<Math, kRelu, kResidual, kBias, kStoresPreact>(p, index, *smem, *block);
      }
    });
  }

  template <typename scalar_t>
  static void split_sum(const SplitSumParams<scalar_t>& p) {
    for (int64_t i = 0; i < p.count_first + p.count_second; ++i) split_sum_unit(p, i);
  }
};

}  // namespace

void tile_forward_emulated(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                           const at::Tensor& out, const at::Tensor& mask, Residual where) {
  tile_forward<HostExecutor>(inputs_2d, weight, bias, residual_2d, out, mask, where);
}

void tile_backward_emulated(const at::Tensor& grad_out, const at::Tensor& mask,
                            const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                            const std::vector<at::Tensor>& grad_inputs_2d,
                            const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                            const at::Tensor& grad_preact) {
  tile_backward<HostExecutor>(grad_out, mask, inputs_2d, weight, grad_inputs_2d, grad_weight,
                              grad_bias, grad_preact);
}

}  // namespace fusedskip
