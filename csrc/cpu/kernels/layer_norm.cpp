// LayerNorm and RMSNorm forward and backward over rows, each alone or after a residual add;
// compiled once per CPU capability.
//
// A row is read from memory once: the mean, the centred variance (two-pass, exact even when the mean
// is large) and the output are computed while it sits in L1/L2.
//   LayerNorm forward:  x̂ = (x - μ)·rstd,  rstd = 1/sqrt(mean((x - μ)²) + eps),  y = x̂·w + b
//   LayerNorm backward: g = dy·w,  dx = rstd·(g - mean(g) - x̂·mean(g·x̂)),  dw += dy·x̂,  db += dy
//   RMSNorm (kRms):     x̂ = x·rstd,  rstd = 1/sqrt(mean(x²) + eps),  y = x̂·w
//                       dx = rstd·(g - x̂·mean(g·x̂))   (no mean, so no mean(g) term)
// Residual add + norm (FlashAttention's dropout_add_layer_norm): the first pass over a row forms
//   h = x·keep/(1 - p) + residual,  rounded to the dtype and stored as residual_out,
// and the rest normalises h exactly as above (so the result is the composite's, x + r then norm). The
// backward gets h (residual_out) as its x and grad_residual_out as an extra term:
//   dh = norm's dx + d(residual_out),  d(residual) = dh,  d(input) = dh·keep/(1 - p)
// keep(r, c) is the counter-based hash of dropout.h, drawn again by the backward: no mask is stored.
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

#include "cpu/kernels/dropout.h"
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

// The dropout of an add + norm's input row: lanes [c, c + n) as keep/(1 - p) or 0 (see dropout.h).
struct RowDropout {
  DropoutKeys keys;
  uint32_t row_hash;
  uint32_t threshold;
  double scale;

  RowDropout(const LayerNormArgs& a, int64_t r)
      : keys(dropout_keys(a.seed, r >> 32)),
        row_hash(dropout_row_hash<uint32_t>(keys, static_cast<uint32_t>(r))),
        threshold(dropout_threshold(a.dropout_p)),
        scale(1.0 / (1.0 - a.dropout_p)) {}

  // float: the W lanes' bits hashed as one vector of uint32 (two multiplies and three shift-xors per
  // fmix32, vectorised); lanes past n are hashed too and multiply the zero padding. float64 (there for
  // accuracy, not speed): lane by lane.
  // NOTE [2026-12-02] the float64 mask is built in an array, not by assigning vector lanes in the loop:
  // built that way, the AVX-512 builds (GCC 12, -O3) gave masks with only lane 0 of each full 8-lane
  // vector applied (not root-caused; the array form is right on every build, see test_add_norm.py).
  template <typename A>
  vec_t<A> lanes(int64_t c, int64_t n) const {
    if constexpr (std::is_same_v<A, float>) {
      typedef uint32_t bits_t __attribute__((vector_size(kVecBytes)));
      typedef int32_t mask_t __attribute__((vector_size(kVecBytes)));
      bits_t iota;
      for (int i = 0; i < Vec<float>::kSize; ++i) iota[i] = static_cast<uint32_t>(i);  // folded to a constant
      const bits_t j = iota + static_cast<uint32_t>(c);
      const bits_t u = dropout_bits<bits_t>(bits_t{} + row_hash, dropout_col_hash<bits_t>(keys, j));
      const mask_t keep = __builtin_convertvector(u >= bits_t{} + threshold, mask_t);
      return keep ? vbroadcast(static_cast<float>(scale)) : vec_t<float>{};
    } else {
      A m[Vec<A>::kSize] = {};
      for (int64_t i = 0; i < n; ++i) m[i] = add_norm_dropout_keep(keys, row_hash, threshold, c + i) ? A(scale) : A(0);
      return vload(m);
    }
  }
};

// T: the tensors' element type; A: the accumulation type; kRms: RMSNorm (no mean, no bias).
template <typename T, bool kRms>
void norm_fwd_impl(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const int64_t D = a.cols;
  A* scratch = static_cast<A*>(a.scratch);  // rows: weight, bias, x (see layer_norm.h)
  const A* weight = widened<T>(a.weight, scratch, D);
  const A* bias = kRms ? nullptr : widened<T>(a.bias, scratch + D, D);
  const bool add = a.residual != nullptr;
  const bool drop = add && a.dropout_p > 0.0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * D;
    T* y = static_cast<T*>(a.out) + r * D;
    A* x_wide = nullptr;  // bf16/fp16: the row (h with a residual) widened by the first pass
    const A* xa;          // the row as A, for the later passes
    if constexpr (kWiden) xa = x_wide = scratch + 2 * D;
    else xa = x;
    // first pass: the sum (LayerNorm) or the sum of squares (RMSNorm); with a residual, h first
    vec_t<A> acc = vbroadcast<A>(0);
    if (add) {
      const T* res = static_cast<const T*>(a.residual) + r * D;
      T* h = static_cast<T*>(a.residual_out) + r * D;
      const RowDropout dropout = drop ? RowDropout(a, r) : RowDropout(a, 0);
      for_each_vec<W>(D, [&](int64_t c, int64_t n) {
        vec_t<A> v = load(x + c, n);
        if (drop) v *= dropout.template lanes<A>(c, n);
        store(h + c, v + load(res + c, n), n);
        v = load(h + c, n);  // h as stored, rounded to the dtype: what the composite normalises
        if constexpr (kWiden) store(x_wide + c, v, n);
        acc += kRms ? v * v : v;
      });
      if constexpr (!kWiden) xa = h;
    } else {
      for_each_vec<W>(D, [&](int64_t c, int64_t n) {
        const vec_t<A> v = load(x + c, n);
        if constexpr (kWiden) store(x_wide + c, v, n);
        acc += kRms ? v * v : v;
      });
    }
    A rstd;
    vec_t<A> vmean = vbroadcast<A>(0);
    if constexpr (kRms) {
      rstd = A(1) / std::sqrt(vsum<A>(acc) / A(D) + A(a.eps));
    } else {
      const A mean = vsum<A>(acc) / A(D);
      vmean = vbroadcast(mean);
      acc = vbroadcast<A>(0);
      for_each_vec<W>(D, [&](int64_t c, int64_t n) {
        vec_t<A> d = load(xa + c, n) - vmean;
        if (n < W) {
          for (int64_t i = n; i < W; ++i) d[i] = 0;  // the padded lanes held -mean
        }
        acc += d * d;
      });
      const A var = vsum<A>(acc) / A(D);
      rstd = A(1) / std::sqrt(var + A(a.eps));
      static_cast<A*>(a.mean)[r] = mean;
    }
    static_cast<A*>(a.rstd)[r] = rstd;
    const vec_t<A> vrstd = vbroadcast(rstd);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      vec_t<A> v = kRms ? load(xa + c, n) * vrstd : (load(xa + c, n) - vmean) * vrstd;
      if (weight) v *= load(weight + c, n);
      if (bias) v += load(bias + c, n);
      store(y + c, v, n);
    });
  }
}

