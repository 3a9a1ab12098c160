// The fused linear op family: declarations shared by the op, its autograd and the device code.
//
//   schemas                    csrc/ops.cpp
//   op (checks, paths)         csrc/fused_linear.cpp     (device-generic)
//   which path per call        csrc/backend.cpp          (FUSEDSKIP_BACKEND)
//   CUTLASS kernels (sm_90a)   csrc/cuda/fused_gemm_sm90.cu (forward),
//                              csrc/cuda/concat_gemm_sm90.cu (concat forward),
//                              csrc/cuda/grouped_gemm_sm90.cu (concat backward)
//   native kernel              csrc/tile_gemm.h (block body), csrc/tile_plan.h (launch plan),
//                              csrc/cuda/tile_kernels.cu, csrc/cpu/tile_emulation.cpp
//   CPU direct loops           csrc/cpu/fused_linear_cpu.cpp
//   element-wise passes        csrc/cpu/fused_linear_cpu.cpp, csrc/cuda/fused_linear_cuda.cu
//   element-wise maths         csrc/epilogue.h
//   autograd, torch.func       csrc/autograd.cpp (Autograd and FuncTorchBatched keys)
//   autocast                   csrc/autocast.cpp
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include "epilogue.h"

namespace fusedskip {

// The concat form takes at most this many inputs (a fixed-size parameter block on the GPU).
constexpr int64_t kMaxInputs = 8;

// Shapes of one call, after validation: the inputs are viewed as (rows, widths[i]).
struct Geometry {
  int64_t rows = 0;                // product of the leading dims
  int64_t cols = 0;                // out_features
  c10::SmallVector<int64_t, kMaxInputs> widths;  // last dim of each input
  c10::SmallVector<int64_t, 6> out_shape;        // leading dims + (out_features,)
};

// The dtypes the op computes in.
inline bool is_supported_dtype(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble;
}

// An operand the GEMM libraries' fast paths (cuBLAS's aligned kernels, TMA) take as it is: it
// starts on a 16-byte boundary, has unit stride in its last dim, and (2-D) its rows are a whole
// number of 16-byte words apart.
inline bool on_16_byte_words(const at::Tensor& t) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1 &&
         (t.dim() < 2 || t.stride(0) * item % 16 == 0);
}

// What a TMA descriptor (the CUTLASS kernels' loads and stores) takes: on 16-byte words, and (2-D)
// rows that do not overlap (an expanded tensor's zero row stride is refused) and are less than
// 2^40 bytes apart. The launchers hand the row stride to the descriptor as it is, so a one-row
// tensor, whose stride torch leaves free (as_strided, size-1 views), is held to the same rule: a
// stride the descriptor cannot encode would stop the process in CUTLASS's host check.
inline bool tma_operand(const at::Tensor& t) {
  if (!on_16_byte_words(t)) return false;
  if (t.dim() < 2) return true;
  const int64_t stride = t.stride(0);
  return stride >= t.size(1) &&
         stride < (int64_t{1} << 40) / static_cast<int64_t>(t.element_size());
}

// Autocast casts the floating operands on its device to its dtype but leaves float64 ones alone:
// mixed, they would reach the op in two dtypes, and its error would name the autocast dtype, not
// the one passed. Raises TypeError naming both.
void check_autocast_operands(at::TensorList inputs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::DeviceType device);

// The op's argument checks: raise ValueError / TypeError / RuntimeError naming the offending
// argument. On sizes that may be symbolic: the composite (csrc/autograd.cpp) runs them under vmap
// inside torch.compile with dynamic shapes, where sizes() throws.
void check_forward_shapes(at::TensorList inputs, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual);

// check_forward_shapes, then the geometry the kernels need (concrete sizes only).
Geometry check_forward_args(at::TensorList inputs, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual);

// The residual's part of those checks. same_dtype false: a residual wider than the linear, which
// autocast adds after the op (csrc/autocast.cpp).
void check_residual(const at::Tensor& residual, const at::Tensor& weight,
                    c10::SymIntArrayRef out_shape, bool same_dtype = true);

