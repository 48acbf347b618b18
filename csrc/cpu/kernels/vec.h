// Portable SIMD for the kernel bodies: GCC vector extensions, 64 bytes wide.
//
// Each kernel source is compiled three times (setup.py): with AVX-512 a Vec is one zmm register, with
// AVX2 two ymm, with the baseline four xmm; the compiler splits the operations, so one source serves
// all three. Float math functions are polynomial (vectorised, as ATen's Vectorized<float>); double
// ones call libm lane by lane, since float64 is there for accuracy, not speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {

template <typename T>
struct Vec {
  static constexpr int kSize = 64 / sizeof(T);
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned_type __attribute__((vector_size(64), aligned(sizeof(T))));
};

template <typename T>
using vec_t = typename Vec<T>::type;

using vf = vec_t<float>;
using vd = vec_t<double>;
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef int64_t vi64 __attribute__((vector_size(64)));

template <typename T>
inline vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned_type*>(p);
}

template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  *reinterpret_cast<typename Vec<T>::unaligned_type*>(p) = v;
}

// Loads n < kSize elements, zero-filling the rest.
template <typename T>
inline vec_t<T> vload_partial(const T* p, int64_t n) {
  T buf[Vec<T>::kSize] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return vload(buf);
}

template <typename T>
inline void vstore_partial(T* p, vec_t<T> v, int64_t n) {
  T buf[Vec<T>::kSize];
  vstore(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// A splat: an initialiser of equal lanes, which the compiler emits as one broadcast (vec_t<T>{} + x
// would cost an add, since 0 + x is not x for x = -0).
template <typename T>
inline vec_t<T> vbroadcast(T x) {
  static_assert(Vec<T>::kSize == 16 || Vec<T>::kSize == 8, "a 64-byte vector of 4- or 8-byte lanes");
  if constexpr (Vec<T>::kSize == 16) {
    return vec_t<T>{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
  } else {
    return vec_t<T>{x, x, x, x, x, x, x, x};
  }
}

template <typename T>
inline T vsum(vec_t<T> v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::kSize; ++i) s += v[i];
  return s;
}

template <typename T>
inline T vmax_reduce(vec_t<T> v) {
  T m = v[0];
  for (int i = 1; i < Vec<T>::kSize; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <typename T>
inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}

// exp(x) for float lanes: Cody-Waite range reduction, degree-6 polynomial (Cephes expf), relative
// error ~1 ulp. exp(-inf) = 0, exp(+inf) = inf, NaN propagates.
inline vf vexp(vf x) {
  const vf hi = vbroadcast(88.3762626647949f);
  const vf lo = vbroadcast(-87.3365478515625f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const vf magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi32 bits = (__builtin_convertvector(n, vi32) + 127) << 23;
  vf scale = (vf)bits;  // a bit cast between vector types of one size
  vf y = p * scale;
  y = x < lo ? vbroadcast(0.0f) : y;
  y = x > hi ? vbroadcast(INFINITY) : y;
  return x != x ? x : y;
}

inline vd vexp(vd x) {
  vd y;
  for (int i = 0; i < Vec<double>::kSize; ++i) y[i] = std::exp(x[i]);
  return y;
}

// erf(x) for float lanes: Abramowitz & Stegun 7.1.26 with the vectorised exp, absolute error < 2e-7
// (the approximation ATen's Vectorized<float>::erf uses).
inline vf verf(vf x) {
  const vf ax = x < 0.0f ? -x : x;
  const vf t = 1.0f / (ax * 0.3275911f + 1.0f);
  vf p = vbroadcast(1.061405429f);
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  const vf y = 1.0f - p * t * vexp(-ax * ax);
  return x < 0.0f ? -y : y;
}

inline vd verf(vd x) {
  vd y;
  for (int i = 0; i < Vec<double>::kSize; ++i) y[i] = std::erf(x[i]);
  return y;
}

// tanh(x) for float lanes, from the vectorised exp: 1 - 2 / (exp(2x) + 1), with a Taylor series for
// |x| < 0.0625 where that form cancels.
inline vf vtanh(vf x) {
  const vf e = vexp(x * 2.0f);
  const vf big = 1.0f - 2.0f / (e + 1.0f);
  const vf x2 = x * x;
  const vf small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  const vf ax = x < 0.0f ? -x : x;
  return ax < 0.0625f ? small : big;
}

inline vd vtanh(vd x) {
  vd y;
  for (int i = 0; i < Vec<double>::kSize; ++i) y[i] = std::tanh(x[i]);
  return y;
}

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
