// Test hooks for csrc/cuda/launch.cuh (fusedskip._C._late_copy, _programmatic_launch): a kernel
// that lets the next one on the stream launch at once and writes only later, launched as the
// library launches its own. On sm_90, a kernel queued right behind it that read its operands
// before waiting (griddepcontrol.wait) would read them before this writes them;
// tests/test_cuda.py puts each backend's first kernels there.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "backend.h"
#include "cuda/launch.cuh"

namespace fusedskip {
namespace {

__device__ uint64_t global_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__global__ void late_copy_kernel(const uint8_t* src, uint8_t* dst, int64_t bytes,
                                 int64_t delay_ns) {
  wait_for_prior_kernels();
  allow_next_kernel_launch();
  const uint64_t start = global_ns();
  while (global_ns() - start < static_cast<uint64_t>(delay_ns)) {
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < bytes;
       i += stride) {
    dst[i] = src[i];
  }
}

}  // namespace

void late_copy_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t delay_ns) {
  TORCH_CHECK_VALUE(src.is_cuda() && dst.device() == src.device(),
                    "fusedskip: _late_copy takes two tensors on one CUDA device");
  TORCH_CHECK_VALUE(src.is_contiguous() && dst.is_contiguous() && src.nbytes() == dst.nbytes(),
                    "fusedskip: _late_copy takes two contiguous tensors of one size in bytes");
  TORCH_CHECK_VALUE(delay_ns >= 0, "fusedskip: _late_copy's delay must be >= 0");
  const c10::cuda::CUDAGuard device_guard(src.device());
  // One block: the others' multiprocessors stay free for the next kernel's blocks to be placed
  // on while this one waits out the delay (blocks on every one would leave no room, and the next
  // kernel could only start as this one's blocks exit).
  launch_kernel<late_copy_kernel>(1, 256, static_cast<const uint8_t*>(src.const_data_ptr()),
                                  static_cast<uint8_t*>(dst.data_ptr()),
                                  static_cast<int64_t>(src.nbytes()), delay_ns);
}

bool programmatic_launch_active() { return at::cuda::is_available() && programmatic_launch_now(); }

}  // namespace fusedskip
