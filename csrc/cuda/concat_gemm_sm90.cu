// The `cutlass` backend's forward for the concat form: cat(inputs) W^T + bias, with or without the
// ReLU and its mask, as one CUTLASS 3 GEMM on sm_90a whose K loop runs over the inputs one after
// another, so the concatenation is never built. The library path copies the inputs into one cat
// first (concat_for_gemm, csrc/fused_linear.cpp): one more read and write of every input, ~45 us
// of copy at the benchmark's concat2 8192x4096x4096 on an H100 by bandwidth (64 MiB each way at
// ~3 TB/s; not a measurement).
//
// How: the mainloop is CUTLASS's TMA warp-specialized one (csrc/cuda/fused_gemm_sm90.cuh's
// library configuration) with one pair of TMA descriptors per input: input i's rows, and the
// column block i of weight, each of width_i. The GEMM's K is the inputs' K tiles end to end (each
// input rounded up to whole 64-wide tiles); the producer warp loads K tile t of the GEMM as tile
// t - begin_i of input i through input i's descriptors. A last partial tile of an input reads
// zeros past its width from both (TMA's out-of-bounds fill), so it adds exactly nothing, and the
// next input starts on a fresh tile. The consumer warps and the epilogue are unchanged: they see
// one GEMM.
//
// Where it applies (concat_gemm_forward_cuda says false otherwise, having launched nothing, and
// the caller takes the cat): an sm_90 GPU, float16 / bfloat16, 2 to 4 inputs of widths
// multiples of 8, out_features a multiple of 128 with the ReLU (whole mask words per tile) or of 8
// without, every operand on 16-byte boundaries with unit column stride and rows that do not
// overlap (what TMA needs).
#include "cuda/fused_gemm_sm90.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "backend.h"
#include "fused_linear.h"

namespace fusedskip {

#ifdef FUSEDSKIP_WITH_CUTLASS
namespace sm90 {

constexpr int kTileK = 64;  // the K step of every configuration (KernelConfig)
// Inputs the kernel takes: each adds a pair of TMA descriptors to its parameters, which at 4 stay
// within the 4 KB every CUDA version allows a kernel's parameters. More inputs take the cat.
constexpr int kMaxConcatInputs = 4;

// CUTLASS's mainloop `Base` (x row-major, weight row-major as B = weight^T), loading from one
// TMA descriptor pair per input. Only what the producer does differs; the kernel reaches these
// members by name, so those defined here replace the base's.
template <class Base>
struct ConcatMainloop : Base {
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::DispatchPolicy;
  using ElementA = typename Base::ElementA;
  using ElementB = typename Base::ElementB;
  using ClusterShape = typename DispatchPolicy::ClusterShape;
  // Input boundaries fall on whole K tiles of kTileK; a configuration with another K step would
  // put them mid-tile, with nothing else to notice.
  static_assert(decltype(size<2>(TileShape{}))::value == kTileK,
                "the concat mainloop's K tiles must be kTileK wide");

  struct Arguments {
    const ElementA* inputs[kMaxConcatInputs] = {};
    int64_t input_row_stride[kMaxConcatInputs] = {};
    int widths[kMaxConcatInputs] = {};
    int count = 0;
    const ElementB* weight = nullptr;  // (cols, sum of widths), row-major
    int64_t weight_row_stride = 0;
  };

  using TMA_A = typename Base::Params::TMA_A;
  using TMA_B = typename Base::Params::TMA_B;
  struct Params {
    TMA_A tma_load_a[kMaxConcatInputs];
    TMA_B tma_load_b[kMaxConcatInputs];
    // Input i's K tiles are [k_tiles_end[i - 1], k_tiles_end[i]).
    int k_tiles_end[kMaxConcatInputs];
    int count;
    uint32_t tma_transaction_bytes = Base::TmaTransactionBytes;
  };

