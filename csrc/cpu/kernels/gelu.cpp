// GELU forward and backward with the bias add fused in; compiled once per CPU capability.
//   exact: y = x/2 (1 + erf(x/√2))           y' = (1 + erf(x/√2))/2 + x φ(x)
//   tanh:  y = x/2 (1 + tanh(u)), u = √(2/π)(x + 0.044715 x³)
//          y' = (1 + tanh u)/2 + x/2 (1 - tanh² u) √(2/π)(1 + 3·0.044715 x²)
// bf16/fp16 tensors are read and written in their dtype: each vector is widened to float32 as it is
// loaded (exactly), x + bias and everything after it is float32, and the result is rounded once as it
// is stored. The partial sums of the bias gradient are float32.
#include "cpu/kernels/gelu.h"

#include "cpu/kernels/half.h"
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
  const vec_t<T> pdf = vexp_nonpositive(x * x * T(-0.5)) * T(kInvSqrt2Pi);
  return cdf + x * pdf;
}

// T: the tensors' element type; A: the accumulation type.
template <typename T>
void gelu_fwd_impl(const GeluArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.cols;
    T* y = static_cast<T*>(a.out) + r * a.cols;
    int64_t c = 0;
    for (; c + W <= a.cols; c += W) {
      vec_t<A> v = load_lanes<T, A>(x + c);
      if (bias) v += load_lanes<T, A>(bias + c);
      store_lanes<T, A>(y + c, gelu_value<A>(v, a.tanh_approx));
    }
    if (c < a.cols) {
      const int64_t n = a.cols - c;
      vec_t<A> v = load_lanes_partial<T, A>(x + c, n);
      if (bias) v += load_lanes_partial<T, A>(bias + c, n);
      store_lanes_partial<T, A>(y + c, gelu_value<A>(v, a.tanh_approx), n);
    }
  }
}

template <typename T>
void gelu_bwd_impl(const GeluArgs& a, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  constexpr int64_t W = Vec<A>::kSize;
  const T* bias = static_cast<const T*>(a.bias);
  A* grad_bias_part = static_cast<A*>(a.grad_bias_part);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.cols;
    const T* dy = static_cast<const T*>(a.grad_out) + r * a.cols;
    T* dx = static_cast<T*>(a.out) + r * a.cols;
    int64_t c = 0;
    for (; c + W <= a.cols; c += W) {
      vec_t<A> v = load_lanes<T, A>(x + c);
      if (bias) v += load_lanes<T, A>(bias + c);
      const vec_t<A> g = load_lanes<T, A>(dy + c) * gelu_derivative<A>(v, a.tanh_approx);
      store_lanes<T, A>(dx + c, g);
      if (grad_bias_part) vstore(grad_bias_part + c, vload(grad_bias_part + c) + g);
    }
    if (c < a.cols) {
      const int64_t n = a.cols - c;
      vec_t<A> v = load_lanes_partial<T, A>(x + c, n);
      if (bias) v += load_lanes_partial<T, A>(bias + c, n);
      const vec_t<A> g = load_lanes_partial<T, A>(dy + c, n) * gelu_derivative<A>(v, a.tanh_approx);
      store_lanes_partial<T, A>(dx + c, g, n);
      if (grad_bias_part) vstore_partial(grad_bias_part + c, vload_partial(grad_bias_part + c, n) + g, n);
    }
  }
}

// ---- dispatch on the tensors' dtype ---------------------------------------------------------------

void gelu_fwd(const GeluArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return gelu_fwd_impl<float>(a, row_begin, row_end);
    case Scalar::kFloat64: return gelu_fwd_impl<double>(a, row_begin, row_end);
    case Scalar::kBFloat16: return gelu_fwd_impl<bf16_t>(a, row_begin, row_end);
    case Scalar::kFloat16: return gelu_fwd_impl<fp16_t>(a, row_begin, row_end);
  }
}

void gelu_bwd(const GeluArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return gelu_bwd_impl<float>(a, row_begin, row_end);
    case Scalar::kFloat64: return gelu_bwd_impl<double>(a, row_begin, row_end);
    case Scalar::kBFloat16: return gelu_bwd_impl<bf16_t>(a, row_begin, row_end);
    case Scalar::kFloat16: return gelu_bwd_impl<fp16_t>(a, row_begin, row_end);
  }
}

}  // namespace

FF_REGISTER_KERNEL(gelu_fwd_stub, &gelu_fwd);
FF_REGISTER_KERNEL(gelu_bwd_stub, &gelu_bwd);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
