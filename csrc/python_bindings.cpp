// The Python module fusedskip._C. Loading it registers the ops (static initialisers in the other
// files); it also holds the eager fast path of the functional API and the backend switch.
//
// Why a fast path: calling torch.ops.fusedskip.fused_linear from Python converts every argument
// to an IValue against the schema and goes through the boxed dispatcher, about 2 µs per call; at
// the small sizes of a skip-connection MLP that is more than the two element-wise kernels the
// fused op saves. This function unpacks the arguments directly and calls the same dispatcher entry
// unboxed, so every dispatch key (autograd, fake and proxy modes, CPU, CUDA) still applies.
// torch.compile traces the torch.ops entry instead (see fusedskip/functional.py).
#include <Python.h>

#include <cstring>
#include <initializer_list>

#include <c10/util/SmallVector.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "backend.h"
#include "fused_linear.h"

namespace fusedskip {
namespace {

// type(obj).__name__, as the Python checks name it: "ndarray", where tp_name is "numpy.ndarray".
const char* type_name(PyObject* obj) {
  const char* name = Py_TYPE(obj)->tp_name;
  const char* dot = std::strrchr(name, '.');
  return dot ? dot + 1 : name;
}

const at::Tensor& unpack_tensor(PyObject* obj, const char* name, Py_ssize_t index = -1) {
  if (!THPVariable_Check(obj)) {
    if (index >= 0) {
      TORCH_CHECK_TYPE(false, "fusedskip: ", name, "[", index, "] must be a Tensor, got ",
                       type_name(obj));
    }
    TORCH_CHECK_TYPE(false, "fusedskip: ", name, " must be a Tensor, got ", type_name(obj));
  }
  const at::Tensor& tensor = THPVariable_Unpack(obj);
  // A nested tensor would fail in the dispatcher (no kernel for its key) without naming the
  // argument; the op's own checks never see it.
  if (tensor.is_nested()) {
    if (index >= 0) {
      TORCH_CHECK_TYPE(false, "fusedskip: ", name, "[", index, "] is a nested tensor; pass a ",
                       "dense one (e.g. t.to_padded_tensor(0.0))");
    }
    TORCH_CHECK_TYPE(false, "fusedskip: ", name, " is a nested tensor; pass a dense one (e.g. ",
                     "t.to_padded_tensor(0.0))");
  }
  return tensor;
}

std::optional<at::Tensor> unpack_optional(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return unpack_tensor(obj, name);
}

// A bool and nothing else, as the schema's `bool` takes: truth-testing any object would read a
// str as true, and an object whose __bool__ raises as true with the exception left pending.
bool unpack_bool(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(obj), "fusedskip: ", name, " must be a bool, got ",
                   type_name(obj));
  return obj == Py_True;
}

// The tensor arguments of a call, unpacked from (inputs: list | tuple, weight, bias, residual).
struct CallArgs {
  c10::SmallVector<at::Tensor, kMaxInputs> inputs;
  at::Tensor weight;
  std::optional<at::Tensor> bias, residual;
};

CallArgs unpack_call(PyObject* const* args) {
  PyObject* sequence = args[0];
  TORCH_CHECK_TYPE(PyList_Check(sequence) || PyTuple_Check(sequence),
                   "fusedskip: inputs must be a list or tuple of tensors, got ",
                   type_name(sequence));
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
  PyObject** items = PySequence_Fast_ITEMS(sequence);
  const char* input_name = count == 1 ? "input" : "inputs";
  CallArgs call;
  for (Py_ssize_t i = 0; i < count; ++i) {
    call.inputs.push_back(unpack_tensor(items[i], input_name, count == 1 ? -1 : i));
  }
  call.weight = unpack_tensor(args[1], "weight");
  call.bias = unpack_optional(args[2], "bias");
  call.residual = unpack_optional(args[3], "residual");
  return call;
}

// fused_linear(inputs: list | tuple, weight, bias, residual, relu: bool, residual_before_relu:
// bool) -> output. The ReLU mask stays inside autograd; Python never sees it.
PyObject* fused_linear_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6, "fusedskip._C.fused_linear takes 6 arguments, got ", nargs);
  const CallArgs call = unpack_call(args);
  const bool relu = unpack_bool(args[4], "relu");
  const bool residual_before_relu = unpack_bool(args[5], "residual_before_relu");
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = std::get<0>(fused_linear_op().call(call.inputs, call.weight, call.bias,
                                                call.residual, relu, residual_before_relu));
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