Residual residual_kind(bool has_residual, bool relu, bool residual_before_relu);

// fusedskip::fused_linear: returns (output, relu_mask); relu_mask is empty without ReLU.
std::tuple<at::Tensor, at::Tensor> fused_linear(at::TensorList inputs, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual,
                                                bool relu, bool residual_before_relu);

// fusedskip::fused_linear_backward. output_mask has len(inputs) + 3 entries: one per input, then
// weight, bias, pre-activation. grad_input is the gradient of cat(inputs, -1), (..., in_features):
// input i's is its column block, zero for an input not asked for, and the whole of it empty
// (numel 0) when no input's is asked for; likewise the other outputs. The pre-activation gradient
// exists only with ReLU (without it, it is grad_output itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, at::TensorList inputs, const at::Tensor& weight,
    const at::Tensor& relu_mask, bool relu, const c10::List<bool>& output_mask);

// (..., cols) pre-activation -> the op's packed ReLU mask (rows, ceil(cols / 8)) uint8, with ATen
// ops (any device, sizes symbolic or not): bit c % 8 of byte c / 8 set where relu_active
// (csrc/epilogue.h), NaN included.
at::Tensor pack_relu_mask(const at::Tensor& preact);

// The op's autocast kernel for a CPU or CUDA `device` (csrc/autocast.cpp): the arguments cast as
// nn.Linear's are, then the op without autocast.
std::tuple<at::Tensor, at::Tensor> fused_linear_autocast(
    c10::DeviceType device, at::TensorList inputs, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool relu,
    bool residual_before_relu);

// The ops as the dispatcher holds them (all dispatch keys: autograd, fake, CPU, CUDA).
const c10::TypedOperatorHandle<decltype(fused_linear)>& fused_linear_op();
const c10::TypedOperatorHandle<decltype(fused_linear_backward)>& fused_linear_backward_op();

// Element-wise passes, one per device. `gemm` (x W^T, in the output dtype or float32) and `out`
// are (rows, cols) contiguous and may be the same tensor; `bias` is contiguous; `residual` is
// (rows, cols) with unit column stride, or undefined; `mask` is undefined without ReLU.
void forward_epilogue_cpu(const at::Tensor& gemm, const at::Tensor& out,
                          const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                          const at::Tensor& mask, Residual where);
// `grad_out` is (rows, cols) with any strides; `grad_preact` (written where the ReLU is, undefined
// otherwise) is (rows, cols) contiguous; `grad_bias` is (cols) or undefined.
void backward_epilogue_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                           const at::Tensor& grad_preact, const at::Tensor& grad_bias);

// Kernel parameters from tensors (host side, shared by the CPU and CUDA launchers). `out` has
// unit column stride.
template <typename scalar_t>
ForwardEpilogueParams<scalar_t> forward_epilogue_params(const at::Tensor& out,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& residual,
                                                        const at::Tensor& mask) {
  ForwardEpilogueParams<scalar_t> p{};
  p.out = out.data_ptr<scalar_t>();
  p.out_stride_row = out.stride(0);
  p.bias = bias.has_value() && bias->defined() ? bias->const_data_ptr<scalar_t>() : nullptr;
  p.residual = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  p.residual_stride_row = residual.defined() ? residual.stride(0) : 0;
  p.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
  p.rows = out.size(0);
  p.cols = out.size(1);
  return p;
}

template <typename scalar_t>
BackwardEpilogueParams<scalar_t> backward_epilogue_params(
    const at::Tensor& grad_out, const at::Tensor& mask, const at::Tensor& grad_preact,
    at::opmath_type<scalar_t>* bias_partials, int64_t rows_per_block) {
  BackwardEpilogueParams<scalar_t> p{};
  p.grad_out = grad_out.const_data_ptr<scalar_t>();
  p.grad_out_stride_row = grad_out.stride(0);
  p.grad_out_stride_col = grad_out.stride(1);
  p.mask = grad_preact.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  p.grad_preact = grad_preact.defined() ? grad_preact.data_ptr<scalar_t>() : nullptr;
  p.bias_partials = bias_partials;
  p.rows = grad_out.size(0);
  p.cols = grad_out.size(1);
  p.rows_per_block = rows_per_block;
  return p;
}

