// CUDA kernels of the fused linear op: cuBLAS GEMMs (through ATen, csrc/fused_linear.cpp) and
// the element-wise passes below, launched on the current stream of the tensors' device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/epilogue_kernels.cuh"
#include "dispatch.h"
#include "fused_linear.h"

namespace fusedskip {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU a few times over; the kernels grid-stride past that.
unsigned int blocks_for(int64_t units) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const int64_t wanted = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, max_blocks)));
}

}  // namespace

void forward_epilogue_cuda(const at::Tensor& gemm, const at::Tensor& out,
                           const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                           const at::Tensor& mask, Residual where) {
  const c10::cuda::CUDAGuard device_guard(out.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t units = rows * mask_bytes_per_row(cols);
  if (units == 0) return;
  // The library path's GEMM writes the output dtype (csrc/fused_linear.cpp); only the CPU loops
  // hand over a float32 x W^T.
  TORCH_INTERNAL_ASSERT(gemm.scalar_type() == out.scalar_type() && gemm.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_linear", [&] {
    const auto p = forward_epilogue_params<scalar_t>(out, bias, residual, mask);
    const scalar_t* gemm_data = gemm.const_data_ptr<scalar_t>();
    FS_BOOL_SWITCH(mask.defined(), kRelu, [&] {
      FS_RESIDUAL_SWITCH(where, kResidual, [&] {
        FS_BOOL_SWITCH(has_bias, kBias, [&] {
          FS_BOOL_SWITCH(forward_epilogue_vectorizable(p, gemm_data), kVec, [&] {
            launch_kernel<forward_epilogue_kernel<kRelu, kResidual, kBias, kVec, scalar_t>>(
                blocks_for(units), kThreads, p, gemm_data);
          });
        });
      });
    });
  });
}

void backward_epilogue_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                            const at::Tensor& grad_preact, const at::Tensor& grad_bias) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t rows = grad_out.size(0), cols = grad_out.size(1);
  const int64_t row_blocks = bias_row_blocks(rows, kCudaRowsPerBlock);
  const bool relu = grad_preact.defined();
  const bool has_bias = grad_bias.defined();
  const at::Tensor partials =
      has_bias ? at::empty({row_blocks, cols},
                           grad_out.options().dtype(at::toOpMathType(grad_out.scalar_type())))
               : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "fused_linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = backward_epilogue_params<scalar_t>(grad_out, mask, grad_preact,
                                                      has_bias ? partials.data_ptr<acc_t>() : nullptr,
                                                      kCudaRowsPerBlock);
    const int64_t units = row_blocks * mask_bytes_per_row(cols);
    if (units > 0) {
      FS_BOOL_SWITCH(relu, kRelu, [&] {
        FS_BOOL_SWITCH(has_bias, kBias, [&] {
          FS_BOOL_SWITCH(backward_epilogue_vectorizable(p), kVec, [&] {
            launch_kernel<backward_epilogue_kernel<kRelu, kBias, kVec, scalar_t>>(blocks_for(units),
                                                                            kThreads, p);
          });
        });
      });
    }
  });
  // Second stage: ATen's column sum over the row blocks' partial sums, in the float type they
  // were summed in (a warp reads neighbouring columns; the order follows the shape and the GPU,
  // so the same bits on every run on one GPU), rounded once to a half type's bias. A kernel of
  // our own that took one column per thread block, its threads reading partials a row of them
  // apart, took 17.5 us for 512 x 4096 on an H100 (benchmarks/NOTES.md, "Concat on the cuBLAS
  // path").
  if (has_bias) {
    if (grad_bias.scalar_type() == partials.scalar_type()) {
      at::Tensor out = grad_bias;
      at::sum_out(out, partials, at::IntArrayRef{0});
    } else {  // not sum_out: it would round the partials to the half type before summing them
      grad_bias.copy_(partials.sum(0));
    }
  }
}

namespace {

// The GEMMs inside run on the device of their operands; the guard makes the element-wise
// launches (current device, current stream) follow them. Only a CUDA weight sets it: a call
// lands here whenever any argument is on a GPU, and with the weight still on the CPU (a model not
// moved) the op's checks must say so, not the guard that a CPU device is no CUDA device.
std::optional<c10::Device> cuda_device_of(const at::Tensor& weight) {
  if (weight.is_cuda()) return weight.device();
  return std::nullopt;
}

// The kernels are built for compute capability 8.0 and newer (setup.py): on an older GPU the
// first launch would fail with CUDA's "no kernel image", and at some shapes only.
void check_gpu_runs_kernels(const at::Tensor& weight) {
  if (!weight.is_cuda()) return;
  const cudaDeviceProp* gpu = at::cuda::getDeviceProperties(weight.get_device());
  TORCH_CHECK(gpu->major >= 8, "fusedskip: the CUDA kernels need a GPU of compute capability ",
              "8.0 or newer; ", gpu->name, " (", weight.device(), ") is ", gpu->major, ".",
              gpu->minor, ". The modules use the reference PyTorch path there; in place of the ",
              "functional API, call fusedskip.reference's functions");
}

std::tuple<at::Tensor, at::Tensor> fused_linear_cuda(at::TensorList inputs,
                                                     const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& residual,
                                                     bool relu, bool residual_before_relu) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(weight));
  check_gpu_runs_kernels(weight);
  return fused_linear(inputs, weight, bias, residual, relu, residual_before_relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_backward_cuda(
    const at::Tensor& grad_output, at::TensorList inputs, const at::Tensor& weight,
    const at::Tensor& relu_mask, bool relu, const c10::List<bool>& output_mask) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(weight));
  check_gpu_runs_kernels(weight);
  return fused_linear_backward(grad_output, inputs, weight, relu_mask, relu, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedskip, CUDA, m) {
  m.impl("fused_linear", &fused_linear_cuda);
  m.impl("fused_linear_backward", &fused_linear_backward_cuda);
}

}  // namespace fusedskip