bool has_symbolic_shape(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

bool has_symbolic_shape(const std::optional<at::Tensor>& t) {
  return t.has_value() && has_symbolic_shape(*t);
}

// check_args(inputs, weight, bias, residual) -> bool: the op's own argument checks, with its
// messages, and nothing else. The reference path (the modules' path off the GPU) runs them on
// every call: in Python they cost ~5 µs at 64x10->10, as much as half the layer's eager ops. False
// where they cannot run here (symbolic shapes): the caller then checks in Python.
PyObject* check_args_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "fusedskip._C.check_args takes 4 arguments, got ", nargs);
  const CallArgs call = unpack_call(args);
  bool symbolic = has_symbolic_shape(call.weight) || has_symbolic_shape(call.bias) ||
                  has_symbolic_shape(call.residual);
  for (const at::Tensor& x : call.inputs) symbolic = symbolic || has_symbolic_shape(x);
  if (symbolic) Py_RETURN_FALSE;
  check_forward_args(call.inputs, call.weight, call.bias, call.residual);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// widths_match(inputs: list | tuple, in_features: list | tuple of int) -> bool: whether there is
// one tensor per width, each as wide (its last dim; a 0-dim tensor is left to the op's checks).
// ConcatLinear checks its inputs against its declared widths on every call; in Python, one
// tensor's shape at a time, that cost ~2.5 µs a call of a two-input 64x10 layer. False for
// anything else (a non-tensor, a symbolic size, a mismatch): the caller then checks in Python,
// which names the problem.
PyObject* widths_match_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "fusedskip._C.widths_match takes 2 arguments, got ", nargs);
  PyObject* inputs = args[0];
  PyObject* widths = args[1];
  if (!(PyList_Check(inputs) || PyTuple_Check(inputs)) ||
      !(PyList_Check(widths) || PyTuple_Check(widths))) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
  if (count != PySequence_Fast_GET_SIZE(widths)) Py_RETURN_FALSE;
  PyObject** items = PySequence_Fast_ITEMS(inputs);
  PyObject** width_items = PySequence_Fast_ITEMS(widths);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(items[i]) || !PyLong_CheckExact(width_items[i])) Py_RETURN_FALSE;
    const at::Tensor& x = THPVariable_Unpack(items[i]);
    if (x.is_nested() || has_symbolic_shape(x)) Py_RETURN_FALSE;
    if (x.dim() == 0) continue;
    int overflow = 0;
    const long long width = PyLong_AsLongLongAndOverflow(width_items[i], &overflow);
    if (overflow != 0 || x.size(-1) != width) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// operands_fit(inputs: list | tuple, weight, residual, widths: list | tuple of int | None) ->
// bool: whether a layer's call is one the fused op takes as the plain ops would compute it:
// dense tensors of the weight's dtype, each input as wide as its entry of widths (where given),
// and a residual (or None) of the output's shape, not one to broadcast. fuse()'s layers ask it
// on every call (fusedskip/fuse.py); in Python the same reads cost ~3 us a call of a 64x10 layer
// on a CPU. False for anything else (autocast's casts, a symbolic size, a non-tensor): the
// caller then decides in Python.
PyObject* operands_fit_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "fusedskip._C.operands_fit takes 4 arguments, got ", nargs);
  PyObject* inputs = args[0];
  PyObject* widths = args[3];
  const bool no_residual = args[2] == Py_None, no_widths = widths == Py_None;
  if (!(PyList_Check(inputs) || PyTuple_Check(inputs)) || !THPVariable_Check(args[1]) ||
      !(no_residual || THPVariable_Check(args[2])) ||
      !(no_widths || PyList_Check(widths) || PyTuple_Check(widths))) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
  if (count < 1 || (!no_widths && count != PySequence_Fast_GET_SIZE(widths)) ||
      (!no_residual && count != 1)) {
    Py_RETURN_FALSE;
  }
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const auto plain = [&](const at::Tensor& t) {
    return t.layout() == at::kStrided && !t.is_nested() && !has_symbolic_shape(t) &&
           t.scalar_type() == weight.scalar_type();
  };
  if (!plain(weight) || weight.dim() != 2) Py_RETURN_FALSE;
  PyObject** items = PySequence_Fast_ITEMS(inputs);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(items[i])) Py_RETURN_FALSE;
    const at::Tensor& x = THPVariable_Unpack(items[i]);
    if (!plain(x) || x.dim() < 1) Py_RETURN_FALSE;
    if (!no_widths) {
      PyObject* width = PySequence_Fast_ITEMS(widths)[i];
      if (!PyLong_CheckExact(width)) Py_RETURN_FALSE;
      int overflow = 0;
      const long long value = PyLong_AsLongLongAndOverflow(width, &overflow);
      if (overflow != 0 || x.size(-1) != value) Py_RETURN_FALSE;
    }
  }
  if (no_residual) Py_RETURN_TRUE;
  const at::Tensor& input = THPVariable_Unpack(items[0]);
  const at::Tensor& residual = THPVariable_Unpack(args[2]);
  const int64_t leading = input.dim() - 1;
  if (!plain(residual) || residual.dim() != input.dim() ||
      residual.sizes().slice(0, leading) != input.sizes().slice(0, leading) ||
      residual.size(-1) != weight.size(0)) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _set_backend(name: str) / _get_backend() -> str: see csrc/backend.h.
