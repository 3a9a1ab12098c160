// The `cutlass` backend's kernel: the templates behind csrc/cuda/fused_gemm_sm90.cu (its
// launcher; that file says what the kernel computes and where it applies). A header so that
// benchmarks/cutlass_configs/ can instantiate the same kernel at other tile and cluster shapes.
#pragma once

#ifdef FUSEDSKIP_WITH_CUTLASS
// CuTe's device-side asserts are calls to __assert_fail: a call inside the mainloop makes ptxas
// serialize the wgmma pipeline (warning C7510), so they are compiled out of the device passes.
// The host pass keeps its asserts (a TMA descriptor CUTLASS fails to encode then stops loudly
// instead of launching a kernel with a broken one).
#if defined(__CUDA_ARCH__) && !defined(NDEBUG)
#define NDEBUG
#endif
// The kernel schedules used here (TMA warp-specialized, cooperative and ping-pong) wait for the
// kernel before them on the stream (griddepcontrol.wait) in their producer warps before they
// load, and let the next one launch after their mainloop; with this, those instructions are
// compiled in, and launch_gemm launches the kernels with programmatic dependent launch
// (csrc/cuda/launch.cuh). The consumer warps do not wait themselves: their first global memory
// access (the bias, the outputs, ReluMaskStore's mask) comes after the first mainloop stage the
// producer loaded after its wait. So a visitor node here must touch global memory only in its
// visits and after, and a kernel needs at least one K tile: the launchers refuse K == 0 (which
// has nothing to multiply anyway), and that refusal is also what keeps this ordering. The
// grouped GEMMs' schedule (pointer array) has no such wait: grouped_gemm_sm90.cu launches them
// the plain way.
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
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
#include <cutlass/arch/grid_dependency_control.h>
// launch_gemm launches with programmatic dependent launch: a kernel compiled without the wait
// (CUTLASS headers included before this one, or a CUTLASS that spells it otherwise) would then
// read the output of the kernel before it while that still runs.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(CUTLASS_GDC_ENABLED)
#error "fusedskip: CUTLASS's grid dependency control is off; the kernels would not wait"
#endif
#pragma nv_diag_default 2908

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend.h"
#include "cuda/launch.cuh"
#include "epilogue.h"

