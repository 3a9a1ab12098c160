// The fused linear op, device-generic part: argument checks, then one of four paths
// (csrc/backend.cpp chooses, GemmPath): the native kernel (GEMM and epilogue in one launch), the
// CPU direct loops, the library GEMMs (ATen: MKL/oneDNN on CPU, cuBLAS on CUDA) followed by the
// device's element-wise pass, or on sm_90 the CUTLASS GEMM with the epilogue inside (where it
// does not apply, as the library path).
//
// The concat form: the native kernel and the CPU loops never materialise cat(inputs) (input i
// multiplies weight's column block i, accumulating on chip / in registers; in backward each
// input's gradient, a column block of the cat's, and each weight-gradient column block is
// written in place). The library path's forward builds it, transiently, for one GEMM over it
// (concat_for_gemm); its backward runs one GEMM for the cat's gradient, and one per weight-gradient
// block where the blocks are aligned (library_gemm_per_block), else one over the cat. With the
// cutlass backend, CUTLASS kernels that take the inputs one by one come first, where they apply.
#include "fused_linear.h"

#include "backend.h"

#include <cctype>
#include <ostream>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace fusedskip {
namespace {

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // the rest are named as in Python, in lower case: torch.float8_e4m3fn, torch.qint8
      std::string name = c10::toString(type);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

// As Python prints them (c10 prints "Sparse", "SparseCsr", ...).
std::string layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: {
      std::ostringstream out;
      out << layout;
      return out.str();
    }
  }
}

// An argument's name for messages, formatted only when a check fails (no string building on the
// hot path): "weight", "input", "inputs[2]".
struct ArgName {
  const char* name;
  int64_t index = -1;
};

std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  out << arg.name;
  if (arg.index >= 0) out << "[" << arg.index << "]";
  return out;
}

ArgName input_arg(size_t i, size_t count) {
  return count == 1 ? ArgName{"input"} : ArgName{"inputs", static_cast<int64_t>(i)};
}

// A tensor argument that must match `weight` in device, and in dtype unless same_dtype is false.
void check_tensor(const ArgName& name, const at::Tensor& tensor, const at::Tensor& weight,
                  bool same_dtype = true) {
  TORCH_CHECK_VALUE(tensor.defined(), "fusedskip: ", name, " is an undefined tensor");
  TORCH_CHECK_TYPE(tensor.layout() == at::kStrided, "fusedskip: ", name,
                   " must be a dense (strided) tensor, got layout ", layout_name(tensor.layout()));
  TORCH_CHECK_TYPE(is_supported_dtype(tensor.scalar_type()), "fusedskip: ", name, " has dtype ",
                   dtype_name(tensor.scalar_type()),
                   "; expected torch.float16, torch.bfloat16, torch.float32 or torch.float64");
  if (&tensor == &weight) return;
  TORCH_CHECK_TYPE(!same_dtype || tensor.scalar_type() == weight.scalar_type(), "fusedskip: ", name,
                   " has dtype ", dtype_name(tensor.scalar_type()), " but weight has dtype ",
                   dtype_name(weight.scalar_type()), "; all tensors must share one dtype");
  TORCH_CHECK(tensor.device() == weight.device(), "fusedskip: ", name, " is on device ",
              tensor.device(), " but weight is on ", weight.device(),
              "; all tensors must be on one device");
}

}  // namespace