PyObject* set_backend_py(PyObject* /*module*/, PyObject* name) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyUnicode_Check(name), "fusedskip: backend must be a str, got ",
                   type_name(name));
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(name, &size);
  if (text == nullptr) {  // a lone surrogate: no UTF-8 for it, so no backend's name either
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, "fusedskip: backend must be one of ", backend_choices(),
                      ", got a str that is not valid text");
  }
  set_backend(std::string(text, static_cast<size_t>(size)));  // with any embedded NUL
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// The first call reads FUSEDSKIP_BACKEND, whose warning (a bad value) becomes a Python warning
// here.
PyObject* get_backend_py(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(backend_name(current_backend()));
  END_HANDLE_TH_ERRORS
}

PyObject* fused_gemm_built_py(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(fused_gemm_built());
}

PyObject* fused_gemm_launches_py(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(fused_gemm_launches());
}

PyObject* concat_gemm_launches_py(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(concat_gemm_launches());
}

PyObject* grouped_gemm_launches_py(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(grouped_gemm_launches());
}

PyObject* backward_pass_runs_py(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(backward_pass_runs());
}

PyObject* fused_gemm_mask_layout_error_py(PyObject* /*module*/, PyObject* /*unused*/) {
#ifdef FUSEDSKIP_WITH_CUDA
  const std::string error = fused_gemm_mask_layout_error();
#else
  const std::string error = "the CUTLASS GEMM is not in this build";
#endif
  return PyUnicode_FromStringAndSize(error.data(), static_cast<Py_ssize_t>(error.size()));
}

PyObject* programmatic_launch_py(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
#ifdef FUSEDSKIP_WITH_CUDA
  return PyBool_FromLong(programmatic_launch_active());
#else
  Py_RETURN_FALSE;
#endif
  END_HANDLE_TH_ERRORS
}

// The element-wise pass hooks' arguments: a Tensor, or None for an undefined one; CPU tensors
// only (the hooks run the passes' CPU code).
at::Tensor tensor_or_none(PyObject* arg) {
  return arg == Py_None ? at::Tensor() : THPVariable_Unpack(arg);
}

void check_cpu_only(const char* hook, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.defined() || t.is_cpu(), "fusedskip._C.", hook, ": CPU tensors only");
  }
}

