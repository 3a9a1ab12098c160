// The native CUDA kernel (FUSEDSKIP_BACKEND=native, or auto at small sizes): csrc/tile_gemm.h's
// block body as a CUDA thread block, tensor cores through WMMA, and its launchers.
#include <mma.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.cuh"
#include "tile_plan.h"

namespace fusedskip {
namespace {

// The block interface of csrc/tile_gemm.h on the GPU: each thread is itself, and owns the
// accumulator of its worker (for tensor cores, its lanes' share of the warp's fragments).
// Host-device members with device-only bodies: the block body is __host__ __device__ code.
template <class Math>
struct DeviceBlock {
  typename Math::Acc acc;

  template <class F>
  FS_HOST_DEVICE void for_each_thread(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x));
#endif
  }
  template <class F>
  FS_HOST_DEVICE void for_each_worker(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x) / Math::kThreadsPerWorker, acc);
#endif
  }
  FS_HOST_DEVICE void sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

template <typename scalar_t>
struct WmmaTypes;
template <>
struct WmmaTypes<at::Half> {
  using operand = __half;
  using element = __half;
};
template <>
struct WmmaTypes<at::BFloat16> {
  using operand = __nv_bfloat16;
  using element = __nv_bfloat16;
};
template <>
struct WmmaTypes<float> {  // TF32: float in memory, rounded to TF32 in the fragments
  using operand = float;
  using element = nvcuda::wmma::precision::tf32;
};

// Warp-level tensor-core maths: all 32 lanes of a warp call each function together.
template <typename scalar_t>
struct WmmaMath : TensorCoreShape<scalar_t> {
  using Shape = TensorCoreShape<scalar_t>;
  using Smem = typename Shape::Smem;
  using operand_t = typename WmmaTypes<scalar_t>::operand;
  using element_t = typename WmmaTypes<scalar_t>::element;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, Shape::kFragM, Shape::kFragN,
                                       Shape::kFragK, element_t, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, Shape::kFragM, Shape::kFragN,
                                       Shape::kFragK, element_t, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, Shape::kFragM, Shape::kFragN,
                                       Shape::kFragK, float>;
  struct Acc {
    FragC c[Shape::kFragsM][Shape::kFragsN];
  };

  FS_HOST_DEVICE static void zero(Acc& acc) {
#if defined(__CUDA_ARCH__)
    for (int i = 0; i < Shape::kFragsM; ++i)
      for (int j = 0; j < Shape::kFragsN; ++j) nvcuda::wmma::fill_fragment(acc.c[i][j], 0.0f);
#endif
  }

  template <class Frag>
  FS_HOST_DEVICE static void round_to_tf32(Frag& frag) {
#if defined(__CUDA_ARCH__)
    if constexpr (Shape::kTf32) {
      for (int t = 0; t < frag.num_elements; ++t) frag.x[t] = nvcuda::wmma::__float_to_tf32(frag.x[t]);
    }
#endif
  }

  FS_HOST_DEVICE static void mma(const Smem& smem, Acc& acc, int warp) {
#if defined(__CUDA_ARCH__)
    const operand_t* a = reinterpret_cast<const operand_t*>(smem.a());
    const operand_t* b = reinterpret_cast<const operand_t*>(smem.b());
    const int row = Shape::warp_row(warp), col = Shape::warp_col(warp);
#pragma unroll
    for (int kk = 0; kk < Shape::kBK; kk += Shape::kFragK) {
      FragA frag_a[Shape::kFragsM];
      FragB frag_b[Shape::kFragsN];
#pragma unroll
      for (int i = 0; i < Shape::kFragsM; ++i) {
        nvcuda::wmma::load_matrix_sync(frag_a[i], a + (row + i * Shape::kFragM) * Shape::kALd + kk,
                                       Shape::kALd);
        round_to_tf32(frag_a[i]);
      }
#pragma unroll
      for (int j = 0; j < Shape::kFragsN; ++j) {
        nvcuda::wmma::load_matrix_sync(frag_b[j], b + kk * Shape::kBLd + col + j * Shape::kFragN,
                                       Shape::kBLd);
        round_to_tf32(frag_b[j]);
      }
#pragma unroll
      for (int i = 0; i < Shape::kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < Shape::kFragsN; ++j)
          nvcuda::wmma::mma_sync(acc.c[i][j], frag_a[i], frag_b[j], acc.c[i][j]);
    }
#endif
  }

