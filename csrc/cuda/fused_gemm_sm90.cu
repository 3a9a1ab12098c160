// The `cutlass` backend: x W^T with the bias, the ReLU, its 1-bit mask and the residual computed
// inside one CUTLASS 3 GEMM (TMA, warp-specialized, wgmma) on sm_90a, so a large layer costs the
// GEMM alone: no second pass over the output (benchmarks/NOTES.md, "CUDA element-wise pass":
// that pass alone cost 17-19% of the GEMM at 8192x4096x4096).
//
// The epilogue is a visitor tree evaluated on the accumulators in registers:
//   relu_add   out = relu(acc + bias) + residual      mask = relu_active(acc + bias)
//   add_relu   out = relu(acc + bias + residual)      mask = relu_active(acc + bias + residual)
//   relu       out = relu(acc + bias)                 mask = relu_active(acc + bias)
// in float32, rounded once to the output dtype. The ReLU is CUTLASS's NaN-propagating clamp to
// [0, inf] (its own ReLU maps NaN to 0), and the mask bit is csrc/epilogue.h's relu_active, the
// test torch's backward makes, computed by ReluMaskStore below.
//
// Why a mask node of our own: CUTLASS's 1-bit aux store sets the bit where relu(z) == z (so at
// z == 0 too, where torch passes no gradient) and, because each thread holds only 2 adjacent
// columns of the accumulator tile, writes the bits one lane at a time with a byte
// read-modify-write each. ReluMaskStore instead gathers a warp's bits with one ballot per
// register value and stores each 32-bit word of the op's mask layout (8 columns per byte,
// row-major, least significant bit first) once, with a plain store.
//
// Where it applies (fused_gemm_forward_cuda says false otherwise, and the caller takes the
// cuBLAS + element-wise path): an sm_90 GPU, float16 / bfloat16, ReLU, out_features a multiple of
// 128 (mask rows of whole 32-bit words, tiles of whole words), in_features a multiple of 8,
// every operand on 16-byte boundaries with unit column stride and rows that do not overlap (what
// TMA needs).
#include "cuda/fused_gemm_sm90.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <string>

#include "backend.h"
#include "dispatch.h"
#include "fused_linear.h"

namespace fusedskip {

std::string fused_gemm_mask_layout_error() {
#ifdef FUSEDSKIP_WITH_CUTLASS
  using Bf16 = cutlass::bfloat16_t;
  using Half = cutlass::half_t;
  for (const std::string& error :
       {sm90::mask_layout_error<sm90::FusedGemm<Bf16, Residual::kNone>>("bfloat16, relu"),
        sm90::mask_layout_error<sm90::FusedGemm<Bf16, Residual::kAfterRelu>>("bfloat16, relu_add"),
        sm90::mask_layout_error<sm90::FusedGemm<Bf16, Residual::kBeforeRelu>>("bfloat16, add_relu"),
        sm90::mask_layout_error<sm90::FusedGemm<Half, Residual::kNone>>("float16, relu"),
        sm90::mask_layout_error<sm90::FusedGemm<Half, Residual::kAfterRelu>>("float16, relu_add"),
        sm90::mask_layout_error<sm90::FusedGemm<Half, Residual::kBeforeRelu>>("float16, add_relu")}) {
    if (!error.empty()) return error;
  }
  return {};
#else
  return "the CUTLASS GEMM is not in this build";
#endif
}

bool fused_gemm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                             const at::Tensor& out, const at::Tensor& mask, Residual where) {
#ifdef FUSEDSKIP_WITH_CUTLASS
  const at::ScalarType dtype = weight.scalar_type();
  if (!mask.defined() || (dtype != at::kHalf && dtype != at::kBFloat16)) return false;
  const int64_t rows = x.size(0), cols = weight.size(0), depth = x.size(1);
  const int64_t int_max = std::numeric_limits<int>::max();
  // CUTLASS's tile coordinates are ints: keep the last tile's rows from wrapping (256: the
  // library's 128-row tiles in clusters of 2 along M). depth == 0 would also leave the consumer
  // warps' stores unordered after the kernel before (fused_gemm_sm90.cuh, on the wait).
  if (rows == 0 || rows > int_max - 256 || cols % 128 != 0 || cols > int_max - 256 ||
      depth == 0 || depth % 8 != 0 || depth > int_max) {
    return false;
  }
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  if (device->major != 9 || device->minor != 0) return false;  // sm_90a code runs on sm_90 only
  const at::Tensor bias_t = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  if (!tma_operand(x) || !tma_operand(weight) || !tma_operand(out) || !mask.is_contiguous() ||
      !on_16_byte_words(mask) || (bias_t.defined() && !tma_operand(bias_t)) ||
      (residual.defined() && !tma_operand(residual))) {
    return false;
  }
  bool ran = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "fused_gemm_sm90", [&] {
    using Element = typename sm90::CutlassType<scalar_t>::type;
    FS_RESIDUAL_SWITCH(where, kWhere, [&] {
      ran = sm90::FusedGemm<Element, kWhere>::run(x, weight, bias_t, residual, out, mask);
    });
  });
  if (ran) count_fused_gemm_launch();
  return ran;
#else
  (void)x, (void)weight, (void)bias, (void)residual, (void)out, (void)mask, (void)where;
  return false;
#endif
}

}  // namespace fusedskip
