// The schemas of the fusedskip ops: the one place that says what the ops are.
//
// Kernels: CPU in csrc/cpu/, CUDA in csrc/cuda/, autograd and vmap in csrc/autograd.cpp, autocast
// in csrc/autocast.cpp, sparse tensors' (checks that refuse them) in csrc/fused_linear.cpp; the
// fake (shape-only) kernels for torch.compile / torch.export are in fusedskip/_ops.py.
#include <torch/library.h>

#include "fused_linear.h"

TORCH_LIBRARY(fusedskip, m) {
  // y = epilogue(cat(inputs, -1) @ weight.T), the cat never saved (csrc/fused_linear.cpp says
  // where it is built at all):
  //   bias added when given; residual added after the ReLU (relu_add) or before it
  //   (residual_before_relu, add_relu); relu_mask packs !(pre-activation <= 0) 8 columns per byte,
  //   shape (rows, ceil(out_features / 8)) with rows = prod(leading dims); empty without ReLU.
  m.def(
      "fused_linear(Tensor[] inputs, Tensor weight, Tensor? bias, Tensor? residual, bool relu, "
      "bool residual_before_relu) -> (Tensor output, Tensor relu_mask)",
      {at::Tag::pt2_compliant_tag});
  // output_mask: one entry per input, then weight, bias, pre-activation; what is not asked for
  // comes back empty. grad_input is the gradient of cat(inputs, -1), (..., in_features): input
  // i's is its column block (autograd hands out views of it, as eager's cat backward does), zero
  // for an input not asked for. grad_preact (the output gradient through the ReLU) exists only
  // with ReLU.
  m.def(
      "fused_linear_backward(Tensor grad_output, Tensor[] inputs, Tensor weight, "
      "Tensor relu_mask, bool relu, bool[] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_preact)",
      {at::Tag::pt2_compliant_tag});
}

namespace fusedskip {

const c10::TypedOperatorHandle<decltype(fused_linear)>& fused_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedskip::fused_linear", "")
                             .typed<decltype(fused_linear)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(fused_linear_backward)>& fused_linear_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedskip::fused_linear_backward", "")
                             .typed<decltype(fused_linear_backward)>();
  return op;
}

}  // namespace fusedskip