  FS_HOST_DEVICE static void store(Smem& smem, const Acc& acc, int warp) {
#if defined(__CUDA_ARCH__)
    const int row = Shape::warp_row(warp), col = Shape::warp_col(warp);
    for (int i = 0; i < Shape::kFragsM; ++i)
      for (int j = 0; j < Shape::kFragsN; ++j) {
        nvcuda::wmma::store_matrix_sync(
            smem.c() + (row + i * Shape::kFragM) * Shape::kCLd + col + j * Shape::kFragN,
            acc.c[i][j], Shape::kCLd, nvcuda::wmma::mem_row_major);
      }
#endif
  }
};

// At least 512 threads' worth of blocks per multiprocessor, which caps registers at 128 a thread.
// The tile loads keep a thread's whole share of a K step in registers (load_tiles); left alone,
// ptxas spent up to 162 registers on them and the tensor-core kernels fitted only 3 blocks.
template <class Math>
constexpr int kTileMinBlocksPerSm = 512 / Math::kThreads;

// __grid_constant__: the block body takes the (up to ~2 KB) parameters by reference; this keeps
// them in parameter space instead of a per-thread local copy.
template <class Math, bool kRelu, Residual kResidual, bool kBias, bool kStoresPreact,
          class Params>
__global__ void __launch_bounds__(Math::kThreads, kTileMinBlocksPerSm<Math>)
    tile_gemm_kernel(const __grid_constant__ Params p) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  __shared__ typename Math::Smem smem;
  DeviceBlock<Math> block;
  tile_gemm_block<Math, kRelu, kResidual, kBias, kStoresPreact>(p, blockIdx.x, smem, block);
}

template <typename scalar_t>
__global__ void split_sum_kernel(const SplitSumParams<scalar_t> p) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  const int64_t count = p.count_first + p.count_second;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    split_sum_unit(p, i);
  }
}

struct CudaExecutor {
  template <typename scalar_t>
  using TensorCoreMath = WmmaMath<scalar_t>;

  static int multiprocessors() {
    return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  static constexpr bool kPoison = false;  // the CUDA tests poison the allocator instead

  template <class Math, bool kRelu, Residual kResidual, bool kBias, bool kStoresPreact,
            class Params>
  static void run_tiles(const Params& p, int64_t blocks) {
    // csrc/backend.cpp routes shapes beyond the grid's limit to the GEMM + epilogue path.
    TORCH_INTERNAL_ASSERT(blocks <= kTileMaxBlocks);
    launch_kernel<tile_gemm_kernel<Math, kRelu, kResidual, kBias, kStoresPreact, Params>>(
        static_cast<unsigned>(blocks), Math::kThreads, p);
  }

  template <typename scalar_t>
  static void split_sum(const SplitSumParams<scalar_t>& p) {
    constexpr int kThreads = 256;
    const int64_t count = p.count_first + p.count_second;
    const int64_t max_blocks = static_cast<int64_t>(multiprocessors()) * 8;
    const auto blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min(ceil_div(count, kThreads), max_blocks)));
    launch_kernel<split_sum_kernel<scalar_t>>(blocks, kThreads, p);
  }
};

}  // namespace

void tile_forward_cuda(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                       const at::Tensor& out, const at::Tensor& mask, Residual where) {
  const c10::cuda::CUDAGuard device_guard(weight.device());
  tile_forward<CudaExecutor>(inputs_2d, weight, bias, residual_2d, out, mask, where);
}

void tile_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                        const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                        const std::vector<at::Tensor>& grad_inputs_2d,
                        const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                        const at::Tensor& grad_preact) {
  const c10::cuda::CUDAGuard device_guard(weight.device());
  tile_backward<CudaExecutor>(grad_out, mask, inputs_2d, weight, grad_inputs_2d, grad_weight,
                              grad_bias, grad_preact);
}

}  // namespace fusedskip