  // The GEMM's K: every input's width rounded up to whole K tiles, end to end.
  static int padded_depth(const Arguments& args) {
    int depth = 0;
    for (int i = 0; i < args.count; ++i) depth += (args.widths[i] + kTileK - 1) / kTileK * kTileK;
    return depth;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void*) {
    const auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)K;
    Params params{};
    params.count = args.count;
    int64_t offset = 0;
    int k_tiles = 0;
    for (int i = 0; i < args.count; ++i) {
      const int width = args.widths[i];
      StrideA stride_a{};
      get<0>(stride_a) = args.input_row_stride[i];
      StrideB stride_b{};
      get<0>(stride_b) = args.weight_row_stride;
      const auto a = make_tensor(reinterpret_cast<const InternalElementA*>(args.inputs[i]),
                                 make_layout(make_shape(M, width, L), stride_a));
      const auto b = make_tensor(reinterpret_cast<const InternalElementB*>(args.weight + offset),
                                 make_layout(make_shape(N, width, L), stride_b));
      params.tma_load_a[i] = make_tma_copy_A_sm90(
          GmemTiledCopyA{}, a, SmemLayoutA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
      params.tma_load_b[i] = make_tma_copy_B_sm90(
          GmemTiledCopyB{}, b, SmemLayoutB{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
      k_tiles += (width + kTileK - 1) / kTileK;
      params.k_tiles_end[i] = k_tiles;
      offset += width;
    }
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    const auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)M, (void)N, (void)L;
    // TMA reads from 16-byte aligned addresses only; each input's weight block starts 8 elements
    // apart (widths are multiples of 8), so the weight's own address suffices.
    const auto aligned = [](const void* ptr) {
      return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
    };
    if (args.count < 1 || args.count > kMaxConcatInputs || !aligned(args.weight) ||
        args.weight_row_stride % 8 != 0 || K != padded_depth(args)) {
      return false;
    }
    for (int i = 0; i < args.count; ++i) {
      if (!aligned(args.inputs[i]) || args.widths[i] <= 0 || args.widths[i] % 8 != 0 ||
          args.input_row_stride[i] % 8 != 0) {
        return false;
      }
    }
    return true;
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    for (int i = 0; i < params.count; ++i) {
      cute::prefetch_tma_descriptor(params.tma_load_a[i].get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_load_b[i].get_tma_descriptor());
    }
  }

  // Coordinate tensors over the whole padded K: the coordinates of a tile of any input are those
  // of the same tile index here, read through that input's descriptor.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    using X = Underscore;
    const auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mA_mkl = params.tma_load_a[0].get_tma_tensor(make_shape(M, K, L));
    Tensor mB_nkl = params.tma_load_b[0].get_tma_tensor(make_shape(N, K, L));
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(gA_mkl, gB_nkl);
  }

  // The producer: as CUTLASS's, but GEMM K tile t comes from input i's descriptors at i's own
  // tile t - begin_i.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int, uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint2 block_in_cluster = {block_rank_in_cluster % cluster_x,
                                    block_rank_in_cluster / cluster_x};
    // Every descriptor of one operand has the same type, hence the same partition.
    auto block_tma_a = params.tma_load_a[0].get_slice(block_in_cluster.y);
    auto block_tma_b = params.tma_load_b[0].get_slice(block_in_cluster.x);
    const auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tBsB = block_tma_b.partition_D(sB);

    // The cluster's blocks that share this block's A tile (same cluster row) and B tile (same
    // column) receive its multicast loads.
    uint16_t mcast_mask_a = 0, mcast_mask_b = 0;
    const auto block_layout = Layout<ClusterShape>{};  // (m, n) -> block id
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= uint16_t(1) << block_layout(block_in_cluster.x, n, Int<0>{});
      }
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= uint16_t(1) << block_layout(m, block_in_cluster.y, Int<0>{});
      }
    }

    int input = 0;
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter) {
      const int tile = static_cast<int>(*k_tile_iter);
      while (input + 1 < params.count && tile >= params.k_tiles_end[input]) ++input;
      const int local = tile - (input == 0 ? 0 : params.k_tiles_end[input - 1]);
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a[input].with(*barrier, mcast_mask_a), tAgA(_, _, _, local),
           tAsA(_, _, _, stage));
      copy(params.tma_load_b[input].with(*barrier, mcast_mask_b), tBgB(_, _, _, local),
           tBsB(_, _, _, stage));
      ++smem_pipe_write;
    }
  }

  // The consumers: CUTLASS's, which read nothing of the parameters (so a default-constructed
  // set of the base's does; the kernels use no stack for it: benchmarks/results/x86-64-2026-11-27/
  // concat-gemm-resources.md).
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          TensorStorage& shared_tensors, Params const&) {
    Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors,
              typename Base::Params{});
  }
};

