// Autograd of fusedskip::fused_linear, registered in C++ on the Autograd key: one dispatch per
// call. (Autograd registered from Python would cost more host time per call than the eager ops
// the fused op replaces, which decides the speed-up at small sizes.)
//
// Saved for backward: the packed 1-bit ReLU mask and, as eager's linear saves them, the inputs
// only where the weight's gradient is wanted (it is their product with the output gradient) and
// the weight only where an input's is. Never the pre-activation, never the concatenation.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fused_linear.h"

namespace fusedskip {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool, with ATen ops (any device).
at::Tensor unpack_relu_mask(const at::Tensor& mask, int64_t cols) {
  const at::Tensor shifts = at::arange(kMaskBitsPerByte, mask.options());
  const at::Tensor bits = mask.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1);
  return bits.reshape({mask.size(0), mask.size(1) * kMaskBitsPerByte})
      .narrow(1, 0, cols)
      .to(at::kBool);
}

// Non-empty only when asked for: the op returns empty placeholders for the rest.
at::Tensor if_wanted(bool wanted, const at::Tensor& grad) { return wanted ? grad : at::Tensor(); }

// Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is running: functorch includes
// its dynamic-layer keys in this thread's dispatch keys while its stack of transforms is not
// empty. (The stack's own header, ATen/functorch/DynamicLayer.h, needs nlohmann/json, which
// torch does not ship.) Also the older vmap that autograd.grad's is_grads_batched and
// jacobian's vectorize run the backward under, which includes VmapMode.
bool transform_active() {
  using c10::impl::tls_is_dispatch_key_included;
  return tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode) ||
         tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         tls_is_dispatch_key_included(c10::DispatchKey::VmapMode);
}

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) keeps tangents at level 0, the only
// level it has (functorch nests its transforms above it), as ATen's own kernels assume.
constexpr uint64_t kForwardLevel = 0;

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(kForwardLevel).defined(); }

