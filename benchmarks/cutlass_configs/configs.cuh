// One configuration of the `cutlass` backend's kernel (csrc/cuda/fused_gemm_sm90.cuh) for
// benchmarks/cutlass_configs.py: the fused relu_add layer in bfloat16, and the same mainloop with
// an epilogue that only converts the accumulators (the floor any epilogue starts from). Each
// configuration is its own .cu file so that they compile in parallel.
#pragma once

#include "configs.h"

#ifdef FUSEDSKIP_WITH_CUTLASS
#include "cuda/fused_gemm_sm90.cuh"
#endif

namespace fusedskip::configs {

inline std::string source_config_name(const char* shape, int stages_c, bool reuse_c) {
  return std::string("Cooperative ") + shape + ", source " + std::to_string(stages_c) +
         (reuse_c ? " shared" : " own");
}

#ifdef FUSEDSKIP_WITH_CUTLASS
template <typename Config>
struct Kernels {
  using Element = cutlass::bfloat16_t;
  using Fused = sm90::FusedGemm<Element, Residual::kAfterRelu, Config>;
  using Convert = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::Identity, Element, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
  using Plain = sm90::TreeGemm<Element, Config, Convert, void>;

  static sm90::TileOrder tile_order(Order order) {
    return {order.swizzle,
            static_cast<cutlass::gemm::kernel::detail::RasterOrderOptions>(order.raster)};
  }
  static bool fused(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& residual, const at::Tensor& out, const at::Tensor& mask,
                    Order order) {
    return Fused::run(x, weight, bias, residual, out, mask, tile_order(order));
  }
  static bool plain(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
                    Order order) {
    return Plain::run(x, weight, at::Tensor(), out, {}, tile_order(order));
  }
  static std::string mask_layout_error() { return sm90::mask_layout_error<Fused>("relu_add"); }
};

// SCHEDULE: Cooperative or Pingpong (csrc/cuda/fused_gemm_sm90.cuh).
#define FUSEDSKIP_CONFIG(NAME, SCHEDULE, M, N, CM, CN)                          \
  Entry NAME() {                                                               \
    using K = Kernels<sm90::SCHEDULE##Config<M, N, CM, CN>>;                   \
    return {#SCHEDULE " " #M "x" #N " cluster " #CM "x" #CN, &K::fused, &K::plain, \
            &K::mask_layout_error};                                            \
  }
// A cooperative configuration with its own source pipeline (KernelConfig's kStagesC,
// kReuseSmemC): STAGES_C subtiles of the residual in flight, in buffers the output's stores
// share (REUSE_C) or not. Its plain GEMM reads no residual, so it is the base configuration's
// (with that configuration's mainloop stages, where the fused kernel may have fewer): compare
// its fused time with the base configuration's fused time, not with its own plain one. Keep
// REUSE_C to at least 3 stages, as CUTLASS's own policy does (2 output stages + 1).
#define FUSEDSKIP_SOURCE_CONFIG(NAME, M, N, CM, CN, STAGES_C, REUSE_C)                        \
  Entry NAME() {                                                                              \
    using K = Kernels<sm90::CooperativeConfig<M, N, CM, CN, STAGES_C, REUSE_C>>;              \
    return {source_config_name(#M "x" #N " cluster " #CM "x" #CN, STAGES_C, REUSE_C), &K::fused, \
            &K::plain, &K::mask_layout_error};                                                \
  }
#else
#define FUSEDSKIP_CONFIG(NAME, SCHEDULE, M, N, CM, CN)                               \
  Entry NAME() {                                                                    \
    return {#SCHEDULE " " #M "x" #N " cluster " #CM "x" #CN, nullptr, nullptr, nullptr}; \
  }
#define FUSEDSKIP_SOURCE_CONFIG(NAME, M, N, CM, CN, STAGES_C, REUSE_C)                     \
  Entry NAME() {                                                                           \
    return {source_config_name(#M "x" #N " cluster " #CM "x" #CN, STAGES_C, REUSE_C), nullptr, \
            nullptr, nullptr};                                                             \
  }
#endif

}  // namespace fusedskip::configs
