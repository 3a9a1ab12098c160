// The `cutlass` backend's backward for the concat form: every input's gradient in one launch and
// every column block of the weight gradient in another, each a CUTLASS 3 grouped GEMM on sm_90a
// (TMA, warp-specialized cooperative wgmma, one persistent grid walking the output tiles of all
// the blocks in turn):
//
//   input gradients    grad_inputs[i]          = grad_preact    @ weight[:, block i]
//   weight gradient    grad_weight[:, block i] = grad_preact^T  @ inputs[i]
//
// each written in place into its column block of the inputs' gradient or of the weight's: no
// cat, no copies, as with one cuBLAS GEMM per block (csrc/fused_linear.cpp). What grouping
// changes is the last wave. Per block, every
// GEMM ends in its own partly filled wave of tiles; grouped, only the launch's last wave is partly
// filled. For the benchmark's concat2 8192 x (1360 + 2736) -> 4096 in 256x128 tiles, the input
// gradients are 32 x (11 + 22) = 1056 tiles, exactly 8 rounds of 132 SMs, where the two blocks
// alone would take 3 + 6; the weight gradient's 16 x 33 = 528 tiles are 4 rounds, not 2 + 3.
// (Tile counts; cuBLAS's own tiles per block are its choice. Not yet timed on a GPU.)
//
// Where it applies (grouped_backward_gemms_cuda says false otherwise, having launched nothing,
// and the caller takes the cuBLAS GEMMs): an sm_90 GPU, float16 / bfloat16, at most
// kMaxInputs blocks, out_features and every width a multiple of 8, rows and out_features below
// 2^31, every operand on 16-byte boundaries with unit column stride and rows that do not overlap
// (what TMA needs).
#include "cuda/fused_gemm_sm90.cuh"

#ifdef FUSEDSKIP_WITH_CUTLASS
#include <cutlass/gemm/group_array_problem_shape.hpp>
#endif

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

// 256x128 tiles: at the widths where grouping pays, the blocks' column tiles then add up with
// little waste (a 256-wide tile would leave most of a last column tile per block empty), and in
// the input gradients the rows, the long side, take the wide side (in the weight gradient the
// rows are the K loop, and out_features take it). Its mainloop alone was within 5% of
// cuBLAS on an H100 (its GEMM alone at 8192x4096x4096: 1.050x torch.mm;
// benchmarks/results/h100-2026-11-27/4-ballot-store/cutlass-configs-2026-11-27.md).
using GroupedConfig = CooperativeConfig<256, 128, 2, 1>;

// D_g = A_g B_g for each group g: A_g (M x K) and B_g (K x N) in the layouts given, D_g (M x N)
// row-major; float32 accumulation, rounded once. Each group has its own sizes, pointers and
// leading dimensions, which the kernel reads from device memory (Table).
template <typename Element, class LayoutA, class LayoutB, typename Config = GroupedConfig>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K)
  using Problem = typename ProblemShape::UnderlyingProblemShape;
  static constexpr int kAlign = 16 / sizeof(Element);

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor*, kAlign, Element, cutlass::layout::RowMajor*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      fusion::LinearCombination<Element, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, float, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // What the kernel reads per group, built on the host and copied to the device by a kernel
  // that takes it as its argument (capturable in a CUDA graph, unlike a copy from host memory).
  struct Table {
    Problem problems[kMaxInputs];
    const Element* a[kMaxInputs];
    const Element* b[kMaxInputs];
    Element* d[kMaxInputs];
    StrideA stride_a[kMaxInputs];
    StrideB stride_b[kMaxInputs];
    StrideD stride_d[kMaxInputs];
  };

  // A stride of these layouts with its one run-time entry (the leading dimension) set.
  template <class Stride>
  static Stride leading(int64_t ld) {
    Stride stride{};
    if constexpr (cute::is_static<cute::remove_cvref_t<decltype(get<0>(stride))>>::value) {
      get<1>(stride) = ld;
    } else {
      get<0>(stride) = ld;
    }
    return stride;
  }

  // The groups as the host sees them; `table` gets them, `problems` keeps the sizes on the host
  // (the scheduler sizes the grid from them).
  struct Groups {
    Table table{};
    std::vector<Problem> problems;

    void add(int64_t m, int64_t n, int64_t k, const at::Tensor& a, int64_t lda,
             const at::Tensor& b, int64_t ldb, const at::Tensor& d, int64_t ldd,
             int64_t b_offset = 0, int64_t d_offset = 0) {
      const size_t g = problems.size();
      problems.push_back(Problem{static_cast<int>(m), static_cast<int>(n), static_cast<int>(k)});
      table.problems[g] = problems.back();
      table.a[g] = reinterpret_cast<const Element*>(a.data_ptr());
      table.b[g] = reinterpret_cast<const Element*>(b.data_ptr()) + b_offset;
      table.d[g] = reinterpret_cast<Element*>(d.data_ptr()) + d_offset;
      table.stride_a[g] = leading<StrideA>(lda);
      table.stride_b[g] = leading<StrideB>(ldb);
      table.stride_d[g] = leading<StrideD>(ldd);
    }
  };

  // Arguments reading the table copied to `device_table` (null while only checking). Its
  // members' device addresses are their offsets in the host copy from that base: the host never
  // reads device memory.
  static typename Gemm::Arguments arguments(const Groups& groups, uint8_t* device_table,
                                            const at::Tensor& on) {
    const Table& host = groups.table;
    const auto on_device = [&](const auto& member) {
      using Element_ = std::remove_const_t<std::remove_extent_t<
          std::remove_reference_t<decltype(member)>>>;
      const auto offset = reinterpret_cast<const uint8_t*>(&member) -
                          reinterpret_cast<const uint8_t*>(&host);
      return device_table ? reinterpret_cast<Element_*>(device_table + offset) : nullptr;
    };
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int>(groups.problems.size()), on_device(host.problems),
         groups.problems.data()},
        {on_device(host.a), on_device(host.stride_a), on_device(host.b),
         on_device(host.stride_b)},
        {{}, nullptr, nullptr, on_device(host.d), on_device(host.stride_d)},
        hardware_info(on)};
  }
};