// _forward_epilogue(gemm, out, bias, residual, mask, residual_before_relu): test hook, the
// element-wise forward pass alone on CPU tensors (csrc/cpu/fused_linear_cpu.cpp): its row loops,
// or under the cuda_emulation backend the GPU's units (csrc/epilogue.h), which the op itself never
// reaches there (its forward is the native kernel's). bias, residual, mask: a Tensor or None.
PyObject* forward_epilogue_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]) &&
                       (args[2] == Py_None || THPVariable_Check(args[2])) &&
                       (args[3] == Py_None || THPVariable_Check(args[3])) &&
                       (args[4] == Py_None || THPVariable_Check(args[4])) && PyBool_Check(args[5]),
                   "fusedskip._C._forward_epilogue takes (gemm, out, bias, residual, mask: Tensor "
                   "or None, residual_before_relu: bool)");
  const at::Tensor gemm = THPVariable_Unpack(args[0]), out = THPVariable_Unpack(args[1]);
  const at::Tensor bias = tensor_or_none(args[2]), residual = tensor_or_none(args[3]),
                   mask = tensor_or_none(args[4]);
  // The pass's contract (csrc/fused_linear.h), checked: the hook takes tensors from tests only.
  check_cpu_only("_forward_epilogue", {gemm, out, bias, residual, mask});
  const bool half_out = out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16;
  TORCH_CHECK(gemm.dim() == 2 && gemm.is_contiguous() && out.is_contiguous() &&
                  out.sizes() == gemm.sizes() &&
                  at::isFloatingType(out.scalar_type()) &&
                  (gemm.scalar_type() == out.scalar_type() ||
                   (half_out && gemm.scalar_type() == at::kFloat)),
              "fusedskip._C._forward_epilogue: gemm and out must be contiguous tensors of one "
              "shape, gemm in out's floating dtype or (for a half type) float32");
  TORCH_CHECK(!bias.defined() || (bias.is_contiguous() && bias.dim() == 1 &&
                                  bias.size(0) == out.size(1) &&
                                  bias.scalar_type() == out.scalar_type()),
              "fusedskip._C._forward_epilogue: bias must be contiguous (cols) in out's dtype");
  TORCH_CHECK(!residual.defined() || (residual.sizes() == out.sizes() && residual.stride(1) == 1 &&
                                      residual.scalar_type() == out.scalar_type()),
              "fusedskip._C._forward_epilogue: residual must be out's shape and dtype, unit "
              "column stride");
  TORCH_CHECK(!mask.defined() ||
                  (mask.is_contiguous() && mask.scalar_type() == at::kByte &&
                   mask.sizes() == at::IntArrayRef({out.size(0), (out.size(1) + 7) / 8})),
              "fusedskip._C._forward_epilogue: mask must be contiguous uint8 (rows, ceil(cols/8))");
  const Residual where = !residual.defined() ? Residual::kNone
                         : mask.defined() && args[5] == Py_True ? Residual::kBeforeRelu
                                                               : Residual::kAfterRelu;
  forward_epilogue_cpu(gemm, out, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                       residual, mask, where);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _backward_epilogue(grad_out, mask, grad_preact, grad_bias): test hook, the element-wise
// backward pass alone on CPU tensors, as _forward_epilogue the forward's: its row loops, or under
// cuda_emulation the GPU's units, which the op reaches there only for a residual's gradient
// wanted alone (any other gradient takes the native kernel, which reads the mask itself).
// mask and grad_preact: both Tensors (the ReLU's) or both None; grad_bias: a Tensor or None.
PyObject* backward_epilogue_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4 && THPVariable_Check(args[0]) &&
                       (args[1] == Py_None || THPVariable_Check(args[1])) &&
                       (args[2] == Py_None || THPVariable_Check(args[2])) &&
                       (args[3] == Py_None || THPVariable_Check(args[3])),
                   "fusedskip._C._backward_epilogue takes (grad_out: Tensor, mask, grad_preact, "
                   "grad_bias: Tensor or None)");
  const at::Tensor grad_out = THPVariable_Unpack(args[0]);
  const at::Tensor mask = tensor_or_none(args[1]), grad_preact = tensor_or_none(args[2]),
                   grad_bias = tensor_or_none(args[3]);
  // The pass's contract (csrc/fused_linear.h), checked: the hook takes tensors from tests only.
  check_cpu_only("_backward_epilogue", {grad_out, mask, grad_preact, grad_bias});
  TORCH_CHECK(grad_out.dim() == 2 && at::isFloatingType(grad_out.scalar_type()),
              "fusedskip._C._backward_epilogue: grad_out must be a 2-D floating tensor");
  const int64_t rows = grad_out.size(0), cols = grad_out.size(1);
  TORCH_CHECK(mask.defined() == grad_preact.defined(),
              "fusedskip._C._backward_epilogue: mask and grad_preact go together (the ReLU's)");
  TORCH_CHECK(!mask.defined() ||
                  (mask.is_contiguous() && mask.scalar_type() == at::kByte &&
                   mask.sizes() == at::IntArrayRef({rows, (cols + 7) / 8})),
              "fusedskip._C._backward_epilogue: mask must be contiguous uint8 "
              "(rows, ceil(cols/8))");
  TORCH_CHECK(!grad_preact.defined() ||
                  (grad_preact.is_contiguous() && grad_preact.sizes() == grad_out.sizes() &&
                   grad_preact.scalar_type() == grad_out.scalar_type()),
              "fusedskip._C._backward_epilogue: grad_preact must be contiguous, grad_out's shape "
              "and dtype");
  TORCH_CHECK(!grad_bias.defined() || (grad_bias.is_contiguous() && grad_bias.dim() == 1 &&
                                       grad_bias.size(0) == cols &&
                                       grad_bias.scalar_type() == grad_out.scalar_type()),
              "fusedskip._C._backward_epilogue: grad_bias must be contiguous (cols) in "
              "grad_out's dtype");
  backward_epilogue_cpu(grad_out, mask, grad_preact, grad_bias);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _late_copy(src, dst, delay_ns): see csrc/backend.h.
