// Runtime choices -> compile-time template parameters, one small switch each (no kernel copies).
//
//   FS_BOOL_SWITCH(has_bias, kBias, [&] { launch<kBias>(...); });
#pragma once

#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "epilogue.h"

#define FS_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                    \
    }                                          \
  }()

#define FS_RESIDUAL_SWITCH(VALUE, CONST_NAME, ...)                                  \
  [&] {                                                                             \
    switch (VALUE) {                                                                \
      case ::fusedskip::Residual::kAfterRelu: {                                     \
        constexpr static ::fusedskip::Residual CONST_NAME =                         \
            ::fusedskip::Residual::kAfterRelu;                                      \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case ::fusedskip::Residual::kBeforeRelu: {                                    \
        constexpr static ::fusedskip::Residual CONST_NAME =                         \
            ::fusedskip::Residual::kBeforeRelu;                                     \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      default: {                                                                    \
        constexpr static ::fusedskip::Residual CONST_NAME = ::fusedskip::Residual::kNone; \
        return __VA_ARGS__();                                                       \
      }                                                                             \
    }                                                                               \
  }()

// The GEMM result the forward epilogue reads: the output dtype itself, or float32 where half /
// bfloat16 products were accumulated in float32 (RUN is a lambda templated on the GEMM type).
#define FS_GEMM_TYPE_SWITCH(GEMM_DTYPE, SCALAR_T, RUN)                                      \
  [&] {                                                                                     \
    if (GEMM_DTYPE == c10::CppTypeToScalarType<SCALAR_T>::value) {                          \
      return RUN.template operator()<SCALAR_T>();                                           \
    }                                                                                       \
    if constexpr (std::is_same_v<SCALAR_T, at::Half> ||                                     \
                  std::is_same_v<SCALAR_T, at::BFloat16>) {                                 \
      TORCH_INTERNAL_ASSERT(GEMM_DTYPE == at::kFloat, "unexpected GEMM dtype ", GEMM_DTYPE); \
      return RUN.template operator()<float>();                                              \
    }                                                                                       \
    TORCH_INTERNAL_ASSERT(false, "unexpected GEMM dtype ", GEMM_DTYPE);                     \
  }()
