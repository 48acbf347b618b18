// LayerNorm forward and backward over rows; compiled once per CPU capability.
//
// A row is read from memory once: the mean, the centred variance (two-pass, exact even when the mean
// is large) and the output are computed while it sits in L1/L2.
//   forward:  x̂ = (x - μ)·rstd,  y = x̂·w + b
//   backward: g = dy·w,  dx = rstd·(g - mean(g) - x̂·mean(g·x̂)),  dw += dy·x̂,  db += dy
// bf16/fp16 tensors are read and written in their dtype: the first pass over a row widens it to
// float32 (exactly) into a row of the call's scratch, which the later passes read, so that each element
// is converted once (weight and bias once per call); results are rounded once, as they are stored.
// Between the two it is the float32 kernel, operation for operation: the same bits as the float32 op
// on the widened tensors, rounded. μ, rstd and the partial sums of dw and db are float32.
// No fused multiply-add contraction here: dx = rstd·(g - mean(g) - ...) must cancel exactly where it
// should (D = 1 gives dx = 0), and an FMA that keeps d·w unrounded on one side only breaks that, with
// the error then multiplied by rstd (up to 1/sqrt(eps)). LayerNorm is memory-bound; FMA buys nothing.
#pragma GCC optimize("fp-contract=off")

#include "cpu/kernels/layer_norm.h"

#include "cpu/kernels/half.h"
#include "cpu/kernels/vec.h"

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {
namespace {

// Calls f(offset, n) over a row in vectors of W lanes, the tail zero-padded (n < W only there).
template <int64_t W, typename F>
inline void for_each_vec(int64_t cols, const F& f) {
  int64_t c = 0;
  for (; c + W <= cols; c += W) f(c, W);
  if (c < cols) f(c, cols - c);
}

// n lanes of T from p as the accumulation type A, the rest 0.
template <typename T, typename A = acc_t<T>>
inline vec_t<A> load(const T* p, int64_t n) {
  return n == Vec<A>::kSize ? load_lanes<T, A>(p) : load_lanes_partial<T, A>(p, n);
}

template <typename T, typename A = acc_t<T>>
inline void store(T* p, vec_t<A> v, int64_t n) {
  if (n == Vec<A>::kSize) store_lanes<T, A>(p, v);
  else store_lanes_partial<T, A>(p, v, n);
}

// n elements of T at p as A: p itself where T is A, else widened into buf. nullptr stays nullptr.
template <typename T, typename A = acc_t<T>>
const A* widened(const void* p, A* buf, int64_t n) {
  if (p == nullptr) return nullptr;
  if constexpr (std::is_same_v<T, A>) {
    return static_cast<const A*>(p);
  } else {
    const T* src = static_cast<const T*>(p);
    for_each_vec<Vec<A>::kSize>(n, [&](int64_t c, int64_t m) { store(buf + c, load(src + c, m), m); });
    return buf;
  }
}

// T: the tensors' element type; A: the accumulation type.
template <typename T>
void layer_norm_fwd_impl(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const int64_t D = a.cols;
  A* scratch = static_cast<A*>(a.scratch);  // rows: weight, bias, x (see layer_norm.h)
  const A* weight = widened<T>(a.weight, scratch, D);
  const A* bias = widened<T>(a.bias, scratch + D, D);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * D;
    T* y = static_cast<T*>(a.out) + r * D;
    A* x_wide = nullptr;  // bf16/fp16: the row widened by the first pass
    const A* xa;          // the row as A, for the later passes
    if constexpr (kWiden) xa = x_wide = scratch + 2 * D;
    else xa = x;
    vec_t<A> acc = vbroadcast<A>(0);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      const vec_t<A> v = load(x + c, n);
      if constexpr (kWiden) store(x_wide + c, v, n);
      acc += v;
    });
    const A mean = vsum<A>(acc) / A(D);
    const vec_t<A> vmean = vbroadcast(mean);
    acc = vbroadcast<A>(0);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      vec_t<A> d = load(xa + c, n) - vmean;
      if (n < W) {
        for (int64_t i = n; i < W; ++i) d[i] = 0;  // the padded lanes held -mean
      }
      acc += d * d;
    });
    const A var = vsum<A>(acc) / A(D);
    const A rstd = A(1) / std::sqrt(var + A(a.eps));
    static_cast<A*>(a.mean)[r] = mean;
    static_cast<A*>(a.rstd)[r] = rstd;
    const vec_t<A> vrstd = vbroadcast(rstd);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      vec_t<A> v = (load(xa + c, n) - vmean) * vrstd;
      if (weight) v *= load(weight + c, n);
      if (bias) v += load(bias + c, n);
      store(y + c, v, n);
    });
  }
}