template <typename T, bool kRms>
void norm_bwd_impl(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const int64_t D = a.cols;
  A* scratch = static_cast<A*>(a.scratch);  // rows: weight, (bias: unused), x, grad_out
  const A* weight = widened<T>(a.weight, scratch, D);
  A* grad_weight_part = static_cast<A*>(a.grad_weight_part);
  A* grad_bias_part = kRms ? nullptr : static_cast<A*>(a.grad_bias_part);
  const bool drop = a.grad_input != nullptr && a.dropout_p > 0.0;
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
    const vec_t<A> vmean = vbroadcast(kRms ? A(0) : static_cast<const A*>(a.mean)[r]);
    const vec_t<A> vrstd = vbroadcast(static_cast<const A*>(a.rstd)[r]);
    vec_t<A> sum_g = vbroadcast<A>(0);
    vec_t<A> sum_gx = vbroadcast<A>(0);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      // padded lanes: dy is 0 there, so g and g·x̂ are 0 too
      const vec_t<A> d = load(dy + c, n);
      const vec_t<A> xv = load(x + c, n);
      if constexpr (kWiden) store(dy_wide + c, d, n), store(x_wide + c, xv, n);
      const vec_t<A> xhat = kRms ? xv * vrstd : (xv - vmean) * vrstd;
      const vec_t<A> g = weight ? d * load(weight + c, n) : d;
      if constexpr (!kRms) sum_g += g;
      sum_gx += g * xhat;
      if (grad_weight_part) store(grad_weight_part + c, load(grad_weight_part + c, n) + d * xhat, n);
      if (grad_bias_part) store(grad_bias_part + c, load(grad_bias_part + c, n) + d, n);
    });
    const vec_t<A> mean_g = vbroadcast(vsum<A>(sum_g) / A(D));
    const vec_t<A> mean_gx = vbroadcast(vsum<A>(sum_gx) / A(D));
    const T* dres = a.grad_residual_out ? static_cast<const T*>(a.grad_residual_out) + r * D : nullptr;
    T* dinput = drop ? static_cast<T*>(a.grad_input) + r * D : nullptr;
    const RowDropout dropout = drop ? RowDropout(a, r) : RowDropout(a, 0);
    for_each_vec<W>(D, [&](int64_t c, int64_t n) {
      const vec_t<A> d = load(dya + c, n);
      const vec_t<A> g = weight ? d * load(weight + c, n) : d;
      vec_t<A> v;
      if constexpr (kRms) {
        v = vrstd * (g - load(xa + c, n) * vrstd * mean_gx);
      } else {
        v = vrstd * (g - mean_g - (load(xa + c, n) - vmean) * vrstd * mean_gx);
      }
      if (dres) v += load(dres + c, n);
      store(dx + c, v, n);
      // the dropped input's gradient from dh as stored (rounded), as the composite computes it
      if (drop) store(dinput + c, load(dx + c, n) * dropout.template lanes<A>(c, n), n);
    });
  }
}

// ---- dispatch on the tensors' dtype ---------------------------------------------------------------

template <bool kRms>
void norm_fwd(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return norm_fwd_impl<float, kRms>(a, row_begin, row_end);
    case Scalar::kFloat64: return norm_fwd_impl<double, kRms>(a, row_begin, row_end);
    case Scalar::kBFloat16: return norm_fwd_impl<bf16_t, kRms>(a, row_begin, row_end);
    case Scalar::kFloat16: return norm_fwd_impl<fp16_t, kRms>(a, row_begin, row_end);
  }
}

template <bool kRms>
void norm_bwd(const LayerNormArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return norm_bwd_impl<float, kRms>(a, row_begin, row_end);
    case Scalar::kFloat64: return norm_bwd_impl<double, kRms>(a, row_begin, row_end);
    case Scalar::kBFloat16: return norm_bwd_impl<bf16_t, kRms>(a, row_begin, row_end);
    case Scalar::kFloat16: return norm_bwd_impl<fp16_t, kRms>(a, row_begin, row_end);
  }
}

}  // namespace

FF_REGISTER_KERNEL(layer_norm_fwd_stub, &norm_fwd<false>);
FF_REGISTER_KERNEL(layer_norm_bwd_stub, &norm_bwd<false>);
FF_REGISTER_KERNEL(rms_norm_fwd_stub, &norm_fwd<true>);
FF_REGISTER_KERNEL(rms_norm_bwd_stub, &norm_bwd<true>);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
