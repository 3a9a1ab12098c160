// How the library's own kernels are launched: programmatic dependent launch (PDL) on sm_90 and
// newer, a plain launch elsewhere.
//
// A kernel queued behind another on one stream normally starts only once the one before has
// finished and its writes are flushed: every boundary leaves the GPU draining, then filling. With
// PDL the next kernel's blocks may be placed on the multiprocessors the last one's blocks leave,
// while those still run; each waits (griddepcontrol.wait) until the kernel before it has finished
// and its memory is visible, then proceeds as if launched the plain way. The library's kernels
// sit between cuBLAS GEMMs (the element-wise passes after and before the library path's GEMMs)
// and between each other. On an H100 the concat2 8192x4096 layer, forward+backward, took 40 us
// more per call back to back than its kernels' summed device time, where eager's, cuBLAS GEMMs
// back to back, took 49 us less (benchmarks/NOTES.md, "Kernel boundaries"): by those numbers
// eager's kernels overlap, and ours leave the GPU idle between them. FUSEDSKIP_PDL=0 turns it
// off, to measure what it brings.
//
// The rule that keeps it correct: a kernel launched with PDL touches no global memory before
// wait_for_prior_kernels(). Every __global__ function launched through launch_kernel calls it
// first, and launch_kernel uses PDL only for code compiled with it. (The CUTLASS GEMMs keep the
// rule their own way: csrc/cuda/fused_gemm_sm90.cuh.) tests/test_cuda.py queues each backend's
// kernels right behind a kernel that lets them launch early and writes their operands late
// (csrc/cuda/launch_probe.cu).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>

namespace fusedskip {

// Returns once every kernel this one depends on (those before it on the stream) has finished
// and its writes are visible. A no-op in a kernel launched the plain way, and before sm_90.
__device__ __forceinline__ void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream be launched once every block of this one has called this
// or exited: its blocks may then be placed wherever there is room (on the multiprocessors this
// kernel's last blocks leave, or idle ones), and wait for this kernel to finish before they read
// or write anything. Affects when, never what.
__device__ __forceinline__ void allow_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// FUSEDSKIP_PDL, read once: PDL unless it is 0. Inline, not in the extension's sources: the
// benchmark's CUTLASS configurations (benchmarks/cutlass_configs/) launch through here too, from
// a module of their own.
inline bool programmatic_launch_wanted() {
  static const bool wanted = [] {
    const char* value = std::getenv("FUSEDSKIP_PDL");
    if (value == nullptr || value[0] == '\0' || std::string(value) == "1") return true;
    if (std::string(value) == "0") return false;
    TORCH_WARN("fusedskip: FUSEDSKIP_PDL=", value, " is not 0 or 1; using 1");
    return true;
  }();
  return wanted;
}

// Whether kernels launched on `device` use PDL: wanted, and the device is sm_90 or newer. For
// kernels compiled for sm_90 only (the CUTLASS GEMMs, which run on sm_90 alone).
inline bool programmatic_launch_on(c10::DeviceIndex device) {
  return programmatic_launch_wanted() && at::cuda::getDeviceProperties(device)->major >= 9;
}
inline bool programmatic_launch_now() {
  return programmatic_launch_on(c10::cuda::current_device());
}

// kKernel<<<blocks, threads, 0, current stream>>>(args...), then the launch check; with PDL where
// programmatic_launch_on the device and the code the device runs has the wait, that is, was
// compiled for sm_90 or newer. On a newer GPU than the build's newest SASS the device runs the
// compute_80 PTX (setup.py), compiled without it: a kernel launched with PDL would then read the
// output of the one before while that still runs. So the PTX version of what runs, per kernel and
// device, from cudaFuncGetAttributes once (ptxVersion is what the code was compiled from, 80
// there). The current device is looked up once per launch: the stream and the cache use it.
template <auto kKernel, typename... Args>
void launch_kernel(unsigned int blocks, unsigned int threads, Args&&... args) {
  const c10::DeviceIndex device = c10::cuda::current_device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  bool programmatic = false;
  if (programmatic_launch_wanted()) {
    // 0: not yet asked; 1: a plain launch (before sm_90, or code without the wait); 2: PDL.
    static std::atomic<int8_t> launch_state[C10_COMPILE_TIME_MAX_GPUS] = {};
    TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
    int8_t state = launch_state[device].load(std::memory_order_relaxed);
    if (state == 0) {
      cudaFuncAttributes attributes{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kKernel));
      state = programmatic_launch_on(device) && attributes.ptxVersion >= 90 ? 2 : 1;
      launch_state[device].store(state, std::memory_order_relaxed);
    }
    programmatic = state == 2;
  }
  if (!programmatic) {
    kKernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kKernel, std::forward<Args>(args)...));
}

}  // namespace fusedskip