// Small CPU layers: x W^T (in opmath dtype) and the input / weight gradients as direct loops
// instead of one BLAS call per input. grad_inputs_2d[i] undefined = not wanted, likewise
// grad_weight; the defined ones are (rows, width_i) with unit column stride (column blocks of
// one gradient) and (cols, in_features) contiguous.
at::Tensor direct_gemm_forward_cpu(const std::vector<at::Tensor>& inputs_2d,
                                   const at::Tensor& weight, const Geometry& g);
void direct_gemm_backward_cpu(const at::Tensor& grad_preact,
                              const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                              const Geometry& g, const std::vector<at::Tensor>& grad_inputs_2d,
                              const at::Tensor& grad_weight);

// The native kernel (csrc/tile_plan.h has the contracts) and its host emulation.
void tile_forward_emulated(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                           const at::Tensor& out, const at::Tensor& mask, Residual where);
void tile_backward_emulated(const at::Tensor& grad_out, const at::Tensor& mask,
                            const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                            const std::vector<at::Tensor>& grad_inputs_2d,
                            const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                            const at::Tensor& grad_preact);

#ifdef FUSEDSKIP_WITH_CUDA
void tile_forward_cuda(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                       const at::Tensor& out, const at::Tensor& mask, Residual where);
void tile_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                        const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                        const std::vector<at::Tensor>& grad_inputs_2d,
                        const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                        const at::Tensor& grad_preact);
void forward_epilogue_cuda(const at::Tensor& gemm, const at::Tensor& out,
                           const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                           const at::Tensor& mask, Residual where);
void backward_epilogue_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                            const at::Tensor& grad_preact, const at::Tensor& grad_bias);
// The `cutlass` backend's forward (csrc/cuda/fused_gemm_sm90.cu): x (rows, in_features) W^T with
// bias, ReLU + mask and the residual inside one sm_90a GEMM, written to out (rows, cols). Returns
// false, having done nothing, where that kernel does not apply (not built, not an sm_90 GPU, no
// ReLU, float32/64, sizes or alignment TMA cannot take); the caller then takes the cuBLAS path.
bool fused_gemm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                             const at::Tensor& out, const at::Tensor& mask, Residual where);
// The `cutlass` backend's forward for the concat form (csrc/cuda/concat_gemm_sm90.cu): out (rows,
// cols) = cat(inputs) W^T + bias, and with `mask` defined the ReLU and its mask, as one sm_90a
// GEMM whose K loop runs over the inputs (rows, width_i); the cat is never built. Returns false,
// having done nothing, where it does not apply (the caller then builds the cat).
bool concat_gemm_forward_cuda(const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& out,
                              const at::Tensor& mask);
// The `cutlass` backend's backward GEMMs for the concat form (csrc/cuda/grouped_gemm_sm90.cu):
// grad_inputs[i] = grad_preact weight[:, block i] for each defined grad_inputs[i] (column blocks
// of one gradient), and, if grad_weight is defined, grad_weight[:, block i] = grad_preact^T
// inputs[i], as two grouped sm_90a GEMMs writing in place. grad_preact (rows, cols); inputs[i]
// (rows, width_i); the outputs allocated by the caller. Returns false, having done nothing, where
// they do not apply (the caller then takes the cuBLAS GEMMs of library_backward_gemms).
bool grouped_backward_gemms_cuda(const at::Tensor& grad_preact,
                                 const std::vector<at::Tensor>& inputs, const at::Tensor& weight,
                                 const std::vector<at::Tensor>& grad_inputs,
                                 const at::Tensor& grad_weight);
#endif

}  // namespace fusedskip