// Input gradients: A = grad_preact (rows x cols, K-major), B = weight's column block (cols x
// width, N-major: weight is row-major). Weight gradient: A = grad_preact^T (cols x rows,
// M-major), B = the input (rows x width, N-major).
template <typename Element>
using InputGradGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor>;
template <typename Element>
using WeightGradGemm =
    GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

template <typename Element>
struct BackwardTables {
  typename InputGradGemm<Element>::Table input_grads;
  typename WeightGradGemm<Element>::Table weight_grad;
};
// A kernel argument: copied bit for bit, within the 4 KB a kernel's parameters may take.
static_assert(std::is_trivially_copyable_v<BackwardTables<cutlass::bfloat16_t>> &&
              sizeof(BackwardTables<cutlass::bfloat16_t>) <= 4000);

template <class Tables>
__global__ void write_tables(const Tables tables, Tables* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) *out = tables;
}

template <typename Element>
bool grouped_backward(const at::Tensor& grad_preact, const std::vector<at::Tensor>& inputs,
                      const at::Tensor& weight, const std::vector<at::Tensor>& grad_inputs,
                      const at::Tensor& grad_weight) {
  using InputGrads = InputGradGemm<Element>;
  using WeightGrad = WeightGradGemm<Element>;
  using Tables = BackwardTables<Element>;

  const int64_t rows = grad_preact.size(0), cols = grad_preact.size(1);
  typename InputGrads::Groups input_groups;
  typename WeightGrad::Groups weight_groups;
  int64_t offset = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t width = inputs[i].size(1);
    if (grad_inputs[i].defined()) {
      input_groups.add(rows, width, cols, grad_preact, grad_preact.stride(0), weight,
                       weight.stride(0), grad_inputs[i], grad_inputs[i].stride(0), offset);
    }
    if (grad_weight.defined()) {
      weight_groups.add(cols, width, rows, grad_preact, grad_preact.stride(0), inputs[i],
                        inputs[i].stride(0), grad_weight, grad_weight.stride(0), 0, offset);
    }
    offset += width;
  }

  // Everything checked before anything runs: both launches or, returning false, neither.
  const bool any_input = !input_groups.problems.empty(), any_weight = grad_weight.defined();
  typename InputGrads::Gemm input_gemm;
  typename WeightGrad::Gemm weight_gemm;
  auto input_args = InputGrads::arguments(input_groups, nullptr, weight);
  auto weight_args = WeightGrad::arguments(weight_groups, nullptr, weight);
  if ((any_input && input_gemm.can_implement(input_args) != cutlass::Status::kSuccess) ||
      (any_weight && weight_gemm.can_implement(weight_args) != cutlass::Status::kSuccess)) {
    return false;
  }

  // One allocation: the tables, then each GEMM's workspace (its TMA descriptors per SM).
  const auto round_up = [](size_t n) { return (n + 127) / 128 * 128; };
  const size_t tables_bytes = round_up(sizeof(Tables));
  const size_t input_bytes =
      any_input ? round_up(InputGrads::Gemm::get_workspace_size(input_args)) : 0;
  const size_t weight_bytes = any_weight ? WeightGrad::Gemm::get_workspace_size(weight_args) : 0;
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(tables_bytes + input_bytes + weight_bytes)},
                weight.options().dtype(at::kByte));
  uint8_t* base = workspace.data_ptr<uint8_t>();
  const Tables tables{input_groups.table, weight_groups.table};
  const auto tables_offset = [&](const auto& member) {
    return reinterpret_cast<const uint8_t*>(&member) - reinterpret_cast<const uint8_t*>(&tables);
  };
  // Set up both GEMMs (host work only: their TMA descriptors and grid) before anything is
  // queued, so that a failure leaves nothing half done.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (any_input) {
    input_args =
        InputGrads::arguments(input_groups, base + tables_offset(tables.input_grads), weight);
    TORCH_CHECK(input_gemm.initialize(input_args, base + tables_bytes, stream) ==
                    cutlass::Status::kSuccess,
                "fusedskip: the CUTLASS grouped GEMM could not be set up");
  }
  if (any_weight) {
    weight_args =
        WeightGrad::arguments(weight_groups, base + tables_offset(tables.weight_grad), weight);
    TORCH_CHECK(weight_gemm.initialize(weight_args, base + tables_bytes + input_bytes, stream) ==
                    cutlass::Status::kSuccess,
                "fusedskip: the CUTLASS grouped GEMM could not be set up");
  }
  write_tables<<<1, 1, 0, stream>>>(tables, reinterpret_cast<Tables*>(base));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto run = [&](auto& gemm) {
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
                "fusedskip: the CUTLASS grouped GEMM failed to launch");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count_grouped_gemm_launch();
  };
  if (any_input) run(input_gemm);
  if (any_weight) run(weight_gemm);
  return true;
}

}  // namespace sm90
#endif  // FUSEDSKIP_WITH_CUTLASS

