// fusedskip._cutlass_configs: the `cutlass` backend's kernel at several tile and cluster shapes,
// for benchmarks/cutlass_configs.py. Built only on request (FUSEDSKIP_CUTLASS_CONFIGS=1; see
// setup.py); the library itself uses one configuration (csrc/cuda/fused_gemm_sm90.cuh).
#include <torch/extension.h>

#include <vector>

#include "configs.h"

namespace fusedskip::configs {
Entry cooperative_128x128_cluster_2x1();
Entry cooperative_128x256_cluster_2x1();
Entry cooperative_128x256_cluster_1x2();
Entry cooperative_256x128_cluster_2x1();
Entry cooperative_256x128_cluster_1x2();
Entry pingpong_128x128_cluster_2x1();
Entry pingpong_64x256_cluster_1x2();
Entry cooperative_128x256_cluster_2x1_source4_own();
Entry cooperative_128x256_cluster_2x1_source8_own();

namespace {
const std::vector<Entry>& entries() {
  static const std::vector<Entry> all = {
      cooperative_128x256_cluster_2x1(),
      cooperative_128x128_cluster_2x1(),
      cooperative_128x256_cluster_1x2(),
      cooperative_256x128_cluster_2x1(),
      cooperative_256x128_cluster_1x2(),
      pingpong_128x128_cluster_2x1(),
      pingpong_64x256_cluster_1x2(),
      cooperative_128x256_cluster_2x1_source4_own(),
      cooperative_128x256_cluster_2x1_source8_own(),
  };
  return all;
}

const Entry& find(const std::string& name) {
  for (const Entry& entry : entries()) {
    if (entry.name == name) {
      TORCH_CHECK(entry.fused != nullptr, "fusedskip: built without CUTLASS: no ", name);
      return entry;
    }
  }
  TORCH_CHECK_VALUE(false, "fusedskip: no configuration named '", name, "'");
}

Order order_of(int swizzle, const std::string& raster) {
  TORCH_CHECK_VALUE(swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8,
                    "fusedskip: swizzle must be 1, 2, 4 or 8, got ", swizzle);
  const std::vector<std::string> rasters = {"heuristic", "along_m", "along_n"};
  for (size_t i = 0; i < rasters.size(); ++i) {
    if (raster == rasters[i]) return {swizzle, static_cast<int>(i)};
  }
  TORCH_CHECK_VALUE(false, "fusedskip: raster must be 'heuristic', 'along_m' or 'along_n', got '",
                    raster, "'");
}

// What TMA and the kernels need; the benchmark makes its operands this way.
void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
                        t.is_contiguous(),
                    "fusedskip: ", what, " must be a contiguous 2-D bfloat16 CUDA tensor");
}
}  // namespace
}  // namespace fusedskip::configs

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedskip::configs;
  m.def("names", [] {
    std::vector<std::string> names;
    for (const Entry& entry : entries()) names.push_back(entry.name);
    return names;
  }, "The configurations, the library's first.");
  m.def("mask_layout_error", [](const std::string& name) { return find(name).mask_layout_error(); },
        "Empty where the mask store's register layout assumption holds (a host check).");
  m.def("relu_add", [](const std::string& name, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& out,
                       const at::Tensor& mask, int swizzle, const std::string& raster) {
    const Entry& entry = find(name);
    const Order order = order_of(swizzle, raster);
    for (const auto& [t, what] : {std::pair{x, "x"}, {weight, "weight"}, {residual, "residual"},
                                  {out, "out"}}) {
      check(t, what);
    }
    TORCH_CHECK_VALUE(!bias.defined() || (bias.is_cuda() && bias.scalar_type() == at::kBFloat16 &&
                                           bias.dim() == 1 && bias.size(0) == weight.size(0) &&
                                           bias.is_contiguous()),
                      "fusedskip: bias must be a contiguous bfloat16 CUDA tensor (out_features,)");
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                          mask.size(0) == x.size(0) && mask.size(1) * 8 == weight.size(0),
                      "fusedskip: mask must be contiguous uint8 (rows, out_features / 8)");
    return entry.fused(x, weight, bias, residual, out, mask, order);
  }, "relu(x W^T + bias) + residual into out, and its mask; false where it does not apply.",
        py::arg("name"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("out"), py::arg("mask"), py::arg("swizzle") = 1, py::arg("raster") = "heuristic");
  m.def("gemm", [](const std::string& name, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& out, int swizzle, const std::string& raster) {
    const Entry& entry = find(name);
    const Order order = order_of(swizzle, raster);
    check(x, "x");
    check(weight, "weight");
    check(out, "out");
    return entry.plain(x, weight, out, order);
  }, "x W^T into out with the same mainloop and no fusion; false where it does not apply.",
        py::arg("name"), py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("swizzle") = 1,
        py::arg("raster") = "heuristic");
}
