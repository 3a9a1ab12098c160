// The `cutlass` backend: x W^T with the bias, the ReLU, its 1-bit mask and the residual computed
// inside one CUTLASS 3 GEMM (TMA, warp-specialized, wgmma) on sm_90a, so a large layer costs the
// GEMM alone: no second pass over the output (benchmarks/NOTES.md, "CUDA element-wise pass":
// that pass alone cost ~15% of the GEMM at 8192x4096x4096).
//
// The epilogue is a visitor tree evaluated on the accumulators in registers:
//   relu_add   out = relu(acc + bias) + residual      mask = acc + bias > 0
//   add_relu   out = relu(acc + bias + residual)      mask = acc + bias + residual > 0
//   relu       out = relu(acc + bias)                 mask = acc + bias > 0
// in float32, rounded once to the output dtype. The mask bits land in the op's own mask layout
// (8 columns per byte, row-major, csrc/epilogue.h): CUTLASS's 1-bit aux store writes bit n of
// row m at bit offset m * row_bits + n, least significant bit first, as mask_bit reads it.
//
// The ReLU is a clamp to [smallest denormal, +inf]: CUTLASS's ReLU maps NaN to 0 and sets the
// mask bit where the pre-activation is 0 (it tests relu(z) == z); torch keeps NaN and its
// backward passes no gradient at 0. The clamp keeps NaN (it propagates NaN, and NaN == NaN is
// false, so no mask bit), and for any z <= 0 it returns the smallest denormal, which differs from
// z, so the bit is set exactly where z > 0. That denormal is 2^-149, below half of the smallest
// bfloat16 / float16 denormal, so it rounds to 0 in the output; added to a residual r first, it
// leaves r unchanged. (This needs denormals kept: no --use_fast_math / ftz in this build.)
//
// Where it applies (fused_gemm_forward_cuda says false otherwise, and the caller takes the
// cuBLAS + element-wise path): an sm_90 GPU, float16 / bfloat16, ReLU, out_features a multiple of
// 128 (whole 16-byte mask rows, and no mask byte shared by two tiles), in_features a multiple of
// 8, every operand on 16-byte boundaries with unit column stride (what TMA needs).
#ifdef FUSEDSKIP_WITH_CUTLASS
// CuTe's device-side asserts are calls to __assert_fail: a call inside the mainloop makes ptxas
// serialize the wgmma pipeline (warning C7510), so they are compiled out here.
#ifndef NDEBUG
#define NDEBUG
#endif
// CUTLASS's Blackwell collectives, included by its builders, capture `this` implicitly in
// lambdas, which C++20 deprecates (nvcc warning 2908); they are never instantiated here.
#pragma nv_diag_suppress 2908
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>
#pragma nv_diag_default 2908
#endif

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "backend.h"
#include "fused_linear.h"

namespace fusedskip {
namespace {

#ifdef FUSEDSKIP_WITH_CUTLASS
using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename T>
struct CutlassType;
template <>
struct CutlassType<at::Half> { using type = cutlass::half_t; };
template <>
struct CutlassType<at::BFloat16> { using type = cutlass::bfloat16_t; };

// One kernel per (dtype, residual position). 128x128x64 tiles, two consumer warpgroups, clusters
// of 2 along M. 128x256 tiles spilled ~3 KB of registers per
// thread with this epilogue (ptxas -v); 128x128 spills nothing
// (benchmarks/results/ptxas-cutlass-sm90a-2026-11-26.txt).
template <typename Element, Residual kWhere>
struct FusedGemm {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlign = 16 / sizeof(Element);
  using RowMajorStride = Stride<int64_t, _1, int64_t>;

  // Leaves and nodes of the visitor tree.
  using Acc = fusion::Sm90AccFetch;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>,
                                        kAlign>;
  using Residual_ = fusion::Sm90SrcFetch<Element>;
  template <class... Children>
  using Add = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
                              Children...>;
  // Only the 1-bit form of CUTLASS's aux store is used (its ReLU specialisation writes the bits
  // from registers); the staging parameters of the general store do not apply.
  using MaskStore = fusion::Sm90AuxStore<0, void, cutlass::uint1b_t, kRound, RowMajorStride, void,
                                         void, 128>;
  template <class Preact, class Out>
  using ReluWithMask = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::epilogue::thread::Clamp, Out, float, kRound>,
      fusion::Sm90EVT<MaskStore, Preact>>;