bool grouped_backward_gemms_cuda(const at::Tensor& grad_preact,
                                 const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                                 const std::vector<at::Tensor>& grad_inputs,
                                 const at::Tensor& grad_weight) {
#ifdef FUSEDSKIP_WITH_CUTLASS
  const at::ScalarType dtype = weight.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (inputs.empty() || static_cast<int64_t>(inputs.size()) > kMaxInputs) return false;
  const int64_t rows = grad_preact.size(0), cols = grad_preact.size(1);
  const int64_t int_max = std::numeric_limits<int>::max();
  // CUTLASS's tile coordinates are ints: keep the last tiles from wrapping (512: 256-row tiles
  // in clusters of 2).
  // cols == 0 would leave the input gradients' accumulators unwritten (no K steps) and the
  // weight gradient's grid empty.
  if (rows == 0 || rows > int_max - 512 || cols == 0 || cols % 8 != 0 || cols > int_max - 512) {
    return false;
  }
  // The weight is read for the input gradients only, the inputs for the weight gradient only:
  // where that is not wanted, the inputs autograd hands over are stand-ins of the right shape
  // (one unfilled row expanded, which TMA cannot take), not the tensors.
  bool any_input = false;
  for (const at::Tensor& grad : grad_inputs) any_input = any_input || grad.defined();
  if (!any_input && !grad_weight.defined()) return false;
  if (!tma_operand(grad_preact) || (any_input && !tma_operand(weight)) ||
      (grad_weight.defined() && !tma_operand(grad_weight))) {
    return false;
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    // Widths of whole 16-byte words also keep every column block of weight and grad_weight on
    // 16-byte bounds.
    const int64_t width = inputs[i].size(1);
    if (width == 0 || width % 8 != 0 || width > int_max - 512 ||
        (grad_weight.defined() && !tma_operand(inputs[i]))) {
      return false;
    }
    if (grad_inputs[i].defined() && !tma_operand(grad_inputs[i])) return false;
  }
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  if (device->major != 9 || device->minor != 0) return false;  // sm_90a code runs on sm_90 only
  bool ran = false;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "grouped_gemm_sm90", [&] {
    using Element = typename sm90::CutlassType<scalar_t>::type;
    ran = sm90::grouped_backward<Element>(grad_preact, inputs, weight, grad_inputs, grad_weight);
  });
  return ran;
#else
  (void)grad_preact, (void)inputs, (void)weight, (void)grad_inputs, (void)grad_weight;
  return false;
#endif
}

}  // namespace fusedskip