void check_autocast_operands(at::TensorList inputs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::DeviceType device) {
  std::optional<ArgName> wide, narrow;
  at::ScalarType narrow_dtype = at::kFloat;
  const auto look = [&](const ArgName& name, const at::Tensor& t) {
    if (!t.defined() || !t.is_floating_point() || t.device().type() != device) return;
    if (t.scalar_type() == at::kDouble) {
      if (!wide) wide = name;
    } else if (!narrow) {
      narrow = name;
      narrow_dtype = t.scalar_type();
    }
  };
  for (size_t i = 0; i < inputs.size(); ++i) look(input_arg(i, inputs.size()), inputs[i]);
  look({"weight"}, weight);
  if (bias.has_value()) look({"bias"}, *bias);
  TORCH_CHECK_TYPE(!wide || !narrow, "fusedskip: under torch.autocast, ", *narrow, " (",
                   dtype_name(narrow_dtype), ") is cast to ",
                   dtype_name(at::autocast::get_autocast_dtype(device)), " but ", *wide,
                   " is torch.float64, which autocast leaves alone; pass the inputs, weight and "
                   "bias all as float64, or none of them");
}

void check_forward_shapes(at::TensorList inputs, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual) {
  const int64_t count = static_cast<int64_t>(inputs.size());
  TORCH_CHECK_VALUE(count >= 1 && count <= kMaxInputs, "fusedskip: inputs must hold 1 to ",
                    kMaxInputs, " tensors, got ", count);
  check_tensor({"weight"}, weight, weight);
  TORCH_CHECK_VALUE(weight.dim() == 2,
                    "fusedskip: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sym_sizes());

  const c10::SymIntArrayRef leading = inputs[0].defined() && inputs[0].dim() >= 1
                                          ? inputs[0].sym_sizes().slice(0, inputs[0].dim() - 1)
                                          : c10::SymIntArrayRef();
  c10::SymDimVector widths;
  c10::SymInt width_sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& x = inputs[i];
    check_tensor(input_arg(i, count), x, weight);
    TORCH_CHECK_VALUE(x.dim() >= 1, "fusedskip: ", input_arg(i, count),
                      " must have at least one dimension (..., in_features), got a 0-d tensor");
    const c10::SymIntArrayRef x_leading = x.sym_sizes().slice(0, x.dim() - 1);
    TORCH_CHECK_VALUE(x_leading.equals(leading), "fusedskip: ", input_arg(i, count),
                      " has leading dims ", x_leading, " but inputs[0] has ", leading,
                      "; all inputs must share their leading dims (only the last dim may differ)");
    widths.push_back(x.sym_size(-1));
    width_sum += x.sym_size(-1);
  }
  if (count == 1) {
    TORCH_CHECK_VALUE(width_sum == weight.sym_size(1), "fusedskip: input has ", width_sum,
                      " features (its last dim) but weight has in_features ", weight.sym_size(1),
                      " (weight shape ", weight.sym_sizes(), ")");
  } else {
    TORCH_CHECK_VALUE(width_sum == weight.sym_size(1), "fusedskip: the inputs' last dims ",
                      c10::SymIntArrayRef(widths), " sum to ", width_sum,
                      " but weight has in_features ", weight.sym_size(1), " (weight shape ",
                      weight.sym_sizes(), ")");
  }
  if (bias.has_value() && bias->defined()) {
    check_tensor({"bias"}, *bias, weight);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0),
                      "fusedskip: bias must have shape [", weight.sym_size(0),
                      "] (out_features), got ", bias->sym_sizes());
  }
  if (residual.has_value() && residual->defined()) {
    c10::SymDimVector out_shape(leading.begin(), leading.end());
    out_shape.push_back(weight.sym_size(0));
    check_residual(*residual, weight, out_shape);
  }
}

Geometry check_forward_args(at::TensorList inputs, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual) {
  check_forward_shapes(inputs, weight, bias, residual);
  Geometry g;
  g.cols = weight.size(0);
  const at::IntArrayRef leading = inputs[0].sizes().slice(0, inputs[0].dim() - 1);
  for (const at::Tensor& x : inputs) g.widths.push_back(x.size(-1));
  g.rows = c10::multiply_integers(leading);
  g.out_shape.assign(leading.begin(), leading.end());
  g.out_shape.push_back(g.cols);
  return g;
}