namespace fusedskip {
// A named namespace, not an anonymous one: the sm_80 pass compiles these templates into empty
// kernels, and nvcc warns about internal-linkage members that nothing then calls.
namespace sm90 {
using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename T>
struct CutlassType;
template <>
struct CutlassType<at::Half> { using type = cutlass::half_t; };
template <>
struct CutlassType<at::BFloat16> { using type = cutlass::bfloat16_t; };

// The mask bits of one warp's share of an epilogue subtile, from its ballots. In the wgmma
// accumulator layout, as the epilogue hands it to a visitor (FragmentSize 16: one call per
// subtile, 128x32 for the cooperative schedule, 64x32 for ping-pong), warp w holds rows
// 16w..16w+15 of the subtile and lane l holds, for each of its
// 16 values k, the element at
//   row  l / 4 + 8 * bit1(k)
//   col  2 * (l % 4) + bit0(k) + 8 * (k / 4)
// so value k's ballot over the warp is 32 bits of 8 rows x 4 even-or-odd columns, lane l's bit
// at 4 * (l / 4) + l % 4. Lane t < 16 builds the 32-bit mask word (the subtile's 32 columns, bit
// n = column n) of the warp's row t % 8 + 8 * (t / 8): from each of the 8 ballots of its row half,
// the nibble of its row, its bits spread to every other column. fused_gemm_mask_layout_error()
// checks this layout on the host for every instantiated kernel (tests/test_build.py).
constexpr int kMaskValuesPerSubtile = 16;
constexpr int kMaskWordLanes = 16;

CUTLASS_HOST_DEVICE uint32_t mask_word_from_ballots(const uint32_t (&ballot)[kMaskValuesPerSubtile],
                                                    int lane) {
  const int half = lane / 8, quad_row = lane % 8;
  uint32_t word = 0;
  CUTLASS_PRAGMA_UNROLL
  for (int group = 0; group < 4; ++group) {  // 8-column groups: bits 2-3 of the value index
    CUTLASS_PRAGMA_UNROLL
    for (int odd = 0; odd < 2; ++odd) {  // even or odd column: bit 0
      // Both halves' ballots by constant index, then a select: a runtime index would put the
      // ballots in local memory.
      const uint32_t both[2] = {ballot[odd | group << 2], ballot[odd | 2 | group << 2]};
      uint32_t bits = ((half ? both[1] : both[0]) >> (4 * quad_row)) & 0xfu;
      bits = (bits | bits << 2) & 0x33u;  // bit c to bit 2c
      bits = (bits | bits << 1) & 0x55u;
      word |= bits << (8 * group + odd);
    }
  }
  return word;
}

// Where lane `lane` stores the word it built: its index among the mask's 32-bit words, or -1
// for none (lanes 16-31; words past the problem's edges). (row0, col0): the warp's corner, lane
// 0's first value; `rows` x `cols` the problem, `row_bits` the bits per mask row.
CUTLASS_HOST_DEVICE int64_t mask_word_index(int64_t row0, int64_t col0, int lane, int64_t rows,
                                            int64_t cols, int64_t row_bits) {
  const int64_t row = row0 + lane % 8 + 8 * (lane / 8);
  if (lane >= kMaskWordLanes || row >= rows || col0 >= cols) return -1;
  return (row * row_bits + col0) / 32;
}

// The words lane `lane` stores at the end of a tile, for one row of subtiles: `count` words from
// index `first` on, one per subtile of the row (a lane's row is the same in each: the warps split
// a subtile by rows, and subtiles are 32 columns wide), those inside the problem. (row0, col0):
// the warp's corner in the row's first subtile; `subtiles` how many the row has. count 0 where
// the lane stores none.
struct MaskRowStore {
  int64_t first;
  int count;
};
CUTLASS_HOST_DEVICE MaskRowStore mask_row_store(int64_t row0, int64_t col0, int lane, int64_t rows,
                                                int64_t cols, int64_t row_bits, int subtiles) {
  const int64_t first = mask_word_index(row0, col0, lane, rows, cols, row_bits);
  if (first < 0) return {-1, 0};
  const int64_t inside = (cols - col0) / 32;
  return {first, static_cast<int>(inside < subtiles ? inside : subtiles)};
}

// The stores end() makes for one row of a tile, `row` of its words: four side by side at once
// where all four lie inside the problem on a 16-byte boundary (the mask itself starts on one:
// ReluMaskStore::can_implement), else one at a time. store16(index, w0, w1, w2, w3) writes words
// index .. index + 3, store4(index, w) one word. The host check (mask_layout_error) runs it too.
template <int kWords, class Store16, class Store4>
CUTLASS_HOST_DEVICE void store_mask_row(const MaskRowStore& row, const uint32_t (&words)[kWords],
                                        Store16&& store16, Store4&& store4) {
  static_assert(kWords % 4 == 0, "a tile row of whole 16-byte groups of mask words");
  CUTLASS_PRAGMA_UNROLL
  for (int q = 0; q < kWords; q += 4) {
    if (q + 4 <= row.count && (row.first + q) % 4 == 0) {
      store16(row.first + q, words[q], words[q + 1], words[q + 2], words[q + 3]);
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int j = q; j < q + 4; ++j) {
        if (j < row.count) store4(row.first + j, words[j]);
      }
    }
  }
}

// An epilogue node that passes its input (the pre-activation) through and writes the mask:
// bit n of row m is at bit m * row_bits + n, set where relu_active holds. Per subtile, one
// ballot per value; each of a row's words is kept in a register until the tile's last subtile,
// and then the row's words (8 for the library's 128x256 tile, 32 bytes side by side) are stored
// together, 16 bytes at a time (store_mask_row): every word of the mask is written once, by the
// warp that holds its row and columns (out_features is a multiple of 128, so a word never
// straddles the problem's edge), with no atomics and nothing to zero first. Stored as each
// subtile's came, one 4-byte store per row and subtile, they took 16 rows' scattered words per
// store instruction. Words past the problem's edges (the last row tile's, and with tiles wider
// than 128 the last column tile's) are not stored.
//
// end() stores what the tile's visits built: it relies on the collective epilogue visiting every
// subtile of a tile, then calling end(), with callbacks made afresh per tile, as it does under
// the persistent tile schedulers used here. A stream-K scheduler that reduces in separate passes
// stores one subtile per call and would break that.
struct ReluMaskStore {
  struct SharedStorage {};
  struct Arguments {
    uint32_t* mask = nullptr;
    int64_t row_bits = 0;  // bits per mask row (8 x its bytes)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    // 16-byte aligned: end() stores four words at once (store_mask_row).
    return args.mask != nullptr && reinterpret_cast<uintptr_t>(args.mask) % 16 == 0 &&
           args.row_bits % 32 == 0 && args.row_bits == static_cast<int64_t>(get<1>(problem_shape));
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE ReluMaskStore() {}
  CUTLASS_HOST_DEVICE ReluMaskStore(Params const& params, SharedStorage const&)
      : params_ptr(&params) {}