template <typename T>
void layer_norm_bwd_impl(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const int64_t D = a.cols;
  A* scratch = static_cast<A*>(a.scratch);  // rows: weight, (bias: unused), x, grad_out
  const A* weight = widened<T>(a.weight, scratch, D);
  A* grad_weight_part = static_cast<A*>(a.grad_weight_part);
  A* grad_bias_part = static_cast<A*>(a.grad_bias_part);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * D;
    const T* dy = static_cast<const T*>(a.grad_out) + r * D;
    T* dx = static_cast<T*>(a.out) + r * D;
    A* x_wide = nullptr;  // bf16/fp16: the rows widened by the first pass
    A* dy_wide = nullptr;
    const A* xa;          // the rows as A, for the second pass
    const A* dya;
    if constexpr (kWiden) xa = x_wide = scratch + 2 * D, dya = dy_wide = scratch + 3 * D;
    else xa = x, dya = dy;
    const vec_t<A> vmean = vbroadcast(static_cast<const A*>(a.mean)[r]);
    const vec_t<A> vrstd = vbroadcast(static_cast<const A*>(a.rstd)[r]);
    vec_t<A> sum_g = vbroadcast<A>(0);
    vec_t<A> sum_gx = vbroadcast<A>(0);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      // padded lanes: dy is 0 there, so g and g·x̂ are 0 too
      const vec_t<A> d = load(dy + c, n);
      const vec_t<A> xv = load(x + c, n);
      if constexpr (kWiden) store(dy_wide + c, d, n), store(x_wide + c, xv, n);
      const vec_t<A> xhat = (xv - vmean) * vrstd;
      const vec_t<A> g = weight ? d * load(weight + c, n) : d;
      sum_g += g;
      sum_gx += g * xhat;
      if (grad_weight_part) store(grad_weight_part + c, load(grad_weight_part + c, n) + d * xhat, n);
      if (grad_bias_part) store(grad_bias_part + c, load(grad_bias_part + c, n) + d, n);
    });
    const vec_t<A> mean_g = vbroadcast(vsum<A>(sum_g) / A(D));
    const vec_t<A> mean_gx = vbroadcast(vsum<A>(sum_gx) / A(D));
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      const vec_t<A> d = load(dya + c, n);
      const vec_t<A> xhat = (load(xa + c, n) - vmean) * vrstd;
      const vec_t<A> g = weight ? d * load(weight + c, n) : d;
      store(dx + c, vrstd * (g - mean_g - xhat * mean_gx), n);
    });
  }
}

// ---- dispatch on the tensors' dtype ---------------------------------------------------------------

void layer_norm_fwd(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return layer_norm_fwd_impl<float>(a, row_begin, row_end);
    case Scalar::kFloat64: return layer_norm_fwd_impl<double>(a, row_begin, row_end);
    case Scalar::kBFloat16: return layer_norm_fwd_impl<bf16_t>(a, row_begin, row_end);
    case Scalar::kFloat16: return layer_norm_fwd_impl<fp16_t>(a, row_begin, row_end);
  }
}

void layer_norm_bwd(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return layer_norm_bwd_impl<float>(a, row_begin, row_end);
    case Scalar::kFloat64: return layer_norm_bwd_impl<double>(a, row_begin, row_end);
    case Scalar::kBFloat16: return layer_norm_bwd_impl<bf16_t>(a, row_begin, row_end);
    case Scalar::kFloat16: return layer_norm_bwd_impl<fp16_t>(a, row_begin, row_end);
  }
}

}  // namespace

FF_REGISTER_KERNEL(layer_norm_fwd_stub, &layer_norm_fwd);
FF_REGISTER_KERNEL(layer_norm_bwd_stub, &layer_norm_bwd);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
