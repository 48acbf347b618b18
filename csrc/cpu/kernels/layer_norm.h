// Interface between the norm glue (csrc/cpu/layer_norm.cpp) and its per-capability bodies: LayerNorm
// and RMSNorm, each alone or after a residual add (with an optional dropout on the input first).
// x, residual, weight, bias, grad_out and the outputs keep the input's dtype (`dtype`): the kernels widen
// bf16/fp16 a row at a time into `scratch`, never a whole tensor. "acc" below is the accumulation type:
// float64 for float64 tensors, else float32.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels/scalar.h"

namespace fusedformer {
namespace cpu {

struct LayerNormArgs {
  Scalar dtype;             // of x, residual, weight, bias, grad_out and the outputs
  // Forward: the input; with `residual`, the kernel normalises h = dropout(x) + residual instead.
  // Backward: the normalised rows (the input, or the forward's residual_out h).
  const void* x;            // (rows, cols), rows contiguous
  const void* weight;       // (cols,) or nullptr
  const void* bias;         // (cols,) or nullptr; LayerNorm only
  const void* grad_out;     // (rows, cols); backward only
  void* out;                // (rows, cols): y in the forward, dx (dh with a residual) in the backward
  void* mean;               // (rows,) acc: written by the forward, read by the backward; LayerNorm only
  void* rstd;               // (rows,) acc: 1/sqrt(var + eps) (RMS: 1/sqrt(mean(x²) + eps)), likewise
  void* grad_weight_part;   // (cols,) acc: this call's partial Σ dy·x̂ over its rows, or nullptr
  void* grad_bias_part;     // (cols,) acc: this call's partial Σ dy over its rows, or nullptr
  // add + norm. Forward: residual (rows, cols) or nullptr; residual_out (rows, cols) receives h, rounded
  // to the dtype, which is what is normalised (as the composite x + r, then norm). Backward:
  // grad_residual_out (rows, cols) or nullptr is added to dh; grad_input (rows, cols) or nullptr
  // receives dh·keep/(1 - p), the gradient of the dropped input.
  const void* residual;
  void* residual_out;
  const void* grad_residual_out;
  void* grad_input;
  double dropout_p;         // in [0, 1); 0 = no dropout. The mask: add_norm_dropout_keep (dropout.h)
  int64_t seed;
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
extern KernelStub<LayerNormFn> rms_norm_fwd_stub;
extern KernelStub<LayerNormFn> rms_norm_bwd_stub;

}  // namespace cpu
}  // namespace fusedformer