PyObject* late_copy_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]) &&
                       PyLong_Check(args[2]),
                   "fusedskip._C._late_copy takes (src: Tensor, dst: Tensor, delay_ns: int)");
#ifdef FUSEDSKIP_WITH_CUDA
  const long long delay_ns = PyLong_AsLongLong(args[2]);
  if (delay_ns == -1 && PyErr_Occurred()) return nullptr;
  late_copy_cuda(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), delay_ns);
  Py_RETURN_NONE;
#else
  TORCH_CHECK(false, "fusedskip: _late_copy needs the CUDA build");
  return nullptr;
#endif
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_fused_gemm_built", fused_gemm_built_py, METH_NOARGS,
     "Whether the `cutlass` backend's sm_90a GEMM was compiled in."},
    {"_fused_gemm_launches", fused_gemm_launches_py, METH_NOARGS,
     "How many times the `cutlass` backend's forward GEMM has run in this process."},
    {"_concat_gemm_launches", concat_gemm_launches_py, METH_NOARGS,
     "How many times the `cutlass` backend's concat forward GEMM has run in this process."},
    {"_grouped_gemm_launches", grouped_gemm_launches_py, METH_NOARGS,
     "How many grouped GEMMs the `cutlass` backend's concat backward has launched."},
    {"_backward_pass_runs", backward_pass_runs_py, METH_NOARGS,
     "How many times the backward's element-wise pass has run in this process."},
    {"_fused_gemm_mask_layout_error", fused_gemm_mask_layout_error_py, METH_NOARGS,
     "Empty where the CUTLASS GEMM's mask store meets the register layout it assumes."},
    {"_programmatic_launch", programmatic_launch_py, METH_NOARGS,
     "Whether the library's kernels launch with programmatic dependent launch on this device."},
    {"_forward_epilogue",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_epilogue_py)),
     METH_FASTCALL, "Test hook: the element-wise forward pass alone, on CPU tensors."},
    {"_backward_epilogue",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(backward_epilogue_py)),
     METH_FASTCALL, "Test hook: the element-wise backward pass alone, on CPU tensors."},
    {"_late_copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(late_copy_py)),
     METH_FASTCALL, "Test hook: copies src into dst, late, letting the next kernel launch early."},
    {"_set_backend", set_backend_py, METH_O, "Chooses the op's backend (csrc/backend.h)."},
    {"_get_backend", get_backend_py, METH_NOARGS, "The op's current backend."},
    {"fused_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_linear_py)),
     METH_FASTCALL, "Eager entry of fusedskip::fused_linear; returns the output only."},
    {"check_args", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(check_args_py)),
     METH_FASTCALL, "The argument checks of fusedskip::fused_linear; False: not checked here."},
    {"widths_match", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(widths_match_py)),
     METH_FASTCALL, "Whether each input is a tensor as wide as its entry of in_features."},
    {"operands_fit", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(operands_fit_py)),
     METH_FASTCALL, "Whether the fused op takes a layer's call as the plain ops compute it."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedskip

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fusedskip::methods};
  return PyModule_Create(&module_def);
}
