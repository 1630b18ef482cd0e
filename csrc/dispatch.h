// Run-time values to compile-time ones: the divergence to a constant, an element type to
// a C++ type. One place for the switches every kernel file needs (in the manner of
// TransformerEngine's TYPE_SWITCH and flash-attention's static_switch.h).
//
// Each macro is a statement: a switch on VALUE whose every case declares CONST_NAME (a
// `constexpr fastkd::Divergence`) or TYPE_NAME (a type alias) and runs the statements
// given as the last argument, then leaves the switch. A `return` in them returns from the
// enclosing function; a value outside the enum runs nothing (the ScalarType switch raises),
// so the code after the macro is where an unknown value lands:
//
//   FASTKD_DIVERGENCE_SWITCH(p.divergence, DIV, write_grad<DIV>(...));
//
//   FASTKD_ELEM_TYPE_SWITCH(type, T, return launch_typed<T>(...));
//   return cudaErrorInvalidValue;
//
//   FASTKD_SCALAR_TYPE_SWITCH(grad.scalar_type(), T, "fastkd_scale_grad", {
//     scale_rows(grad.data_ptr<T>(), ...);
//   });
//
// Statements, not lambdas (static_switch.h's form): the divergence switch sits inside the
// two-pass kernel, and an extra inlined lambda there renumbers ptxas's virtual registers,
// which moved two instances' register counts (47 -> 48, 64 -> 62) for identical math.
// The statement form compiles to the PTX of the hand-written switch it replaced.
//
// The macros name the types of their family only when expanded, so this header includes
// nothing beyond kd_params.h and is safe in the .cu files, which see no torch headers:
//   FASTKD_DIVERGENCE_SWITCH   anywhere: fastkd::Divergence (kd_params.h)
//   FASTKD_ELEM_TYPE_SWITCH    CUDA files: fastkd::cuda::ElemType (cuda/kd_cuda.h) to float,
//                              __nv_bfloat16, __half (cuda_bf16.h, cuda_fp16.h)
//   FASTKD_SCALAR_TYPE_SWITCH  ATen files: at::ScalarType to double, float, c10::BFloat16,
//                              c10::Half (AT_DISPATCH_FLOATING_TYPES_AND2's set); any other
//                              type raises AT_DISPATCH's NotImplementedError, naming OP_NAME
#pragma once

#include "kd_params.h"

#define FASTKD_CONST_CASE(ENUM_VALUE, CONST_TYPE, CONST_NAME, ...) \
  case ENUM_VALUE: {                                                \
    constexpr CONST_TYPE CONST_NAME = ENUM_VALUE;                   \
    __VA_ARGS__;                                                    \
  } break;

#define FASTKD_TYPE_CASE(ENUM_VALUE, CPP_TYPE, TYPE_NAME, ...) \
  case ENUM_VALUE: {                                           \
    using TYPE_NAME = CPP_TYPE;                                \
    __VA_ARGS__;                                               \
  } break;

// Divergence VALUE as `constexpr fastkd::Divergence CONST_NAME`.
#define FASTKD_DIVERGENCE_SWITCH(VALUE, CONST_NAME, ...)                                       \
  switch (VALUE) {                                                                            \
    FASTKD_CONST_CASE(::fastkd::Divergence::ForwardKL, ::fastkd::Divergence, CONST_NAME,      \
                      __VA_ARGS__)                                                            \
    FASTKD_CONST_CASE(::fastkd::Divergence::ReverseKL, ::fastkd::Divergence, CONST_NAME,      \
                      __VA_ARGS__)                                                            \
    FASTKD_CONST_CASE(::fastkd::Divergence::JSD, ::fastkd::Divergence, CONST_NAME, __VA_ARGS__) \
    FASTKD_CONST_CASE(::fastkd::Divergence::TVD, ::fastkd::Divergence, CONST_NAME, __VA_ARGS__) \
  }

// fastkd::cuda::ElemType VALUE as `using TYPE_NAME = float / __nv_bfloat16 / __half`.
#define FASTKD_ELEM_TYPE_SWITCH(VALUE, TYPE_NAME, ...)                                 \
  switch (VALUE) {                                                                    \
    FASTKD_TYPE_CASE(::fastkd::cuda::ElemType::F32, float, TYPE_NAME, __VA_ARGS__)     \
    FASTKD_TYPE_CASE(::fastkd::cuda::ElemType::BF16, __nv_bfloat16, TYPE_NAME, __VA_ARGS__) \
    FASTKD_TYPE_CASE(::fastkd::cuda::ElemType::F16, __half, TYPE_NAME, __VA_ARGS__)    \
  }

// at::ScalarType VALUE as `using TYPE_NAME = double / float / c10::BFloat16 / c10::Half`;
// any other type raises what AT_DISPATCH_* raises: NotImplementedError
// "OP_NAME" not implemented for 'Int'.
#define FASTKD_SCALAR_TYPE_SWITCH(VALUE, TYPE_NAME, OP_NAME, ...)                            \
  do {                                                                                      \
    const ::at::ScalarType fastkd_scalar_type = VALUE;                                      \
    switch (fastkd_scalar_type) {                                                           \
      FASTKD_TYPE_CASE(::at::ScalarType::Double, double, TYPE_NAME, __VA_ARGS__)            \
      FASTKD_TYPE_CASE(::at::ScalarType::Float, float, TYPE_NAME, __VA_ARGS__)              \
      FASTKD_TYPE_CASE(::at::ScalarType::BFloat16, ::c10::BFloat16, TYPE_NAME, __VA_ARGS__) \
      FASTKD_TYPE_CASE(::at::ScalarType::Half, ::c10::Half, TYPE_NAME, __VA_ARGS__)         \
      default:                                                                              \
        TORCH_CHECK_NOT_IMPLEMENTED(false, '"', OP_NAME, "\" not implemented for '",        \
                                    ::c10::toString(fastkd_scalar_type), "'");              \
    }                                                                                       \
  } while (0)
