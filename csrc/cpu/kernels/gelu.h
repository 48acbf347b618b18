// Interface between the GELU glue (csrc/cpu/gelu.cpp) and its per-capability bodies (gelu.cpp here).
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"

namespace fusedformer {
namespace cpu {

template <typename T>
struct GeluArgs {
  const T* x;          // (rows, cols), rows contiguous
  const T* bias;       // (cols,) or nullptr
  const T* grad_out;   // (rows, cols); backward only
  T* out;              // (rows, cols): y in the forward, dx in the backward
  T* grad_bias_part;   // (cols,): this call's partial sum of dx over its rows; backward with bias only
  int64_t rows;
  int64_t cols;
  bool tanh_approx;
};

// Each call handles rows [row_begin, row_end).
template <typename T>
using GeluFn = void (*)(const GeluArgs<T>&, int64_t row_begin, int64_t row_end);

extern KernelStub<GeluFn<float>> gelu_fwd_f32_stub;
extern KernelStub<GeluFn<double>> gelu_fwd_f64_stub;
extern KernelStub<GeluFn<float>> gelu_bwd_f32_stub;
extern KernelStub<GeluFn<double>> gelu_bwd_f64_stub;

}  // namespace cpu
}  // namespace fusedformer
