// Interface between the LayerNorm glue (csrc/cpu/layer_norm.cpp) and its per-capability bodies.
// x, weight, bias, grad_out and out keep the input's dtype (`dtype`): the kernels widen bf16/fp16 a
// row at a time into `scratch`, never a whole tensor. "acc" below is the accumulation type: float64 for
// float64 tensors, else float32.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels/scalar.h"

namespace fusedformer {
namespace cpu {

struct LayerNormArgs {
  Scalar dtype;             // of x, weight, bias, grad_out, out
  const void* x;            // (rows, cols), rows contiguous
  const void* weight;       // (cols,) or nullptr
  const void* bias;         // (cols,) or nullptr
  const void* grad_out;     // (rows, cols); backward only
  void* out;                // (rows, cols): y in the forward, dx in the backward
  void* mean;               // (rows,) acc: written by the forward, read by the backward
  void* rstd;               // (rows,) acc: 1/sqrt(var + eps), likewise
  void* grad_weight_part;   // (cols,) acc: this call's partial Σ dy·x̂ over its rows, or nullptr
  void* grad_bias_part;     // (cols,) acc: this call's partial Σ dy over its rows, or nullptr
  // (kLayerNormScratchRows, cols) float32, this call's own, for bf16/fp16 (nullptr for float32/float64):
  // rows 0, 1 take weight and bias widened, rows 2, 3 the x and grad_out row at hand
  void* scratch;
  int64_t rows;
  int64_t cols;
  double eps;
};

constexpr int64_t kLayerNormScratchRows = 4;

// Each call handles rows [row_begin, row_end).
using LayerNormFn = void (*)(const LayerNormArgs&, int64_t row_begin, int64_t row_end);

extern KernelStub<LayerNormFn> layer_norm_fwd_stub;
extern KernelStub<LayerNormFn> layer_norm_bwd_stub;

}  // namespace cpu
}  // namespace fusedformer