// The kernel for one epilogue tree: FusedGemm's relu form (bias, ReLU, mask), or the bias alone.
template <typename Element, typename Tree>
struct ConcatGemm {
  using Types = TreeGemm<Element, LibraryConfig, Tree, void>;
  using Mainloop = ConcatMainloop<typename Types::Mainloop>;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                           typename Types::Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static bool run(const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                  const at::Tensor& out, const typename Tree::Arguments& tree_args) {
    typename Mainloop::Arguments mainloop{};
    mainloop.count = static_cast<int>(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      mainloop.inputs[i] = reinterpret_cast<const Element*>(inputs[i].data_ptr());
      mainloop.input_row_stride[i] = inputs[i].stride(0);
      mainloop.widths[i] = static_cast<int>(inputs[i].size(1));
    }
    mainloop.weight = reinterpret_cast<const Element*>(weight.data_ptr());
    mainloop.weight_row_stride = weight.stride(0);
    typename Kernel::StrideD stride_out{out.stride(0), _1{}, 0};

    const int rows = static_cast<int>(out.size(0)), cols = static_cast<int>(out.size(1));
    const typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {rows, cols, Mainloop::padded_depth(mainloop), 1},
        mainloop,
        {tree_args, nullptr, {}, reinterpret_cast<Element*>(out.data_ptr()), stride_out},
        hardware_info(weight)};
    return launch_gemm<Gemm>(args, weight, "concat GEMM");
  }
};

template <typename Element>
bool concat_forward(const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& out, const at::Tensor& mask) {
  using Relu = FusedGemm<Element, Residual::kNone>;
  // The host checks the mask's layout (fused_gemm_mask_layout_error) on FusedGemm's epilogue:
  // this kernel's must stay that very type.
  static_assert(std::is_same_v<typename ConcatGemm<Element, typename Relu::Tree>::Types::Epilogue,
                               typename Relu::Epilogue>);
  const Element* bias_ptr =
      bias.defined() ? reinterpret_cast<const Element*>(bias.data_ptr()) : nullptr;
  if (mask.defined()) {
    return ConcatGemm<Element, typename Relu::Tree>::run(
        inputs, weight, out,
        Relu::tree_arguments(bias_ptr, reinterpret_cast<uint32_t*>(mask.data_ptr()),
                             mask.stride(0) * 8));
  }
  // Without the ReLU: acc + bias, rounded once (a null bias reads as zeros).
  using Bias = typename Relu::Bias;
  using Add = fusion::Sm90Compute<cutlass::plus, Element, float,
                                  cutlass::FloatRoundStyle::round_to_nearest>;
  using Tree = fusion::Sm90EVT<Add, fusion::Sm90AccFetch, Bias>;
  const typename Bias::Arguments bias_args{bias_ptr, Element(0), {}};
  return ConcatGemm<Element, Tree>::run(inputs, weight, out, {{}, bias_args, {}});
}

}  // namespace sm90
#endif  // FUSEDSKIP_WITH_CUTLASS

bool concat_gemm_forward_cuda(const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& out,
                              const at::Tensor& mask) {
#ifdef FUSEDSKIP_WITH_CUTLASS
  const at::ScalarType dtype = weight.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (inputs.size() < 2 || inputs.size() > static_cast<size_t>(sm90::kMaxConcatInputs)) {
    return false;
  }
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t int_max = std::numeric_limits<int>::max();
  // Mask rows of whole 32-bit words per 128-column tile half with the ReLU (as the single-input
  // kernel); 16-byte rows for the output's TMA store without. Tile coordinates are ints (256:
  // 128-row tiles in clusters of 2).
  if (rows == 0 || rows > int_max - 256 || cols == 0 || cols % (mask.defined() ? 128 : 8) != 0 ||
      cols > int_max - 256) {
    return false;
  }
  int64_t padded_depth = 0;
  for (const at::Tensor& x : inputs) {
    const int64_t width = x.size(1);
    // A zero width: no K tile of its own; with all zero, none at all, which also leaves the
    // consumer warps' stores unordered after the kernel before (fused_gemm_sm90.cuh, on the wait).
    if (width == 0 || width % 8 != 0 || !tma_operand(x)) return false;
    padded_depth += (width + sm90::kTileK - 1) / sm90::kTileK * sm90::kTileK;
  }
  if (padded_depth > int_max) return false;
  const at::Tensor bias_t = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  if (!tma_operand(weight) || !tma_operand(out) || (bias_t.defined() && !tma_operand(bias_t)) ||
      (mask.defined() && (!mask.is_contiguous() || !on_16_byte_words(mask)))) {
    return false;
  }
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  if (device->major != 9 || device->minor != 0) return false;  // sm_90a code runs on sm_90 only
  bool ran = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "concat_gemm_sm90", [&] {
    using Element = typename sm90::CutlassType<scalar_t>::type;
    ran = sm90::concat_forward<Element>(inputs, weight, bias_t, out, mask);
  });
  if (ran) count_concat_gemm_launch();
  return ran;
#else
  (void)inputs, (void)weight, (void)bias, (void)out, (void)mask;
  return false;
#endif
}

}  // namespace fusedskip