  using Preact = std::conditional_t<kWhere == Residual::kBeforeRelu,
                                    Add<Add<Acc, Bias>, Residual_>, Add<Acc, Bias>>;
  using Tree = std::conditional_t<
      kWhere == Residual::kAfterRelu,
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Element, float, kRound>,
                      ReluWithMask<Preact, float>, Residual_>,
      ReluWithMask<Preact, Element>>;
  using ElementC = std::conditional_t<kWhere == Residual::kNone, void, Element>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC,
      cutlass::layout::RowMajor, kAlign, Element, cutlass::layout::RowMajor, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Tree>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor,
      kAlign, Element, cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Arguments of the tree, nested as the tree is: {children..., node's own}.
  static typename Tree::Arguments tree_arguments(const Element* bias, cutlass::uint1b_t* mask,
                                                 int64_t mask_row_bits) {
    const typename Bias::Arguments bias_args{bias, Element(0), {}};
    const typename cutlass::epilogue::thread::Clamp<float>::Arguments clamp{
        std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity()};
    const RowMajorStride mask_stride{mask_row_bits, _1{}, 0};
    if constexpr (kWhere == Residual::kBeforeRelu) {
      return {{{{{}, bias_args, {}}, {}, {}}, {mask, mask_stride}}, clamp};
    } else if constexpr (kWhere == Residual::kAfterRelu) {
      return {{{{{}, bias_args, {}}, {mask, mask_stride}}, clamp}, {}, {}};
    } else {
      return {{{{}, bias_args, {}}, {mask, mask_stride}}, clamp};
    }
  }

  static bool run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& residual, const at::Tensor& out, const at::Tensor& mask) {
    const int rows = static_cast<int>(x.size(0)), cols = static_cast<int>(weight.size(0));
    const int depth = static_cast<int>(x.size(1));
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<Element*>(t.data_ptr()) : nullptr;
    };
    typename Kernel::StrideA stride_x{x.stride(0), _1{}, 0};
    typename Kernel::StrideB stride_w{weight.stride(0), _1{}, 0};
    typename Kernel::StrideC stride_r{};
    if constexpr (kWhere != Residual::kNone) stride_r = {residual.stride(0), _1{}, 0};
    typename Kernel::StrideD stride_out{out.stride(0), _1{}, 0};

    cutlass::KernelHardwareInfo hw;
    hw.device_id = x.get_device();
    hw.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {rows, cols, depth, 1},
        {ptr(x), stride_x, ptr(weight), stride_w},
        {tree_arguments(ptr(bias), reinterpret_cast<cutlass::uint1b_t*>(mask.data_ptr()),
                        mask.stride(0) * 8),
         ptr(residual), stride_r, ptr(out), stride_out},
        hw};
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    const at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                           x.options().dtype(at::kByte));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
                "fusedskip: the CUTLASS GEMM could not be set up");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
                "fusedskip: the CUTLASS GEMM failed to launch");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count_fused_gemm_launch();
    return true;
  }
};
#endif  // FUSEDSKIP_WITH_CUTLASS

bool on_words(const at::Tensor& t) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1 &&
         (t.dim() < 2 || t.stride(0) * item % 16 == 0);
}

}  // namespace

bool fused_gemm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                             const at::Tensor& out, const at::Tensor& mask, Residual where) {
#ifdef FUSEDSKIP_WITH_CUTLASS
  const at::ScalarType dtype = weight.scalar_type();
  if (!mask.defined() || (dtype != at::kHalf && dtype != at::kBFloat16)) return false;
  const int64_t rows = x.size(0), cols = weight.size(0), depth = x.size(1);
  const int64_t int_max = std::numeric_limits<int>::max();
  if (rows == 0 || rows > int_max || cols % 128 != 0 || cols > int_max || depth % 8 != 0 ||
      depth == 0 || depth > int_max) {
    return false;
  }
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  if (device->major != 9 || device->minor != 0) return false;  // sm_90a code runs on sm_90 only
  const at::Tensor bias_t = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  if (!on_words(x) || !on_words(weight) || !on_words(out) || !mask.is_contiguous() ||
      mask.stride(0) % 16 != 0 || reinterpret_cast<uintptr_t>(mask.data_ptr()) % 16 != 0 ||
      (bias_t.defined() && !on_words(bias_t)) || (residual.defined() && !on_words(residual))) {
    return false;
  }
  bool ran = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "fused_gemm_sm90", [&] {
    using Element = typename CutlassType<scalar_t>::type;
    switch (where) {
      case Residual::kNone:
        ran = FusedGemm<Element, Residual::kNone>::run(x, weight, bias_t, residual, out, mask);
        break;
      case Residual::kAfterRelu:
        ran = FusedGemm<Element, Residual::kAfterRelu>::run(x, weight, bias_t, residual, out, mask);
        break;
      case Residual::kBeforeRelu:
        ran = FusedGemm<Element, Residual::kBeforeRelu>::run(x, weight, bias_t, residual, out,
                                                              mask);
        break;
    }
  });
  return ran;
#else
  (void)x, (void)weight, (void)bias, (void)residual, (void)out, (void)mask, (void)where;
  return false;
#endif
}

}  // namespace fusedskip