  Params const* params_ptr = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::ProducerLoadArgs<Args...> const&) {
    return fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor, class ProblemShapeMNL>
  struct ConsumerStoreCallbacks : fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor&& coords, ProblemShapeMNL shape,
                                          Params const* params)
        : coords(cute::forward<CoordTensor>(coords)), shape(shape), params(params) {}

    CoordTensor coords;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) -> (m, n, l) of each register value
    ProblemShapeMNL shape;
    Params const* params;
    static constexpr int kEpiM = decltype(size<3>(std::declval<CoordTensor>()))::value;
    static constexpr int kEpiN = decltype(size<4>(std::declval<CoordTensor>()))::value;
    // This lane's word of each subtile (lanes 16-31 build theirs too, and store none); indexed
    // by the unrolled epilogue loops' constants, so registers.
    uint32_t words[kEpiM][kEpiN] = {};

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementInput, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& preact) {
      Tensor coords_mn = coords(_, _, _, epi_m, epi_n);
      static_assert(FragmentSize == kMaskValuesPerSubtile &&
                        decltype(size(coords_mn))::value == kMaskValuesPerSubtile,
                    "ReluMaskStore assumes one visit per subtile, 16 values per thread");
      uint32_t ballot[kMaskValuesPerSubtile];
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kMaskValuesPerSubtile; ++k) {
        ballot[k] = __ballot_sync(0xffffffffu, relu_active(preact[k]));
      }
      words[epi_m][epi_n] = mask_word_from_ballots(ballot, static_cast<int>(threadIdx.x % 32));
      return preact;
    }

    CUTLASS_DEVICE void end() {
      const int lane = static_cast<int>(threadIdx.x % 32);
      CUTLASS_PRAGMA_UNROLL
      for (int epi_m = 0; epi_m < kEpiM; ++epi_m) {
        // Lane 0's first value is the top-left corner of the warp's share of the subtile.
        const auto corner = coords(_, _, _, epi_m, 0)(0);
        const MaskRowStore row = mask_row_store(
            __shfl_sync(0xffffffffu, static_cast<int>(get<0>(corner)), 0),
            __shfl_sync(0xffffffffu, static_cast<int>(get<1>(corner)), 0), lane, get<0>(shape),
            get<1>(shape), params->row_bits, kEpiN);
        uint32_t* mask = params->mask;
        store_mask_row(
            row, words[epi_m],
            [mask](int64_t index, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
              *reinterpret_cast<uint4*>(mask + index) = make_uint4(w0, w1, w2, w3);
            },
            [mask](int64_t index, uint32_t word) { mask[index] = word; });
      }
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto shape = make_shape(M, N, L);
    Tensor coords = fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        make_identity_tensor(shape), args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile,
        args.tiled_copy, args.thread_idx);
    return ConsumerStoreCallbacks<decltype(coords), decltype(shape)>(cute::move(coords), shape,
                                                                    params_ptr);
  }
};

// A kernel configuration: tile and cluster shapes (K step 64), mainloop and epilogue schedules,
// on a persistent grid. Cooperative: two consumer warpgroups share each tile. Ping-pong: each
// takes whole tiles in turn, so that one's epilogue runs while the other's mainloop does. The
// library's is cooperative 128x256 with clusters of 2 along M: of the seven configurations
// run 4 timed (benchmarks/cutlass_configs/), the fastest fused relu_add on an H100 (bf16,
// 381.8 us at 8192x4096x4096 against 435.7 for 128x128; benchmarks/NOTES.md, "The epilogue
// inside the GEMM").
//
// kStagesC, kReuseSmemC: the source (residual) pipeline. 0 keeps CUTLASS's choice, which for
// these tiles is 4 epilogue subtiles of the source in flight, in shared memory that the output's
// stores then reuse. Otherwise kStagesC subtiles, reusing only if kReuseSmemC: a deeper or
// separate source pipeline may hide the residual's read, at the cost of shared memory the
// mainloop's stages would have had. benchmarks/cutlass_configs/ times both.
template <int kTileM, int kTileN, int kClusterM, int kClusterN, class Kernel, class Epilogue,
          int kStagesC_ = 0, bool kReuseSmemC_ = true>
