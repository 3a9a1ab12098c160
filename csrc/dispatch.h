// Runtime choices -> compile-time template parameters, one small switch each (no kernel copies).
//
//   FS_BOOL_SWITCH(has_bias, kBias, [&] { launch<kBias>(...); });
#pragma once

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