class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  // Compiled autograd may trace backward into its graph: backward reads only what it is handed
  // (saved tensors, saved_data, needs_input_grad) and calls dispatcher ops with fake kernels.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, bool relu,
                               bool residual_before_relu) {
    at::Tensor output, mask;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, mask) =
          fused_linear_op().call(inputs, weight, bias, residual, relu, residual_before_relu);
    }
    const bool has_residual = residual.has_value() && residual->defined();
    // The inputs only where the weight's gradient is wanted, and the weight only where an
    // input's is, decided by requires_grad as eager decides (not by what the running backward
    // asks for: a forward that checkpointing recomputes inside a backward must save what the
    // first one did). Not saved, they can be freed and written in place before backward, as
    // with eager (a first layer's weight clipped or averaged in place between forward and
    // backward: its gradient does not read the weight).
    const bool save_inputs = weight.requires_grad();
    bool save_weight = false;
    for (const at::Tensor& x : inputs) save_weight |= x.requires_grad();
    std::vector<at::Tensor> saved;
    saved.reserve(inputs.size() + 2);
    for (const at::Tensor& x : inputs) saved.push_back(save_inputs ? x : at::Tensor());
    // Where no input wants a gradient the weight is read for its shape and layout only (the
    // weight's and bias's gradients do not read its values): saved as its data with a version
    // counter of its own, outside the in-place check. The weight's storage, not a stand-in,
    // whose allocation would cost a first layer's backward host time the launch-bound layers
    // cannot spare (benchmarks/results/x86-64-2026-11-27/autograd-saves-ab/), and the same
    // backward path as when it is saved; still a saved tensor, so released after backward and
    // seen by saved-tensor hooks. An inference tensor (a layer made under
    // torch.inference_mode, then frozen) cannot be saved, its data neither: one element of its
    // dtype, expanded to its shape, stands in (eager's linear saves nothing of it there). So
    // also under torch.compile and export, whose fake and functional tensors may stand for one.
    const bool traced = weight.key_set().has_any(
        c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
    const at::Tensor weight_for_shape =
        weight.is_inference() || traced
            ? at::empty({}, weight.options()).expand_symint(weight.sym_sizes())
            : weight.variable_data();
    saved.push_back(save_weight ? weight : weight_for_shape);
    saved.push_back(mask);
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["count"] = static_cast<int64_t>(inputs.size());
    if (!save_inputs) {
      // Their shapes for backward's stand-ins; symbolic under torch.compile / export, where an
      // int read from a traced size would fix it.
      std::vector<c10::SymInt> widths;
      for (const at::Tensor& x : inputs) widths.push_back(x.sym_size(-1));
      ctx->saved_data["widths"] = c10::IValue(c10::SymIntArrayRef(widths));
    }
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["residual"] =
        static_cast<int64_t>(residual_kind(has_residual, relu, residual_before_relu));
    // The mask is uint8, so autograd already leaves it without a gradient. Not also marked
    // non-differentiable: compiled autograd refuses a C++ function that marks any output
    // (an internal assert in CppNode::compiled_args).
    ctx->set_materialize_grads(false);  // the mask never gets a gradient: don't allocate zeros
    return {output, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t count = ctx->saved_data["count"].toInt();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto residual = static_cast<Residual>(ctx->saved_data["residual"].toInt());
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];

    // One gradient per forward argument: inputs..., weight, bias, residual, relu, order.
    variable_list grads(count + 5);
    if (!grad_output.defined()) return grads;

    if (ctx->saved_data.count("widths") != 0) {
      // Inputs forward did not save are read for their shapes only (no wanted gradient reads
      // their values): one row expanded to each one's shape stands in for it, all of them cut
      // from one allocation. Left unfilled: a fill would be a kernel launch on a GPU, where a
      // frozen layer's backward is launch-bound.
      const std::vector<c10::SymInt> widths = ctx->saved_data["widths"].toSymIntVector();
      const at::Tensor row = at::empty_symint(
          {*std::max_element(widths.begin(), widths.end())}, grad_output.options());
      for (int64_t i = 0; i < count; ++i) {
        std::vector<c10::SymInt> shape = grad_output.sym_sizes().vec();
        shape.back() = widths[i];
        saved[i] = row.narrow_symint(0, 0, widths[i]).expand_symint(shape);
      }
    }
    const at::TensorList inputs(saved.data(), count);
    const at::Tensor& weight = saved[count];
    const at::Tensor& mask = saved[count + 1];

    // needs_input_grad counts only the tensor arguments: inputs, weight, then bias and residual
    // where they were given.
    std::vector<bool> want_input(count);
    for (int64_t i = 0; i < count; ++i) want_input[i] = ctx->needs_input_grad(i);
    const bool want_weight = ctx->needs_input_grad(count);
    const bool want_bias = has_bias && ctx->needs_input_grad(count + 1);
    const bool want_residual =
        residual != Residual::kNone && ctx->needs_input_grad(count + 1 + (has_bias ? 1 : 0));
    const bool residual_takes_preact = residual == Residual::kBeforeRelu;

    at::Tensor grad_preact;
    if (at::GradMode::is_enabled() || transform_active() || has_tangent(grad_output)) {
      // create_graph=True (double backward), under a transform (vmap of this backward, for
      // which the backward op has no batching rule), or with a forward-mode tangent on the
      // gradient (a hypergradient: forward AD runs whatever grad mode is, and the backward op
      // has no forward formula): the same maths in differentiable ATen ops.
      // The mask is a constant here: ReLU's second derivative is zero.
      grad_preact = grad_output;
      if (relu) {
        const at::Tensor active =
            unpack_relu_mask(mask, weight.size(0)).view(grad_output.sizes());
        grad_preact = at::where(active, grad_output, at::zeros({}, grad_output.options()));
      }
      const int64_t rows = c10::multiply_integers(grad_output.sizes().slice(0, grad_output.dim() - 1));
      const at::Tensor grad_preact_2d = grad_preact.reshape({rows, weight.size(0)});
      std::vector<at::Tensor> weight_blocks;
      int64_t offset = 0;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t width = inputs[i].size(-1);
        if (want_input[i]) grads[i] = at::matmul(grad_preact, weight.narrow(1, offset, width));
        if (want_weight) {
          weight_blocks.push_back(
              grad_preact_2d.t().mm(inputs[i].reshape({grad_preact_2d.size(0), width})));
        }
        offset += width;
      }
      if (want_weight) grads[count] = at::cat(weight_blocks, 1);
      if (want_bias) grads[count + 1] = grad_preact_2d.sum(0);
    } else {
      c10::List<bool> output_mask;
      for (int64_t i = 0; i < count; ++i) output_mask.push_back(want_input[i]);
      output_mask.push_back(want_weight);
      output_mask.push_back(want_bias);
      output_mask.push_back(relu && want_residual && residual_takes_preact);
      // Below autograd: no boxed autograd fallback around the op, no autograd kernels around
      // the ATen calls inside it.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_input, grad_weight, grad_bias, grad_preact_out] =
          fused_linear_backward_op().call(grad_output, inputs, weight, mask, relu, output_mask);
      // Each input's gradient is a view of its columns of the cat's, as eager's cat backward
      // hands out (a leaf's AccumulateGrad copies a view into a tensor of the leaf's strides).
      // Symbolic sizes under torch.compile / export: an int read from one would fix it.
      c10::SymInt offset = 0;
      for (int64_t i = 0; i < count; ++i) {
        const c10::SymInt width = inputs[i].sym_size(-1);
        if (want_input[i]) {
          grads[i] = count == 1 ? grad_input : grad_input.narrow_symint(-1, offset, width);
        }
        offset += width;
      }
      grads[count] = if_wanted(want_weight, grad_weight);
      grads[count + 1] = if_wanted(want_bias, grad_bias);
      grad_preact = relu ? grad_preact_out : grad_output;
    }
    if (want_residual) {
      grads[count + 2] = residual_takes_preact ? grad_preact : grad_output;
    }
    return grads;
  }
};