struct KernelConfig {
  using TileShape = Shape<Int<kTileM>, Int<kTileN>, _64>;
  using ClusterShape = Shape<Int<kClusterM>, Int<kClusterN>, _1>;
  using KernelSchedule = Kernel;
  using EpilogueSchedule = Epilogue;
  static constexpr int kStagesC = kStagesC_;
  static constexpr bool kReuseSmemC = kReuseSmemC_;
};
template <int kTileM, int kTileN, int kClusterM, int kClusterN, int kStagesC = 0,
          bool kReuseSmemC = true>
using CooperativeConfig =
    KernelConfig<kTileM, kTileN, kClusterM, kClusterN,
                 cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                 cutlass::epilogue::TmaWarpSpecializedCooperative, kStagesC, kReuseSmemC>;
template <int kTileM, int kTileN, int kClusterM, int kClusterN>
using PingpongConfig = KernelConfig<kTileM, kTileN, kClusterM, kClusterN,
                                    cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                    cutlass::epilogue::TmaWarpSpecialized>;
using LibraryConfig = CooperativeConfig<kFusedGemmTileRows, kFusedGemmTileCols, 2, 1>;

// The order in which the persistent scheduler hands out output tiles: CUTLASS's defaults for
// the library; benchmarks/cutlass_configs.py varies it (it changes which operand tiles the
// concurrently running tiles share in L2, never the result).
struct TileOrder {
  int swizzle = 1;  // 1, 2, 4 or 8: bands of this many tiles walked together
  cutlass::gemm::kernel::detail::RasterOrderOptions raster =
      cutlass::gemm::kernel::detail::RasterOrderOptions::Heuristic;
};

// The collective epilogue of TreeGemm: CUTLASS's builder, or, where the configuration sets its
// own source pipeline and there is a source, the builder's implementation with that pipeline.
template <typename Element, typename Config, typename Tree, typename ElementC,
          bool kOwnSourcePipeline = (Config::kStagesC != 0 && !std::is_void_v<ElementC>)>
struct EpilogueOf {
  static constexpr int kAlign = 16 / sizeof(Element);
  using type = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float,
      float, ElementC, cutlass::layout::RowMajor, kAlign, Element, cutlass::layout::RowMajor,
      kAlign, typename Config::EpilogueSchedule, Tree>::CollectiveOp;
};
template <typename Element, typename Config, typename Tree, typename ElementC>
struct EpilogueOf<Element, Config, Tree, ElementC, true> {
  static constexpr int kAlign = 16 / sizeof(Element);
  using Schedule = typename Config::EpilogueSchedule;
  using Tile = decltype(cutlass::epilogue::collective::detail::sm90_compute_tile_shape_or_override<
                        Element, cutlass::epilogue::collective::EpilogueTileAuto, Schedule,
                        typename Config::TileShape>());
  static constexpr int kThreads =
      cutlass::epilogue::collective::detail::sm90_is_cooperative_v<Schedule> ? 256 : 128;
  // As CUTLASS's own policy for these tiles, but for the source's stages and reuse: 2 stages of
  // the output, fragments of one subtile over the consumer threads, no delayed store (CUTLASS
  // delays it only without a source).
  using Policy = cutlass::epilogue::Sm90TmaWarpSpecialized<
      Config::kStagesC, 2, decltype(size(Tile{}))::value / kThreads, Config::kReuseSmemC, false>;
  using type = typename cutlass::epilogue::collective::detail::Sm90TmaBuilderImpl<
      typename Config::TileShape, Tile, float, float, ElementC, cutlass::layout::RowMajor, kAlign,
      Element, cutlass::layout::RowMajor, kAlign, Tree, Policy>::CollectiveOp;
};

// The SMs CUTLASS's persistent tile scheduler spreads the tiles over: those of `on`'s device.
inline cutlass::KernelHardwareInfo hardware_info(const at::Tensor& on) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = on.get_device();
  hw.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return hw;
}

