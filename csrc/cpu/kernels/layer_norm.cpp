// LayerNorm forward and backward over rows; compiled once per CPU capability.
//
// A row is read from memory once: the mean, the centred variance (two-pass, exact even when the mean
// is large) and the output are computed while it sits in L1/L2.
//   forward:  x̂ = (x - μ)·rstd,  y = x̂·w + b
//   backward: g = dy·w,  dx = rstd·(g - mean(g) - x̂·mean(g·x̂)),  dw += dy·x̂,  db += dy
// No fused multiply-add contraction here: dx = rstd·(g - mean(g) - ...) must cancel exactly where it
// should (D = 1 gives dx = 0), and an FMA that keeps d·w unrounded on one side only breaks that, with
// the error then multiplied by rstd (up to 1/sqrt(eps)). LayerNorm is memory-bound; FMA buys nothing.
#pragma GCC optimize("fp-contract=off")

#include "cpu/kernels/layer_norm.h"

#include "cpu/kernels/vec.h"

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {
namespace {

// Calls f(vector, offset, n) over a row, the tail zero-padded (n < kSize only there).
template <typename T, typename F>
inline void for_each_vec(int64_t cols, const F& f) {
  constexpr int64_t W = Vec<T>::kSize;
  int64_t c = 0;
  for (; c + W <= cols; c += W) f(c, W);
  if (c < cols) f(c, cols - c);
}

template <typename T>
inline vec_t<T> load(const T* p, int64_t n) {
  return n == Vec<T>::kSize ? vload(p) : vload_partial(p, n);
}

template <typename T>
inline void store(T* p, vec_t<T> v, int64_t n) {
  if (n == Vec<T>::kSize) vstore(p, v);
  else vstore_partial(p, v, n);
}

template <typename T>
void layer_norm_fwd(const LayerNormArgs<T>& a, int64_t row_begin, int64_t row_end) {
  const int64_t D = a.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = a.x + r * D;
    T* y = a.out + r * D;
    vec_t<T> acc = vbroadcast<T>(0);
    for_each_vec<T>(D, [&](int64_t c, int64_t n) { acc += load(x + c, n); });
    const T mean = vsum<T>(acc) / T(D);
    const vec_t<T> vmean = vbroadcast(mean);
    acc = vbroadcast<T>(0);
    for_each_vec<T>(D, [&](int64_t c, int64_t n) {
      vec_t<T> d = load(x + c, n) - vmean;
      if (n < Vec<T>::kSize) {
        for (int64_t i = n; i < Vec<T>::kSize; ++i) d[i] = 0;  // the padded lanes held -mean
      }
      acc += d * d;
    });
    const T var = vsum<T>(acc) / T(D);
    const T rstd = T(1) / std::sqrt(var + T(a.eps));
    a.mean[r] = mean;
    a.rstd[r] = rstd;
    const vec_t<T> vrstd = vbroadcast(rstd);
    for_each_vec<T>(D, [&](int64_t c, int64_t n) {
      vec_t<T> v = (load(x + c, n) - vmean) * vrstd;
      if (a.weight) v *= load(a.weight + c, n);
      if (a.bias) v += load(a.bias + c, n);
      store(y + c, v, n);
    });
  }
}

template <typename T>
void layer_norm_bwd(const LayerNormArgs<T>& a, int64_t row_begin, int64_t row_end) {
  const int64_t D = a.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = a.x + r * D;
    const T* dy = a.grad_out + r * D;
    T* dx = a.out + r * D;
    const vec_t<T> vmean = vbroadcast(a.mean[r]);
    const vec_t<T> vrstd = vbroadcast(a.rstd[r]);
    vec_t<T> sum_g = vbroadcast<T>(0);
    vec_t<T> sum_gx = vbroadcast<T>(0);
    for_each_vec<T>(D, [&](int64_t c, int64_t n) {
      // padded lanes: dy is 0 there, so g and g·x̂ are 0 too
      const vec_t<T> d = load(dy + c, n);
      const vec_t<T> xhat = (load(x + c, n) - vmean) * vrstd;
      const vec_t<T> g = a.weight ? d * load(a.weight + c, n) : d;
      sum_g += g;
      sum_gx += g * xhat;
      if (a.grad_weight_part) store(a.grad_weight_part + c, load(a.grad_weight_part + c, n) + d * xhat, n);
      if (a.grad_bias_part) store(a.grad_bias_part + c, load(a.grad_bias_part + c, n) + d, n);
    });
    const vec_t<T> mean_g = vbroadcast(vsum<T>(sum_g) / T(D));
    const vec_t<T> mean_gx = vbroadcast(vsum<T>(sum_gx) / T(D));
    for_each_vec<T>(D, [&](int64_t c, int64_t n) {
      const vec_t<T> d = load(dy + c, n);
      const vec_t<T> xhat = (load(x + c, n) - vmean) * vrstd;
      const vec_t<T> g = a.weight ? d * load(a.weight + c, n) : d;
      store(dx + c, vrstd * (g - mean_g - xhat * mean_gx), n);
    });
  }
}

}  // namespace

FF_REGISTER_KERNEL(layer_norm_fwd_f32_stub, &layer_norm_fwd<float>);
FF_REGISTER_KERNEL(layer_norm_fwd_f64_stub, &layer_norm_fwd<double>);
FF_REGISTER_KERNEL(layer_norm_bwd_f32_stub, &layer_norm_bwd<float>);
FF_REGISTER_KERNEL(layer_norm_bwd_f64_stub, &layer_norm_bwd<double>);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
