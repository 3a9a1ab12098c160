// Autocast of fusedskip::fused_linear: under torch.autocast the op computes what the eager
// composition it replaces computes. The linear casts like nn.Linear does (floating inputs, weight,
// bias to the autocast dtype; float64 left alone), so a layer fed by other autocast layers sees one
// dtype. The residual then meets the linear's result as eager's add meets it: in the promoted
// dtype. Where that is the linear's dtype (a residual of that dtype, or a narrower one, widened
// exactly) the op runs fused as usual; a wider residual (float32 next to bfloat16: the residual
// stream of an autocast model) is added after the op, in its own dtype, as eager would: the fused
// op computes the linear and ReLU, ATen adds the residual (and applies the ReLU after it, for
// add_relu). So `relu(linear(x)) + r` and its fused form give the same dtype and values.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "fused_linear.h"

namespace fusedskip {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> autocast_kernel(
    at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, bool residual_before_relu) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  check_autocast_operands(inputs, weight, bias, kDevice);
  std::vector<at::Tensor> cast_inputs;
  cast_inputs.reserve(inputs.size());
  for (const at::Tensor& x : inputs) cast_inputs.push_back(at::autocast::cached_cast(dtype, x, kDevice));
  const at::Tensor cast_weight = at::autocast::cached_cast(dtype, weight, kDevice);
  const std::optional<at::Tensor> cast_bias = at::autocast::cached_cast(dtype, bias, kDevice);
  const auto op = [&](const std::optional<at::Tensor>& r, bool relu_now, bool before) {
    return fused_linear_op().call(cast_inputs, cast_weight, cast_bias, r, relu_now, before);
  };
  // A residual of a dtype the op does not compute in goes to it as it is, whose checks name it
  // (promote_types would raise first for some, float8 among them, without naming the argument).
  if (!residual.has_value() || !residual->defined() ||
      !is_supported_dtype(residual->scalar_type()) ||
      !is_supported_dtype(cast_weight.scalar_type())) {
    return op(residual, relu, residual_before_relu);
  }
  const at::ScalarType linear_dtype = cast_weight.scalar_type();
  if (at::promote_types(linear_dtype, residual->scalar_type()) == linear_dtype) {
    return op(residual->to(linear_dtype), relu, residual_before_relu);
  }
  // A wider residual: what eager computes, each step in the dtype eager computes it in.
  if (relu && !residual_before_relu) {  // relu(linear(x)) + r
    auto [hidden, mask] = op(std::nullopt, true, false);
    check_residual(*residual, cast_weight, hidden.sym_sizes(), /*same_dtype=*/false);
    return {at::add(hidden, *residual), mask};
  }
  auto [preact, no_mask] = op(std::nullopt, false, false);
  check_residual(*residual, cast_weight, preact.sym_sizes(), /*same_dtype=*/false);
  at::Tensor sum = at::add(preact, *residual);
  if (!relu) return {sum, no_mask};  // linear(x) + r (the op's own form; the public API has none)
  // relu(linear(x) + r): the mask from the sum the ReLU sees.
  at::Tensor mask = pack_relu_mask(sum);
  return {at::relu(sum), mask};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_linear_autocast(
    c10::DeviceType device, at::TensorList inputs, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool relu,
    bool residual_before_relu) {
  TORCH_INTERNAL_ASSERT(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA);
  return device == c10::DeviceType::CUDA
             ? autocast_kernel<c10::DeviceType::CUDA>(inputs, weight, bias, residual, relu,
                                                      residual_before_relu)
             : autocast_kernel<c10::DeviceType::CPU>(inputs, weight, bias, residual, relu,
                                                     residual_before_relu);
}

TORCH_LIBRARY_IMPL(fusedskip, AutocastCPU, m) {
  m.impl("fused_linear", &autocast_kernel<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fusedskip, AutocastCUDA, m) {
  m.impl("fused_linear", &autocast_kernel<c10::DeviceType::CUDA>);
}

}  // namespace fusedskip