// Sets up the CUTLASS GEMM `args` describe and queues it on the current stream, with its
// workspace on `on`'s device. False, having launched nothing, where CUTLASS cannot take them;
// `what` names the kernel in the errors of a set-up or launch that fails after that.
template <typename Gemm>
bool launch_gemm(const typename Gemm::Arguments& args, const at::Tensor& on, const char* what) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  const at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                         on.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
              "fusedskip: the CUTLASS ", what, " could not be set up");
  // CUTLASS reads and clears the CUDA error of a failed launch itself, so the message cannot give
  // it; it says how the kernel was launched, and how to launch it the other way.
  const bool pdl = programmatic_launch_now();
  TORCH_CHECK(gemm.run(stream, /*cuda_adapter=*/nullptr, pdl) == cutlass::Status::kSuccess,
              "fusedskip: the CUTLASS ", what, " failed to launch",
              pdl ? " with programmatic dependent launch (FUSEDSKIP_PDL=0 launches it the plain "
                    "way)"
                  : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// A CUTLASS GEMM whose epilogue is the visitor tree `Tree`: out = Tree(x W^T, source), x
// (rows x depth) and W (cols x depth) row-major, `source` the tree's Sm90SrcFetch operand
// (ElementC; void where the tree reads none).
template <typename Element, typename Config, typename Tree, typename ElementC>
struct TreeGemm {
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  static constexpr int kAlign = 16 / sizeof(Element);

  using Epilogue = typename EpilogueOf<Element, Config, Tree, ElementC>::type;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor,
      kAlign, Element, cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // False where CUTLASS cannot take these operands (nothing launched).
  static bool run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& source,
                  const at::Tensor& out, const typename Tree::Arguments& tree_args,
                  const TileOrder& order = {}) {
    const int rows = static_cast<int>(x.size(0)), cols = static_cast<int>(weight.size(0));
    const int depth = static_cast<int>(x.size(1));
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<Element*>(t.data_ptr()) : nullptr;
    };
    typename Kernel::StrideA stride_x{x.stride(0), _1{}, 0};
    typename Kernel::StrideB stride_w{weight.stride(0), _1{}, 0};
    typename Kernel::StrideC stride_source{};
    if constexpr (!std::is_void_v<ElementC>) stride_source = {source.stride(0), _1{}, 0};
    typename Kernel::StrideD stride_out{out.stride(0), _1{}, 0};

    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {rows, cols, depth, 1},
                                  {ptr(x), stride_x, ptr(weight), stride_w},
                                  {tree_args, ptr(source), stride_source, ptr(out), stride_out},
                                  hardware_info(x)};
    args.scheduler.max_swizzle_size = order.swizzle;
    args.scheduler.raster_order = order.raster;
    return launch_gemm<Gemm>(args, x, "GEMM");
  }
};

// The fused linear layer: one kernel per (dtype, residual position, configuration).
template <typename Element, Residual kWhere, typename Config = LibraryConfig>
struct FusedGemm {
  using ElementOut = Element;
  using TileShape = typename Config::TileShape;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlign = 16 / sizeof(Element);

  // Leaves and nodes of the visitor tree.
  using Acc = fusion::Sm90AccFetch;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>,
                                        kAlign>;
  using Residual_ = fusion::Sm90SrcFetch<Element>;
  template <class... Children>
  using Add = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
                              Children...>;
  template <class Preact, class Out>
  using ReluWithMask = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::epilogue::thread::Clamp, Out, float, kRound>,
      fusion::Sm90EVT<ReluMaskStore, Preact>>;

  using Preact = std::conditional_t<kWhere == Residual::kBeforeRelu,
                                    Add<Add<Acc, Bias>, Residual_>, Add<Acc, Bias>>;
  using Tree = std::conditional_t<
      kWhere == Residual::kAfterRelu,
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Element, float, kRound>,
                      ReluWithMask<Preact, float>, Residual_>,
      ReluWithMask<Preact, Element>>;
  using Types = TreeGemm<Element, Config, Tree,
                         std::conditional_t<kWhere == Residual::kNone, void, Element>>;
  using Epilogue = typename Types::Epilogue;
  using Mainloop = typename Types::Mainloop;

