// CPU kernels: the element-wise passes of csrc/epilogue.h in one parallel sweep each, and the
// op's CPU registration (the GEMMs are ATen's, in csrc/fused_linear.cpp).
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "dispatch.h"
#include "fused_linear.h"

namespace fusedskip {
namespace {

// Enough elements per task that a tiny layer runs inline on the calling thread.
constexpr int64_t kElementsPerTask = 32768;

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_row));
}

}  // namespace

void forward_epilogue_cpu(const at::Tensor& gemm, const at::Tensor& out,
                          const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                          const at::Tensor& mask, Residual where) {
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t bytes_per_row = mask_bytes_per_row(cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_linear", [&] {
    auto run = [&]<typename gemm_t>() {
      ForwardEpilogueParams<scalar_t, gemm_t> p{};
      p.gemm = gemm.const_data_ptr<gemm_t>();
      p.out = out.data_ptr<scalar_t>();
      p.bias = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
      p.residual = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
      p.residual_stride_row = residual.defined() ? residual.stride(0) : 0;
      p.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
      p.rows = rows;
      p.cols = cols;
      FS_BOOL_SWITCH(mask.defined(), kRelu, [&] {
        FS_RESIDUAL_SWITCH(where, kResidual, [&] {
          FS_BOOL_SWITCH(has_bias, kBias, [&] {
            at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
              for (int64_t row = begin; row < end; ++row) {
                for (int64_t byte = 0; byte < bytes_per_row; ++byte) {
                  forward_epilogue_unit<kRelu, kResidual, kBias>(p, row, byte);
                }
              }
            });
          });
        });
      });
    };
    FS_GEMM_TYPE_SWITCH(gemm.scalar_type(), scalar_t, run);
  });
}

void backward_epilogue_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                           const at::Tensor& grad_preact, const at::Tensor& grad_bias) {
  const int64_t rows = grad_out.size(0), cols = grad_out.size(1);
  const int64_t bytes_per_row = mask_bytes_per_row(cols);
  const int64_t row_blocks = bias_row_blocks(rows);
  const bool relu = grad_preact.defined();
  const bool has_bias = grad_bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "fused_linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partials(has_bias ? row_blocks * cols : 0);
    BackwardEpilogueParams<scalar_t> p{};
    p.grad_out = grad_out.const_data_ptr<scalar_t>();
    p.grad_out_stride_row = grad_out.stride(0);
    p.grad_out_stride_col = grad_out.stride(1);
    p.mask = relu ? mask.const_data_ptr<uint8_t>() : nullptr;
    p.grad_preact = relu ? grad_preact.data_ptr<scalar_t>() : nullptr;
    p.bias_partials = has_bias ? partials.data() : nullptr;
    p.rows = rows;
    p.cols = cols;
    FS_BOOL_SWITCH(relu, kRelu, [&] {
      FS_BOOL_SWITCH(has_bias, kBias, [&] {
        const int64_t grain = grain_rows(kBiasRowsPerBlock * cols);
        at::parallel_for(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
          for (int64_t block = begin; block < end; ++block) {
            for (int64_t byte = 0; byte < bytes_per_row; ++byte) {
              backward_epilogue_unit<kRelu, kBias>(p, block, byte);
            }
          }
        });
      });
    });
    if (has_bias) {
      scalar_t* grad_bias_data = grad_bias.data_ptr<scalar_t>();
      at::parallel_for(0, cols, grain_rows(row_blocks), [&](int64_t begin, int64_t end) {
        for (int64_t col = begin; col < end; ++col) {
          bias_grad_unit<scalar_t>(p.bias_partials, row_blocks, cols, col, grad_bias_data);
        }
      });
    }
  });
}

TORCH_LIBRARY_IMPL(fusedskip, CPU, m) {
  m.impl("fused_linear", &fused_linear);
  m.impl("fused_linear_backward", &fused_linear_backward);
}

}  // namespace fusedskip
