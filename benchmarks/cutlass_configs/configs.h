// A configuration of the `cutlass` backend's kernel, as benchmarks/cutlass_configs.py sees it:
// its name and entry points. configs.cuh makes one from a tile and cluster shape, and with
// FUSEDSKIP_SOURCE_CONFIG from a residual (source) pipeline setting too.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace fusedskip::configs {

// The persistent scheduler's tile order (sm90::TileOrder): swizzle 1, 2, 4 or 8; raster 0
// (CUTLASS's heuristic), 1 (along M) or 2 (along N).
struct Order {
  int swizzle = 1;
  int raster = 0;
};

struct Entry {
  std::string name;
  // relu_add, bfloat16: out = relu(x W^T + bias) + residual, mask as the op's. False where the
  // kernel does not take these operands.
  bool (*fused)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                const at::Tensor& residual, const at::Tensor& out, const at::Tensor& mask,
                Order order);
  // out = x W^T, bfloat16.
  bool (*plain)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
                Order order);
  // Empty where the mask store's layout assumption holds for this configuration.
  std::string (*mask_layout_error)();
};

}  // namespace fusedskip::configs
