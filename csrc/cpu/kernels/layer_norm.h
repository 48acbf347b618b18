// Interface between the LayerNorm glue (csrc/cpu/layer_norm.cpp) and its per-capability bodies.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"

namespace fusedformer {
namespace cpu {

template <typename T>
struct LayerNormArgs {
  const T* x;            // (rows, cols), rows contiguous
  const T* weight;       // (cols,) or nullptr
  const T* bias;         // (cols,) or nullptr
  const T* grad_out;     // (rows, cols); backward only
  T* out;                // (rows, cols): y in the forward, dx in the backward
  T* mean;               // (rows,): written by the forward, read by the backward
  T* rstd;               // (rows,): 1/sqrt(var + eps), likewise
  T* grad_weight_part;   // (cols,): this call's partial Σ dy·x̂ over its rows, or nullptr
  T* grad_bias_part;     // (cols,): this call's partial Σ dy over its rows, or nullptr
  int64_t rows;
  int64_t cols;
  double eps;
};

// Each call handles rows [row_begin, row_end).
template <typename T>
using LayerNormFn = void (*)(const LayerNormArgs<T>&, int64_t row_begin, int64_t row_end);

extern KernelStub<LayerNormFn<float>> layer_norm_fwd_f32_stub;
extern KernelStub<LayerNormFn<double>> layer_norm_fwd_f64_stub;
extern KernelStub<LayerNormFn<float>> layer_norm_bwd_f32_stub;
extern KernelStub<LayerNormFn<double>> layer_norm_bwd_f64_stub;

}  // namespace cpu
}  // namespace fusedformer
