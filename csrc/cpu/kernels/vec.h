// Portable SIMD for the kernel bodies: GCC vector extensions, as wide as the build's registers.
//
// Each kernel source is compiled once per capability (setup.py): with AVX-512 a Vec is one zmm (64
// bytes), with AVX2 one ymm (32 bytes), in the baseline build 64 bytes that the compiler splits into
// four xmm. A Vec is never wider than the registers where it matters: GCC (12) keeps wider generic
// vectors in memory and lowers their comparisons and selects lane by lane through scalar code (the
// AVX2 build ran its softmax 3-4x slower that way). Code that needs a lane count reads Vec<T>::kSize.
// Float math functions are polynomial (vectorised, as ATen's Vectorized<float>); double ones call libm
// lane by lane, since float64 is there for accuracy, not speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <type_traits>
#include <utility>

#if FF_CPU_CAPABILITY_INDEX >= 1
#include <immintrin.h>
#endif

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {

// The bytes of one Vec in this build.
#if FF_CPU_CAPABILITY_INDEX == 1
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 64;
#endif

template <typename T>
struct Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kVecBytes)));
  typedef T unaligned_type __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};

template <typename T>
using vec_t = typename Vec<T>::type;

using vf = vec_t<float>;
using vd = vec_t<double>;
typedef int32_t vi32 __attribute__((vector_size(kVecBytes)));
typedef int64_t vi64 __attribute__((vector_size(kVecBytes)));

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
template <typename T, size_t... I>
inline vec_t<T> vsplat(T x, std::index_sequence<I...>) {
  return vec_t<T>{((void)I, x)...};
}
template <typename T>
inline vec_t<T> vbroadcast(T x) {
  return vsplat<T>(x, std::make_index_sequence<Vec<T>::kSize>{});
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

// 2^t for t <= 0 or about (the softmax's scores minus a row max or a logsumexp, times log2(e); erf's
// -x^2 log2(e)): 2^-inf = 0 exactly, 2^0 = 1 exactly, NaN propagates. t = n + f with n the
// nearest integer, 2^f by a polynomial on [-1/2, 1/2] with p(0) = 1 (fitted for the least relative
// error: 9.7e-8 at degree 6, which the float32 kernels use, 2.9e-6 at degree 4, for probabilities that
// are rounded to bf16 or fp16 next, 2^-9 or 2^-12), 2^n by the exponent: results below 2^-126 are 0.
template <int Degree>
inline vf vexp2_nonpositive(vf t) {
  static_assert(Degree == 4 || Degree == 6, "fitted for degrees 4 and 6");
#if FF_CPU_CAPABILITY_INDEX >= 2
  const __m512 x = (__m512)t;
  const vf n = (vf)_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf lo = vbroadcast(-127.0f);
  t = t < lo ? lo : t;                        // NaN stays NaN; -inf -> 2^-127, built as 0 below
  const vf magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (t + magic) - magic;
#endif
  const vf f = t - n;
  vf p;
  if constexpr (Degree == 6) {
    p = vbroadcast(1.5353359521e-4f);
    p = p * f + 1.3398876647e-3f;
    p = p * f + 9.6184373854e-3f;
    p = p * f + 5.5503324648e-2f;
    p = p * f + 2.4022647913e-1f;
    p = p * f + 6.9314720286e-1f;
  } else {
    p = vbroadcast(9.582848005e-3f);
    p = p * f + 5.5906443199e-2f;
    p = p * f + 2.4024098834e-1f;
    p = p * f + 6.9312419064e-1f;
  }
  p = p * f + 1.0f;
#if FF_CPU_CAPABILITY_INDEX >= 2
  // p 2^n, and 0 where t <= -126 (-inf included: there f and p are NaN); NaN t is kept
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLE_UQ);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)n);
#else
  const vi32 bits = (__builtin_convertvector(n, vi32) + 127) << 23;
  return p * (vf)bits;
#endif
}

// exp(x) for x <= 0 or about (the softmax's, erf's and the normal density's): float lanes through
// vexp2_nonpositive, Degree as there; double lanes by libm (float64 is there for accuracy).
template <int Degree = 6>
inline vf vexp_nonpositive(vf x) {
  return vexp2_nonpositive<Degree>(x * 1.44269504088896341f);
}
template <int Degree = 6>
inline vd vexp_nonpositive(vd x) {
  return vexp(x);
}

// 1/d for float lanes: on AVX-512 a 14-bit estimate and one Newton step (relative error ~2^-28, below
// float32's half ulp before rounding; 3 instructions where vdivps costs ~10 cycles of one port on
// Intel cores); elsewhere a division. d must be finite and nonzero (the callers keep it in [1, 5]).
inline vf vrecip(vf d) {
#if FF_CPU_CAPABILITY_INDEX >= 2
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// |x| and the sign bit of x, by bit masks (no compare and blend)
inline vf vabs(vf x) { return (vf)((vi32)x & 0x7fffffff); }
inline vf vcopysign_of(vf magnitude, vf sign_of) { return (vf)((vi32)magnitude | ((vi32)sign_of & (int32_t)0x80000000)); }

// erf(x) for float lanes: Abramowitz & Stegun 7.1.26, absolute error < 2e-7 (the approximation
// ATen's Vectorized<float>::erf uses), erf(x) = 1 - t p(t) exp(-x^2), t = 1/(1 + 0.3275911 |x|), with
// the sign of x. |x| is capped at 10 first (erf is 1 in float32 from 3.92), which keeps the reciprocal
// finite; NaN passes the cap and propagates.
inline vf verf(vf x) {
  const vf ax = vabs(x);
  const vf axc = 10.0f < ax ? vbroadcast(10.0f) : ax;  // vminps(10, ax): NaN ax stays NaN
  const vf t = vrecip(axc * 0.3275911f + 1.0f);
  vf p = vbroadcast(1.061405429f);
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  const vf y = 1.0f - p * t * vexp_nonpositive(-(axc * axc));
  return vcopysign_of(y, x);
}

inline vd verf(vd x) {
  vd y;
  for (int i = 0; i < Vec<double>::kSize; ++i) y[i] = std::erf(x[i]);
  return y;
}

// tanh(x) for float lanes: sign(x) (1 - 2 / (exp(2|x|) + 1)), the exp of -2|x| taken instead so that it
// is never above 1: tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|); a Taylor series for |x| < 0.0625,
// where that form cancels. NaN propagates.
inline vf vtanh(vf x) {
  const vf ax = vabs(x);
  const vf e = vexp2_nonpositive<6>(ax * -2.88539008177792681f);  // exp(-2|x|), in (0, 1]
  const vf big = (1.0f - e) * vrecip(1.0f + e);
  const vf x2 = x * x;
  const vf small = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  return vcopysign_of(ax < 0.0625f ? small : big, x);
}

inline vd vtanh(vd x) {
  vd y;
  for (int i = 0; i < Vec<double>::kSize; ++i) y[i] = std::tanh(x[i]);
  return y;
}

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