bool any_requires_grad(at::TensorList inputs, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual) {
  for (const at::Tensor& x : inputs) {
    if (x.requires_grad()) return true;
  }
  return weight.requires_grad() || (bias.has_value() && bias->requires_grad()) ||
         (residual.has_value() && residual->requires_grad());
}

bool any_tangent(at::TensorList inputs, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  for (const at::Tensor& x : inputs) {
    if (has_tangent(x)) return true;
  }
  return has_tangent(weight) || (bias.has_value() && has_tangent(*bias)) ||
         (residual.has_value() && has_tangent(*residual));
}

// A C++ autograd::Function has no forward-mode formula, and torch.func's transforms refuse one
// outright. A call with tangents, or under a transform, computes the op's maths in ATen ops
// instead (one linear over the cat), whose formulas and batching rules serve forward mode,
// torch.autograd's reverse mode over and under it, and every torch.func transform (vmap
// reaches it through the FuncTorchBatched registration below). It adds bias and residual and
// applies the ReLU in float32 (float64 for float64) and rounds once, as the direct loops, the
// native kernel and the cutlass epilogue do: their output and mask. Where the op's GEMM is a
// library's that rounds x W^T + b to a half type first (ATen's on a CPU above the direct loops'
// size, cuBLAS), a half-precision output may differ by a rounding, and a mask bit where that
// rounding reaches zero. Not a fast path.
std::tuple<at::Tensor, at::Tensor> fused_linear_composite(
    at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, bool residual_before_relu) {
  check_forward_shapes(inputs, weight, bias, residual);
  const at::ScalarType dtype = weight.scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto widen = [compute](const at::Tensor& t) { return t.to(compute); };
  std::vector<at::Tensor> wide_inputs;
  for (const at::Tensor& x : inputs) wide_inputs.push_back(widen(x));
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  at::Tensor preact = at::linear(wide_inputs.size() == 1 ? wide_inputs[0] : at::cat(wide_inputs, -1),
                                 widen(weight), has_bias ? widen(*bias) : at::Tensor());
  if (has_residual && (residual_before_relu || !relu)) preact = preact + widen(*residual);
  if (!relu) return {preact.to(dtype), at::empty({0}, weight.options().dtype(at::kByte))};
  at::Tensor output = at::relu(preact);
  if (has_residual && !residual_before_relu) output = output + widen(*residual);
  return {output.to(dtype), pack_relu_mask(preact)};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_autograd(
    at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, bool residual_before_relu) {
  if (transform_active() || any_tangent(inputs, weight, bias, residual)) {
    return fused_linear_composite(inputs, weight, bias, residual, relu, residual_before_relu);
  }
  if (!at::GradMode::is_enabled() || !any_requires_grad(inputs, weight, bias, residual)) {
    // No graph to record (no_grad, or nothing requires grad): skip the autograd node entirely.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return fused_linear_op().call(inputs, weight, bias, residual, relu, residual_before_relu);
  }
  variable_list outputs =
      FusedLinearFunction::apply(inputs, weight, bias, residual, relu, residual_before_relu);
  return {outputs[0], outputs[1]};
}

}  // namespace