  // Arguments of the tree, nested as the tree is: {children..., node's own}.
  static typename Tree::Arguments tree_arguments(const Element* bias, uint32_t* mask,
                                                 int64_t mask_row_bits) {
    const typename Bias::Arguments bias_args{bias, Element(0), {}};
    const typename cutlass::epilogue::thread::Clamp<float>::Arguments relu{
        0.0f, std::numeric_limits<float>::infinity()};
    const ReluMaskStore::Arguments mask_args{mask, mask_row_bits};
    if constexpr (kWhere == Residual::kBeforeRelu) {
      return {{{{{}, bias_args, {}}, {}, {}}, mask_args}, relu};
    } else if constexpr (kWhere == Residual::kAfterRelu) {
      return {{{{{}, bias_args, {}}, mask_args}, relu}, {}, {}};
    } else {
      return {{{{}, bias_args, {}}, mask_args}, relu};
    }
  }

  static bool run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& residual, const at::Tensor& out, const at::Tensor& mask,
                  const TileOrder& order = {}) {
    const Element* bias_ptr =
        bias.defined() ? reinterpret_cast<const Element*>(bias.data_ptr()) : nullptr;
    return Types::run(x, weight, residual, out,
                      tree_arguments(bias_ptr, reinterpret_cast<uint32_t*>(mask.data_ptr()),
                                     mask.stride(0) * 8),
                      order);
  }
};

