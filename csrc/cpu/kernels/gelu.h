// Interface between the GELU glue (csrc/cpu/gelu.cpp) and its per-capability bodies (gelu.cpp here).
// x, bias, grad_out and out keep the input's dtype (`dtype`): the kernels convert a vector at a time,
// never a whole tensor. "acc" below is the accumulation type: float64 for float64 tensors, else float32.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels/scalar.h"

namespace fusedformer {
namespace cpu {

struct GeluArgs {
  Scalar dtype;            // of x, bias, grad_out, out
  const void* x;           // (rows, cols), rows contiguous
  const void* bias;        // (cols,) or nullptr
  const void* grad_out;    // (rows, cols); backward only
  void* out;               // (rows, cols): y in the forward, dx in the backward
  void* grad_bias_part;    // (cols,) acc: this call's partial sum of dx over its rows; backward with bias only
  int64_t rows;
  int64_t cols;
  bool tanh_approx;
};

// Each call handles rows [row_begin, row_end).
using GeluFn = void (*)(const GeluArgs&, int64_t row_begin, int64_t row_end);

extern KernelStub<GeluFn> gelu_fwd_stub;
extern KernelStub<GeluFn> gelu_bwd_stub;

}  // namespace cpu
}  // namespace fusedformer