void check_residual(const at::Tensor& residual, const at::Tensor& weight,
                    c10::SymIntArrayRef out_shape, bool same_dtype) {
  check_tensor({"residual"}, residual, weight, same_dtype);
  TORCH_CHECK_VALUE(residual.sym_sizes().equals(out_shape),
                    "fusedskip: residual must have the output's shape ", out_shape, ", got ",
                    residual.sym_sizes(), " (residuals are not broadcast)");
}

Residual residual_kind(bool has_residual, bool relu, bool residual_before_relu) {
  if (!has_residual) return Residual::kNone;
  // Without a ReLU both orders are the same sum.
  return relu && residual_before_relu ? Residual::kBeforeRelu : Residual::kAfterRelu;
}

namespace {

void forward_epilogue(const at::Tensor& gemm, const at::Tensor& out,
                      const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                      const at::Tensor& mask, Residual where) {
#ifdef FUSEDSKIP_WITH_CUDA
  if (out.is_cuda()) return forward_epilogue_cuda(gemm, out, bias, residual, mask, where);
#endif
  TORCH_CHECK(out.is_cpu(), "fusedskip: no element-wise kernel for device ", out.device());
  forward_epilogue_cpu(gemm, out, bias, residual, mask, where);
}

void backward_epilogue(const at::Tensor& grad_out, const at::Tensor& mask,
                       const at::Tensor& grad_preact, const at::Tensor& grad_bias) {
  count_backward_pass_run();
#ifdef FUSEDSKIP_WITH_CUDA
  if (grad_out.is_cuda()) return backward_epilogue_cuda(grad_out, mask, grad_preact, grad_bias);
#endif
  TORCH_CHECK(grad_out.is_cpu(), "fusedskip: no element-wise kernel for device ",
              grad_out.device());
  backward_epilogue_cpu(grad_out, mask, grad_preact, grad_bias);
}

void tile_forward(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& residual_2d,
                  const at::Tensor& out, const at::Tensor& mask, Residual where) {
#ifdef FUSEDSKIP_WITH_CUDA
  if (out.is_cuda()) return tile_forward_cuda(inputs_2d, weight, bias, residual_2d, out, mask, where);
#endif
  TORCH_CHECK(out.is_cpu(), "fusedskip: no native kernel for device ", out.device());
  tile_forward_emulated(inputs_2d, weight, bias, residual_2d, out, mask, where);
}

void tile_backward(const at::Tensor& grad_out, const at::Tensor& mask,
                   const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight,
                   const std::vector<at::Tensor>& grad_inputs_2d, const at::Tensor& grad_weight,
                   const at::Tensor& grad_bias, const at::Tensor& grad_preact) {
#ifdef FUSEDSKIP_WITH_CUDA
  if (weight.is_cuda()) {
    return tile_backward_cuda(grad_out, mask, inputs_2d, weight, grad_inputs_2d, grad_weight,
                              grad_bias, grad_preact);
  }
#endif
  TORCH_CHECK(weight.is_cpu(), "fusedskip: no native kernel for device ", weight.device());
  tile_backward_emulated(grad_out, mask, inputs_2d, weight, grad_inputs_2d, grad_weight,
                         grad_bias, grad_preact);
}

at::Tensor empty_placeholder(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Views cost a dispatch each: at the small sizes that are launch-bound, skip the ones that would
// change nothing.
at::Tensor as_2d(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

at::Tensor as_shape(const at::Tensor& t, at::IntArrayRef shape) {
  return t.sizes().equals(shape) ? t : t.view(shape);
}

// Columns [offset, offset + width) of a 2-D tensor.
at::Tensor column_block(const at::Tensor& t, int64_t offset, int64_t width) {
  return offset == 0 && width == t.size(1) ? t : t.narrow(1, offset, width);
}

// The epilogues read the residual's rows with unit column stride (a copy only for
// column-strided views).
at::Tensor residual_rows(const std::optional<at::Tensor>& residual, const Geometry& g) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  at::Tensor residual_2d = as_2d(*residual, g.rows, g.cols);
  return residual_2d.stride(1) == 1 ? residual_2d : residual_2d.contiguous();
}

// The library GEMMs take several inputs as one: cat(inputs) (a copy, one pass over the inputs;
// freed when the GEMM is done, never saved for backward). One GEMM per input would instead
// either round each block's product (half types accumulating in the output dtype) or need
// float32 copies of the operands, and cuBLAS runs blocks of odd width far below its speed
// (measured on an H200: benchmarks/NOTES.md, "Concat on the cuBLAS path").
at::Tensor concat_for_gemm(const std::vector<at::Tensor>& inputs_2d) {
  return inputs_2d.size() == 1 ? inputs_2d[0] : at::cat(inputs_2d, 1);
}

// The library path's input and weight gradients, into the defined grad_inputs_2d[i] (column
// blocks of grad_input_2d, the gradient of the cat) and grad_weight.
void library_backward_gemms(const at::Tensor& grad_preact, const std::vector<at::Tensor>& inputs_2d,
                            const at::Tensor& weight, const Geometry& g,
                            const at::Tensor& grad_input_2d,
                            const std::vector<at::Tensor>& grad_inputs_2d,
                            const at::Tensor& grad_weight) {
  const size_t count = inputs_2d.size();
#ifdef FUSEDSKIP_WITH_CUDA
  if (cutlass_concat_wanted(weight, g) &&
      grouped_backward_gemms_cuda(grad_preact, inputs_2d, weight, grad_inputs_2d, grad_weight)) {
    return;
  }
#endif
  bool want_every_input = true, want_any_input = false;
  for (const at::Tensor& grad : grad_inputs_2d) {
    want_every_input &= grad.defined();
    want_any_input |= grad.defined();
  }
  // The weight's own layout matters only where an input's gradient reads it; elsewhere it may be
  // a stand-in of its shape (csrc/autograd.cpp: zero strides, on no 16-byte word), and the
  // weight-gradient blocks the GEMMs write are grad_weight's, new and contiguous.
  const at::Tensor& weight_layout = want_any_input || !grad_weight.defined() ? weight : grad_weight;
  const bool per_block = count > 1 && library_gemm_per_block(inputs_2d, weight_layout);
  if (per_block && !want_every_input) {
    // Aligned blocks, some not wanted: the wanted ones, one GEMM each.
    int64_t offset = 0;
    for (size_t i = 0; i < count; ++i) {
      if (grad_inputs_2d[i].defined()) {
        at::Tensor block = grad_inputs_2d[i];
        at::mm_out(block, grad_preact, weight.narrow(1, offset, g.widths[i]));
      }
      offset += g.widths[i];
    }
  } else if (grad_input_2d.defined()) {
    // One GEMM over the whole width, as eager's linear computes the cat's gradient, each input's
    // a column block of it (no copies; the caller zeroes any block not asked for). Per block,
    // each GEMM ends in a partly filled wave of tiles: on an H100, concat2
    // 8192x(1360+2736)->4096, 389.8 us for the two blocks' against 365.5 for eager's one
    // (benchmarks/NOTES.md, "Concat on the cuBLAS path").
    at::Tensor out = grad_input_2d;
    at::mm_out(out, grad_preact, weight);
  }
  if (!grad_weight.defined()) return;
  if (count == 1 || per_block) {
    // Each weight-gradient column block written in place by its own GEMM: no cat.
    int64_t offset = 0;
    for (size_t i = 0; i < count; ++i) {
      at::Tensor block = count == 1 ? grad_weight : grad_weight.narrow(1, offset, g.widths[i]);
      at::mm_out(block, grad_preact.t(), inputs_2d[i]);
      offset += g.widths[i];
    }
    return;
  }
  // Misaligned or narrow blocks: one GEMM over a transient cat, as for the forward.
  at::Tensor out = grad_weight;
  at::mm_out(out, grad_preact.t(), concat_for_gemm(inputs_2d));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_linear(at::TensorList inputs, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual,
                                                bool relu, bool residual_before_relu) {
  const Geometry g = check_forward_args(inputs, weight, bias, residual);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  const Residual where = residual_kind(has_residual, relu, residual_before_relu);

  std::vector<at::Tensor> inputs_2d;
  inputs_2d.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) inputs_2d.push_back(as_2d(inputs[i], g.rows, g.widths[i]));

  const auto mask_options = weight.options().dtype(at::kByte);
  at::Tensor mask = relu ? at::empty({g.rows, mask_bytes_per_row(g.cols)}, mask_options)
                         : at::empty({0}, mask_options);
  if (g.rows == 0 || g.cols == 0) {
    // Nothing to compute (an expert given no tokens): no path may touch the weight, which the
    // CPU loops would copy whole first.
    return {at::empty(g.out_shape, weight.options()), mask};
  }
  const GemmPath path = choose_gemm_path(weight, g);
  if (path == GemmPath::kTiles) {
    at::Tensor out = at::empty({g.rows, g.cols}, weight.options());
    std::optional<at::Tensor> bias_contiguous;
    if (has_bias) bias_contiguous = bias->contiguous();
    tile_forward(inputs_2d, weight, bias_contiguous, residual_rows(residual, g), out,
                 relu ? mask : at::Tensor(), where);
    return {as_shape(out, g.out_shape), mask};
  }

  at::Tensor gemm;
  // Where the bias joins: inside the GEMM (ATen's addmm, as F.linear does: x W^T + b rounded
  // once to the output dtype) or in the element-wise pass (when x W^T is kept in float32).
  bool bias_in_gemm = false;
  if (path == GemmPath::kCpuLoops) {
    gemm = direct_gemm_forward_cpu(inputs_2d, weight, g);  // in opmath: rounded once, below
  } else {
#ifdef FUSEDSKIP_WITH_CUDA
    // Its epilogue has no residual (the public API's concat layers take none).
    if (path == GemmPath::kFusedGemm && !has_residual && cutlass_concat_wanted(weight, g)) {
      at::Tensor out = at::empty({g.rows, g.cols}, weight.options());
      if (concat_gemm_forward_cuda(inputs_2d, weight, bias, out, relu ? mask : at::Tensor())) {
        return {as_shape(out, g.out_shape), mask};
      }
    }
#endif
    const at::Tensor x = concat_for_gemm(inputs_2d);
#ifdef FUSEDSKIP_WITH_CUDA
    if (path == GemmPath::kFusedGemm && relu) {
      at::Tensor out = at::empty({g.rows, g.cols}, weight.options());
      if (fused_gemm_forward_cuda(x, weight, bias, residual_rows(residual, g), out, mask, where)) {
        return {as_shape(out, g.out_shape), mask};
      }
    }
#endif
    bias_in_gemm = has_bias;
    gemm = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  const bool gemm_is_out = gemm.scalar_type() == weight.scalar_type();
  at::Tensor out = gemm_is_out ? gemm : at::empty({g.rows, g.cols}, weight.options());

  const bool epilogue_bias = has_bias && !bias_in_gemm;
  if (relu || epilogue_bias || has_residual) {
    std::optional<at::Tensor> bias_contiguous;
    if (epilogue_bias) bias_contiguous = bias->contiguous();
    forward_epilogue(gemm, out, bias_contiguous, residual_rows(residual, g),
                     relu ? mask : at::Tensor(), where);
  } else if (!gemm_is_out) {
    out.copy_(gemm);
  }
  return {as_shape(out, g.out_shape), mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, at::TensorList inputs, const at::Tensor& weight,
    const at::Tensor& relu_mask, bool relu, const c10::List<bool>& output_mask) {
  const Geometry g = check_forward_args(inputs, weight, std::nullopt, std::nullopt);
  const size_t count = inputs.size();
  TORCH_CHECK_VALUE(output_mask.size() == count + 3, "fusedskip: output_mask must have ",
                    count + 3, " entries (one per input, then weight, bias, pre-activation), got ",
                    output_mask.size());
  check_tensor({"grad_output"}, grad_output, weight);
  TORCH_CHECK_VALUE(grad_output.sizes().equals(g.out_shape), "fusedskip: grad_output must have ",
                    "the output's shape ", at::IntArrayRef(g.out_shape), ", got ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(relu_mask.defined() || !relu, "fusedskip: relu_mask is None but relu is ",
                    "True; pass the mask fused_linear returned with the output");
  // Checked also where relu is False and the mask goes unread (the forward then returns an empty
  // one of the same kind): a sparse or quantized tensor sends the call to a key whose kernel is
  // these checks alone (FUSEDSKIP_REFUSE_LAYOUT below), and one must refuse it.
  if (relu_mask.defined()) {
    TORCH_CHECK_TYPE(relu_mask.layout() == at::kStrided, "fusedskip: relu_mask must be a dense ",
                     "(strided) tensor, got layout ", layout_name(relu_mask.layout()));
    TORCH_CHECK_TYPE(relu_mask.scalar_type() == at::kByte, "fusedskip: relu_mask must be ",
                     "torch.uint8, got ", dtype_name(relu_mask.scalar_type()));
    TORCH_CHECK(relu_mask.device() == weight.device(), "fusedskip: relu_mask is on device ",
                relu_mask.device(), " but weight is on ", weight.device());
  }
  at::Tensor mask;
  if (relu) {
    const std::vector<int64_t> mask_shape = {g.rows, mask_bytes_per_row(g.cols)};
    TORCH_CHECK_VALUE(relu_mask.sizes().equals(mask_shape), "fusedskip: relu_mask must have ",
                      "shape ", at::IntArrayRef(mask_shape), ", got ", relu_mask.sizes());
    mask = relu_mask.contiguous();
  }
  const bool want_weight = output_mask.get(count);
  const bool want_bias = output_mask.get(count + 1);
  const bool want_preact = output_mask.get(count + 2);

  const at::Tensor grad_out_2d = as_2d(grad_output, g.rows, g.cols);
  const GemmPath path = choose_gemm_path(weight, g);
  bool want_any_input = false;
  // Whether a wanted GEMM of the backward reads all of G: the bias gradient's, or an input's or
  // a weight block's of non-zero width (a block 0 wide has no tiles).
  bool some_gemm_reads_g = want_bias;
  for (size_t i = 0; i < count; ++i) {
    want_any_input = want_any_input || output_mask.get(i);
    some_gemm_reads_g =
        some_gemm_reads_g || ((output_mask.get(i) || want_weight) && g.widths[i] > 0);
  }
  // The native kernel reads grad_output through the mask and sums the bias gradient itself: the
  // whole backward in one launch. Where the pre-activation gradient is itself an output (the
  // residual of add_relu needs it), the blocks that load it store it too; only where no GEMM
  // reads it (the residual's gradient alone, or beside 0-wide blocks) does the element-wise pass
  // write it.
  // Not with TF32: the bias gradient would then be summed from TF32-rounded operands (relative
  // error ~1e-4), where torch sums it in full float32.
  const bool tf32 = weight.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();
  const bool tiles_take_mask =
      path == GemmPath::kTiles && !tf32 && (!(relu && want_preact) || some_gemm_reads_g);
  const bool pass_writes_preact = relu && !tiles_take_mask;  // the GEMMs' operand, then
  const at::Tensor grad_preact_2d =
      relu && (want_preact || pass_writes_preact) ? at::empty({g.rows, g.cols}, weight.options())
                                                  : grad_out_2d;
  const at::Tensor grad_bias = want_bias ? at::empty({g.cols}, weight.options()) : at::Tensor();
  if (!tiles_take_mask && (relu || want_bias)) {
    backward_epilogue(grad_out_2d, mask, pass_writes_preact ? grad_preact_2d : at::Tensor(),
                      grad_bias);
  }

  // The inputs' gradients are column blocks of one: the cat's (rows, in_features), as eager's
  // linear computes it; the weight's is (cols, in_features).
  std::vector<at::Tensor> grad_inputs_2d, inputs_2d;
  c10::SmallVector<int64_t, 6> input_shape = g.out_shape;
  input_shape.back() = weight.size(1);
  const at::Tensor grad_input =
      want_any_input ? at::empty(input_shape, weight.options()) : empty_placeholder(weight);
  const at::Tensor grad_input_2d =
      want_any_input ? as_2d(grad_input, g.rows, weight.size(1)) : at::Tensor();
  int64_t offset = 0;
  for (size_t i = 0; i < count; ++i) {
    inputs_2d.push_back(as_2d(inputs[i], g.rows, g.widths[i]));
    grad_inputs_2d.push_back(output_mask.get(i) ? column_block(grad_input_2d, offset, g.widths[i])
                                                : at::Tensor());
    offset += g.widths[i];
  }
  const at::Tensor grad_weight =
      want_weight ? at::empty({g.cols, weight.size(1)}, weight.options()) : at::Tensor();
  if (tiles_take_mask) {
    tile_backward(grad_out_2d, relu ? mask : at::Tensor(), inputs_2d, weight, grad_inputs_2d,
                  grad_weight, grad_bias, relu && want_preact ? grad_preact_2d : at::Tensor());
  } else if (path == GemmPath::kTiles) {
    tile_backward(grad_preact_2d, at::Tensor(), inputs_2d, weight, grad_inputs_2d, grad_weight,
                  at::Tensor(), at::Tensor());
  } else if (path == GemmPath::kCpuLoops) {
    direct_gemm_backward_cpu(grad_preact_2d, inputs_2d, weight, g, grad_inputs_2d, grad_weight);
  } else {
    library_backward_gemms(grad_preact_2d, inputs_2d, weight, g, grad_input_2d, grad_inputs_2d,
                           grad_weight);
  }
  if (want_any_input) {
    offset = 0;
    for (size_t i = 0; i < count; ++i) {
      if (!output_mask.get(i)) column_block(grad_input_2d, offset, g.widths[i]).zero_();
      offset += g.widths[i];
    }
  }
  return {grad_input, want_weight ? grad_weight : empty_placeholder(weight),
          want_bias ? grad_bias : empty_placeholder(weight),
          relu && want_preact ? as_shape(grad_preact_2d, grad_output.sizes())
                              : empty_placeholder(weight)};
}

// Sparse, MKL-DNN and quantized tensors dispatch to their own keys; there the op only runs its
// checks, which refuse them with a message naming the argument (instead of the dispatcher's "no
// kernel" error).
#define FUSEDSKIP_REFUSE_LAYOUT(key)                                  \
  TORCH_LIBRARY_IMPL(fusedskip, key, m) {                              \
    m.impl("fused_linear", &fused_linear);                             \
    m.impl("fused_linear_backward", &fused_linear_backward);           \
  }
FUSEDSKIP_REFUSE_LAYOUT(SparseCPU)
FUSEDSKIP_REFUSE_LAYOUT(SparseCUDA)
FUSEDSKIP_REFUSE_LAYOUT(SparseCsrCPU)
FUSEDSKIP_REFUSE_LAYOUT(SparseCsrCUDA)
FUSEDSKIP_REFUSE_LAYOUT(MkldnnCPU)
FUSEDSKIP_REFUSE_LAYOUT(QuantizedCPU)
FUSEDSKIP_REFUSE_LAYOUT(QuantizedCUDA)
#undef FUSEDSKIP_REFUSE_LAYOUT

}  // namespace fusedskip