// ReluMaskStore's layout assumption, checked on the host against the partition the kernel itself
// makes (the epilogue's register-to-shared copy, built as CUTLASS's collective builds it). A
// problem whose last row tile is partial (and last column tile too, for tiles wider than 128),
// plus one tile past each edge, as a cluster's rounding can launch; a pseudo-random mask
// pattern; each warp's ballots emulated from its lanes' coordinates. Every word built as the
// kernel builds it must hold the pattern's bits of the row and columns it is stored to, and every
// word of the mask must be stored exactly once. Lane = thread index % 32 in the kernel too: the
// consumer threads start at a warp boundary.
template <typename Gemm>
std::string mask_layout_error(const char* name) {
  using Epilogue = typename Gemm::Epilogue;
  using TiledMma = typename Gemm::Mainloop::TiledMma;
  using TileShape = typename Gemm::TileShape;
  const auto tiled_copy =
      make_tiled_copy_S(Copy_Atom<typename Epilogue::CopyOpR2S, typename Gemm::ElementOut>{},
                        make_tiled_copy_C_atom(typename Epilogue::CopyAtomC{}, TiledMma{}));
  constexpr int kThreads = decltype(size(TiledMma{}))::value;
  constexpr int kTileM = decltype(size<0>(TileShape{}))::value;
  constexpr int kTileN = decltype(size<1>(TileShape{}))::value;
  // Rows end inside the second row tile; columns inside the second column tile where tiles are
  // wider than 128 (out_features is only a multiple of 128).
  const int rows = kTileM + kTileM / 2 + 8, cols = kTileN + 128;
  const auto pattern = [](int64_t row, int64_t col) -> uint32_t {
    return ((row * 7919 + col * 104729 + (row * col) / 7) % 5) < 2;
  };
  const auto fail = [&](const std::string& what) { return std::string(name) + ": " + what; };
  std::vector<int> stores(static_cast<size_t>(rows) * cols / 32, 0);
  const auto shape = make_shape(rows, cols, 1);
  const auto coords_of = [&](int tile_m, int tile_n, int thread) {
    return fusion::sm90_partition_for_epilogue<true>(
        make_identity_tensor(shape), TileShape{}, make_coord(tile_m, tile_n, 0, 0),
        typename Epilogue::EpilogueTile{}, tiled_copy, thread);
  };
  using Coords = decltype(coords_of(0, 0, 0));
  for (int tile_m = 0; tile_m * kTileM < rows + kTileM; ++tile_m) {
    for (int tile_n = 0; tile_n * kTileN < cols + kTileN; ++tile_n) {
      for (int warp = 0; warp < kThreads / 32; ++warp) {
        std::vector<Coords> lanes;
        for (int lane = 0; lane < 32; ++lane) lanes.push_back(coords_of(tile_m, tile_n, 32 * warp + lane));
        const int epi_rows = size<3>(lanes[0]), epi_cols = size<4>(lanes[0]);
        for (int epi_m = 0; epi_m < epi_rows; ++epi_m) {
          // Each lane's word of each subtile of the row, from the ballots, as visit builds them.
          std::vector<std::vector<uint32_t>> words(32, std::vector<uint32_t>(epi_cols));
          for (int epi_n = 0; epi_n < epi_cols; ++epi_n) {
            if (size(lanes[0](_, _, _, epi_m, epi_n)) != kMaskValuesPerSubtile) {
              return fail("a subtile holds " + std::to_string(size(lanes[0](_, _, _, epi_m, epi_n))) +
                          " values per thread");
            }
            uint32_t ballot[kMaskValuesPerSubtile] = {};
            for (int lane = 0; lane < 32; ++lane) {
              for (int k = 0; k < kMaskValuesPerSubtile; ++k) {
                const auto c = lanes[lane](_, _, _, epi_m, epi_n)(k);
                ballot[k] |= pattern(get<0>(c), get<1>(c)) << lane;
              }
            }
            for (int lane = 0; lane < 32; ++lane) words[lane][epi_n] = mask_word_from_ballots(ballot, lane);
          }
          // What end() stores: each lane's row of words at once, from the first subtile's corner.
          const auto corner = lanes[0](_, _, _, epi_m, 0)(0);
          for (int lane = 0; lane < 32; ++lane) {
            const MaskRowStore store =
                mask_row_store(get<0>(corner), get<1>(corner), lane, rows, cols, cols, epi_cols);
            for (int j = 0; j < epi_cols; ++j) {
              // The row's words lie side by side, one per subtile: the word subtile j's own
              // corner places there, or none past the problem's edge.
              const auto own = lanes[0](_, _, _, epi_m, j)(0);
              const int64_t placed =
                  mask_word_index(get<0>(own), get<1>(own), lane, rows, cols, cols);
              if (placed != (j < store.count ? store.first + j : -1)) {
                return fail("lane " + std::to_string(lane) + "'s word of subtile (" +
                            std::to_string(epi_m) + ", " + std::to_string(j) +
                            ") is not where its row's words are stored");
              }
            }
            // The stores end() makes, as (word index, value); a 16-byte one must be aligned.
            std::vector<std::pair<int64_t, uint32_t>> made;
            bool misaligned = false;
            const auto store16 = [&](int64_t index, uint32_t w0, uint32_t w1, uint32_t w2,
                                     uint32_t w3) {
              misaligned = misaligned || index % 4 != 0;
              for (const uint32_t w : {w0, w1, w2, w3}) made.emplace_back(index++, w);
            };
            const auto store4 = [&](int64_t index, uint32_t w) { made.emplace_back(index, w); };
            // The kernels' rows have 4 or 8 subtiles (128- and 256-wide tiles of 32-wide ones).
            uint32_t four[4], eight[8];
            if (epi_cols == 4) {
              std::copy(words[lane].begin(), words[lane].end(), four);
              store_mask_row(store, four, store16, store4);
            } else if (epi_cols == 8) {
              std::copy(words[lane].begin(), words[lane].end(), eight);
              store_mask_row(store, eight, store16, store4);
            } else {
              return fail(std::to_string(epi_cols) + " subtiles in a row: not checked");
            }
            if (misaligned) return fail("a 16-byte mask store off a 16-byte boundary");
            if (static_cast<int>(made.size()) != store.count) {
              return fail("lane " + std::to_string(lane) + " stores " +
                          std::to_string(made.size()) + " words of its row's " +
                          std::to_string(store.count));
            }
            for (const auto& [word, value] : made) {
              if (word < 0 || word >= static_cast<int64_t>(stores.size())) {
                return fail("lane " + std::to_string(lane) + " would store past the mask");
              }
              const int64_t row = word * 32 / cols, col = word * 32 % cols;
              uint32_t expected = 0;
              for (int n = 0; n < 32; ++n) expected |= pattern(row, col + n) << n;
              if (value != expected) {
                return fail("the word of row " + std::to_string(row) + ", columns " +
                            std::to_string(col) + "+ holds other bits than its elements'");
              }
              ++stores[word];
            }
          }
        }
      }
    }
  }
  for (size_t word = 0; word < stores.size(); ++word) {
    if (stores[word] != 1) {
      return fail("mask word " + std::to_string(word) + " is stored " +
                  std::to_string(stores[word]) + " times");
    }
  }
  return {};
}
}  // namespace sm90
}  // namespace fusedskip
#endif  // FUSEDSKIP_WITH_CUTLASS
