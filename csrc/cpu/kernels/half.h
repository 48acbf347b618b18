// bf16 and fp16 in the kernel bodies: storage types, conversions to and from the accumulation type
// (float32; float64 for float64 tensors), and Vecs of them (vec.h), so that a kernel reads and
// writes half tensors in their own dtype and converts a vector at a time, never a whole tensor.
// Compiled per CPU capability (the enclosing namespace), like vec.h: where the build has AVX-512 a
// conversion is one or two instructions (vcvtneps2bf16 with AVX512-BF16; F16C for fp16 with AVX2).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/kernels/vec.h"

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {

// The compiler's native half type, used only for scalar conversions: _Float16 where GCC/Clang
// offer it in C++ (x86-64), __fp16 on Arm (GCC before 13 has no _Float16 in C++ there).
#if defined(__aarch64__) || defined(__arm__)
using native_half = __fp16;
#else
using native_half = _Float16;
#endif

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Conversions between a storage type and its accumulation type (float64 for float64, else float32).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using acc = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Elem<double> {
  using acc = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
template <>
struct Elem<bf16_t> {
  using acc = float;
  static float load(bf16_t x) {
    const uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static bf16_t store(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7FFFu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
  }
};
template <>
struct Elem<fp16_t> {
  using acc = float;
  static float load(fp16_t x) {
    native_half h;
    std::memcpy(&h, &x.bits, 2);
    return static_cast<float>(h);
  }
  static fp16_t store(float f) {
    const native_half h = static_cast<native_half>(f);
    fp16_t x;
    std::memcpy(&x.bits, &h, 2);
    return x;
  }
};

template <typename T>
using acc_t = typename Elem<T>::acc;

template <typename Dst, typename Src>
inline Dst convert(Src x) {
  return Elem<Dst>::store(static_cast<acc_t<Dst>>(Elem<Src>::load(x)));
}

template <typename Dst, typename Src>
inline void convert_row(Dst* dst, const Src* src, int64_t n) {
  if constexpr (std::is_same_v<Dst, Src>) {
    std::memcpy(dst, src, n * sizeof(Dst));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = convert<Dst>(src[i]);
  }
}

// W lanes stored as Op: bf16 rounded to nearest even, NaN kept NaN, by one instruction where the build
// has AVX512-BF16 (vcvtneps2bf16, which also flushes float32 denormals, |x| < 2^-126, to ±0; the other
// builds round them like Elem<bf16_t>::store); fp16 by the AVX-512 conversion.
typedef uint32_t vu32 __attribute__((vector_size(kVecBytes)));
typedef uint16_t vu16 __attribute__((vector_size(kVecBytes / 2)));

template <typename Op, typename Acc>
inline void store_lanes(Op* dst, vec_t<Acc> x) {
  if constexpr (std::is_same_v<Op, Acc>) {
    vstore(dst, x);
  } else if constexpr (std::is_same_v<Op, bf16_t>) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh((__m512)x));
#else
    vu32 u = (vu32)x;
    u = (vu32)(x != x ? (vu32)vbroadcast(std::numeric_limits<float>::quiet_NaN()) : u);  // any NaN stays NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    const vu16 h = __builtin_convertvector(u >> 16, vu16);
    std::memcpy(dst, &h, sizeof(h));
#endif
#if FF_CPU_CAPABILITY_INDEX >= 2  // x86-64 only (setup.py); the intrinsics' types exist nowhere else
  } else if constexpr (std::is_same_v<Op, fp16_t>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif FF_CPU_CAPABILITY_INDEX == 1  // F16C
  } else if constexpr (std::is_same_v<Op, fp16_t> && std::is_same_v<Acc, float>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  } else {
    for (int i = 0; i < Vec<Acc>::kSize; ++i) dst[i] = Elem<Op>::store(x[i]);
  }
}

// W lanes of In as the accumulation type: vload for float and double; bf16 widened (exact); fp16 by
// the F16C/AVX-512 conversion (exact).
template <typename In, typename Acc>
inline vec_t<Acc> load_lanes(const In* src) {
  if constexpr (std::is_same_v<In, Acc>) {
    return vload(src);
  } else if constexpr (std::is_same_v<In, bf16_t>) {
#if FF_CPU_CAPABILITY_INDEX >= 2  // one vpmovzxwd from memory and a shift (GCC splits the generic form)
    return (vec_t<Acc>)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16);
#else
    vu16 h;
    std::memcpy(&h, src, sizeof(h));
    return (vec_t<Acc>)(__builtin_convertvector(h, vu32) << 16);
#endif
  } else {
#if FF_CPU_CAPABILITY_INDEX >= 2
    return (vec_t<Acc>)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#elif FF_CPU_CAPABILITY_INDEX == 1  // F16C
    if constexpr (std::is_same_v<Acc, float>) {
      return (vec_t<Acc>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    }
    vec_t<Acc> v;
    for (int i = 0; i < Vec<Acc>::kSize; ++i) v[i] = Elem<In>::load(src[i]);
    return v;
#else
    vec_t<Acc> v;
    for (int i = 0; i < Vec<Acc>::kSize; ++i) v[i] = Elem<In>::load(src[i]);
    return v;
#endif
  }
}

// The first n < W lanes of In as the accumulation type, the others 0; the row tails of the
// elementwise kernels. vload_partial for float and double.
template <typename In, typename Acc>
inline vec_t<Acc> load_lanes_partial(const In* src, int64_t n) {
  if constexpr (std::is_same_v<In, Acc>) {
    return vload_partial(src, n);
  } else {
    In buf[Vec<Acc>::kSize] = {};
    std::memcpy(buf, src, n * sizeof(In));
    return load_lanes<In, Acc>(buf);
  }
}

// The first n < W lanes stored as Op, rounded as store_lanes rounds; vstore_partial for float and double.
template <typename Op, typename Acc>
inline void store_lanes_partial(Op* dst, vec_t<Acc> x, int64_t n) {
  if constexpr (std::is_same_v<Op, Acc>) {
    vstore_partial(dst, x, n);
  } else {
    Op buf[Vec<Acc>::kSize];
    store_lanes<Op, Acc>(buf, x);
    std::memcpy(dst, buf, n * sizeof(Op));
  }
}

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
