// Autocast of fusedskip::fused_linear: under torch.autocast the op casts like nn.Linear does
// (floating inputs, weight, bias to the autocast dtype; float64 left alone), so a layer fed by
// other autocast layers sees one dtype. The residual is cast too: the fused result has the
// autocast dtype, where eager `linear(x) + r` with a float32 r would promote to float32.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "fused_linear.h"

namespace fusedskip {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> fused_linear_autocast(
    at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, bool residual_before_relu) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  std::vector<at::Tensor> cast_inputs;
  cast_inputs.reserve(inputs.size());
  for (const at::Tensor& x : inputs) cast_inputs.push_back(at::autocast::cached_cast(dtype, x, kDevice));
  return fused_linear_op().call(cast_inputs, at::autocast::cached_cast(dtype, weight, kDevice),
                                at::autocast::cached_cast(dtype, bias, kDevice),
                                at::autocast::cached_cast(dtype, residual, kDevice), relu,
                                residual_before_relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedskip, AutocastCPU, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fusedskip, AutocastCUDA, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fusedskip
