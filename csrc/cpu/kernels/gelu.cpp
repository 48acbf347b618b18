// GELU forward and backward with the bias add fused in; compiled once per CPU capability.
//   exact: y = x/2 (1 + erf(x/√2))           y' = (1 + erf(x/√2))/2 + x φ(x)
//   tanh:  y = x/2 (1 + tanh(u)), u = √(2/π)(x + 0.044715 x³)
//          y' = (1 + tanh u)/2 + x/2 (1 - tanh² u) √(2/π)(1 + 3·0.044715 x²)
#include "cpu/kernels/gelu.h"

#include "cpu/kernels/vec.h"

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {
namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kSqrt2_Pi = 0.79788456080286535588;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kTanhCoef = 0.044715;

template <typename T>
inline vec_t<T> gelu_value(vec_t<T> x, bool tanh_approx) {
  if (tanh_approx) {
    const vec_t<T> u = (x + x * x * x * T(kTanhCoef)) * T(kSqrt2_Pi);
    return x * T(0.5) * (T(1) + vtanh(u));
  }
  return x * T(0.5) * (T(1) + verf(x * T(kSqrt1_2)));
}

template <typename T>
inline vec_t<T> gelu_derivative(vec_t<T> x, bool tanh_approx) {
  if (tanh_approx) {
    const vec_t<T> x2 = x * x;
    const vec_t<T> t = vtanh((x + x2 * x * T(kTanhCoef)) * T(kSqrt2_Pi));
    const vec_t<T> du = T(kSqrt2_Pi) * (T(1) + x2 * T(3 * kTanhCoef));
    return T(0.5) * (T(1) + t) + x * T(0.5) * (T(1) - t * t) * du;
  }
  const vec_t<T> cdf = T(0.5) * (T(1) + verf(x * T(kSqrt1_2)));
  const vec_t<T> pdf = vexp(x * x * T(-0.5)) * T(kInvSqrt2Pi);
  return cdf + x * pdf;
}

template <typename T>
void gelu_fwd(const GeluArgs<T>& a, int64_t row_begin, int64_t row_end) {
  constexpr int64_t W = Vec<T>::kSize;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = a.x + r * a.cols;
    T* y = a.out + r * a.cols;
    int64_t c = 0;
    for (; c + W <= a.cols; c += W) {
      vec_t<T> v = vload(x + c);
      if (a.bias) v += vload(a.bias + c);
      vstore(y + c, gelu_value<T>(v, a.tanh_approx));
    }
    if (c < a.cols) {
      const int64_t n = a.cols - c;
      vec_t<T> v = vload_partial(x + c, n);
      if (a.bias) v += vload_partial(a.bias + c, n);
      vstore_partial(y + c, gelu_value<T>(v, a.tanh_approx), n);
    }
  }
}

template <typename T>
void gelu_bwd(const GeluArgs<T>& a, int64_t row_begin, int64_t row_end) {
  constexpr int64_t W = Vec<T>::kSize;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = a.x + r * a.cols;
    const T* dy = a.grad_out + r * a.cols;
    T* dx = a.out + r * a.cols;
    int64_t c = 0;
    for (; c + W <= a.cols; c += W) {
      vec_t<T> v = vload(x + c);
      if (a.bias) v += vload(a.bias + c);
      const vec_t<T> g = vload(dy + c) * gelu_derivative<T>(v, a.tanh_approx);
      vstore(dx + c, g);
      if (a.grad_bias_part) vstore(a.grad_bias_part + c, vload(a.grad_bias_part + c) + g);
    }
    if (c < a.cols) {
      const int64_t n = a.cols - c;
      vec_t<T> v = vload_partial(x + c, n);
      if (a.bias) v += vload_partial(a.bias + c, n);
      const vec_t<T> g = vload_partial(dy + c, n) * gelu_derivative<T>(v, a.tanh_approx);
      vstore_partial(dx + c, g, n);
      if (a.grad_bias_part) vstore_partial(a.grad_bias_part + c, vload_partial(a.grad_bias_part + c, n) + g, n);
    }
  }
}

}  // namespace

FF_REGISTER_KERNEL(gelu_fwd_f32_stub, &gelu_fwd<float>);
FF_REGISTER_KERNEL(gelu_fwd_f64_stub, &gelu_fwd<double>);
FF_REGISTER_KERNEL(gelu_bwd_f32_stub, &gelu_bwd<float>);
FF_REGISTER_KERNEL(gelu_bwd_f64_stub, &gelu_bwd<double>);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