// The inverse of unpack_relu_mask (not <= 0 is relu_active's test, so NaN too).
at::Tensor pack_relu_mask(const at::Tensor& preact) {
  const c10::SymInt cols = preact.sym_size(-1);
  const c10::SymInt bytes = (cols + (kMaskBitsPerByte - 1)) / kMaskBitsPerByte;
  c10::SymInt rows = 1;
  for (const c10::SymInt& size : preact.sym_sizes().slice(0, preact.dim() - 1)) rows *= size;
  const at::Tensor active =
      preact.detach().reshape_symint({rows, cols}).le(0).logical_not().to(at::kByte);
  const at::Tensor padded =
      at::constant_pad_nd_symint(active, {0, bytes * kMaskBitsPerByte - cols});
  const at::Tensor bit_values =
      at::ones({}, padded.options()).bitwise_left_shift(at::arange(kMaskBitsPerByte, padded.options()));
  return padded.view_symint({rows, bytes, kMaskBitsPerByte}).mul(bit_values).sum(-1, false, at::kByte);
}

TORCH_LIBRARY_IMPL(fusedskip, Autograd, m) {
  m.impl("fused_linear", &fused_linear_autograd);
  // The backward op has no derivative of its own (a double backward differentiates the ATen
  // ops FusedLinearFunction::backward runs under create_graph instead): a backward through a
  // direct call raises, where without this the gradient would go missing with a warning.
  m.impl("fused_linear_backward", torch::autograd::autogradNotImplementedFallback());
}

namespace {

// torch.func.vmap: the op has no batching rule of its own; the composite's ATen ops have theirs
// (as functorch decomposes ATen's composite ops), for batched inputs, weights or both. vmap's
// key is dispatched before autocast's, so autocast is still on here: this calls the autocast
// kernel, as the dispatcher would without vmap, and that kernel's call of the op comes back here
// with autocast's key excluded, which is what is_autocast_enabled reads.
std::tuple<at::Tensor, at::Tensor> fused_linear_batched(
    at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, bool residual_before_relu) {
  const c10::DeviceType device = weight.device().type();
  if ((device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA) &&
      at::autocast::is_autocast_enabled(device)) {
    return fused_linear_autocast(device, inputs, weight, bias, residual, relu,
                                 residual_before_relu);
  }
  return fused_linear_composite(inputs, weight, bias, residual, relu, residual_before_relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedskip, FuncTorchBatched, m) {
  m.impl("fused_linear", &fused_linear_batched);
}

}  // namespace fusedskip
