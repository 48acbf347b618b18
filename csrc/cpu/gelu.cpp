// fusedformer::gelu_fwd / gelu_bwd on CPU tensors: checks, dtype handling and threading around the
// per-capability bodies in kernels/gelu.cpp.
#include <torch/library.h>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/gelu.h"

namespace fusedformer {
namespace cpu {

KernelStub<GeluFn<float>> gelu_fwd_f32_stub;
KernelStub<GeluFn<double>> gelu_fwd_f64_stub;
KernelStub<GeluFn<float>> gelu_bwd_f32_stub;
KernelStub<GeluFn<double>> gelu_bwd_f64_stub;

namespace {

bool is_tanh(c10::string_view approximate, const char* op) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op,
              ": expected approximate to be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

void check_inputs(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias) {
  check_floating(input, op, "input");
  if (bias) {
    check_floating(*bias, op, "bias");
    TORCH_CHECK(input.dim() >= 1, op, ": a bias needs input with at least one dim, got a 0-dim input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == input.size(-1), op, ": expected bias of shape (",
                input.size(-1), ",) to match input's last dim, got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": expected bias of dtype ",
                input.scalar_type(), " like input, got ", bias->scalar_type());
  }
}

template <typename T>
GeluArgs<T> make_args(const at::Tensor& x, const at::Tensor& b, bool tanh_approx) {
  GeluArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.bias = b.defined() ? b.data_ptr<T>() : nullptr;
  a.cols = x.dim() == 0 ? 1 : x.size(-1);
  a.rows = a.cols == 0 ? 0 : x.numel() / a.cols;
  a.tanh_approx = tanh_approx;
  return a;
}

template <typename T>
void run_gelu_fwd(KernelStub<GeluFn<T>>& stub, const at::Tensor& x, const at::Tensor& b, bool tanh_approx,
                  at::Tensor& y) {
  auto a = make_args<T>(x, b, tanh_approx);
  a.out = y.data_ptr<T>();
  auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no GELU kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(a.rows, a.cols);
  parallel_row_chunks(a.rows, chunks, [&](int64_t, int64_t rb, int64_t re) { fn(a, rb, re); });
}

at::Tensor gelu_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                        c10::string_view approximate) {
  const char* op = "fusedformer::gelu_fwd";
  const bool tanh_approx = is_tanh(approximate, op);
  check_inputs(op, input, bias);
  const auto ct = compute_dtype(input.scalar_type());
  const at::Tensor x = input.to(ct).contiguous();
  const at::Tensor b = bias ? bias->to(ct).contiguous() : at::Tensor();
  at::Tensor y = empty_output_like(x);
  if (ct == at::kDouble) {
    run_gelu_fwd<double>(gelu_fwd_f64_stub, x, b, tanh_approx, y);
  } else {
    run_gelu_fwd<float>(gelu_fwd_f32_stub, x, b, tanh_approx, y);
  }
  return y.to(input.scalar_type());
}

template <typename T>
void run_gelu_bwd(KernelStub<GeluFn<T>>& stub, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& b,
                  bool tanh_approx, at::Tensor& dx, at::Tensor& db) {
  auto a = make_args<T>(x, b, tanh_approx);
  a.grad_out = dy.data_ptr<T>();
  a.out = dx.data_ptr<T>();
  auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no GELU kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(a.rows, a.cols);
  at::Tensor partial;
  if (b.defined()) partial = at::zeros({chunks, a.cols}, x.options());
  parallel_row_chunks(a.rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    GeluArgs<T> ac = a;
    ac.grad_bias_part = b.defined() ? partial.data_ptr<T>() + c * a.cols : nullptr;
    fn(ac, rb, re);
  });
  if (b.defined()) db = partial.sum(0);
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                const std::optional<at::Tensor>& bias,
                                                c10::string_view approximate) {
  const char* op = "fusedformer::gelu_bwd";
  const bool tanh_approx = is_tanh(approximate, op);
  check_inputs(op, input, bias);
  check_floating(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(),
              " like input, got ", grad_out.sizes());
  const auto ct = compute_dtype(input.scalar_type());
  const at::Tensor x = input.to(ct).contiguous();
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor b = bias ? bias->to(ct).contiguous() : at::Tensor();
  at::Tensor dx = empty_output_like(x);
  at::Tensor db = at::empty({0}, input.options());  // empty where bias is None, in input's dtype
  if (ct == at::kDouble) {
    run_gelu_bwd<double>(gelu_bwd_f64_stub, dy, x, b, tanh_approx, dx, db);
  } else {
    run_gelu_bwd<float>(gelu_bwd_f32_stub, dy, x, b, tanh_approx, dx, db);
  }
  return {dx.to(input.scalar_type()), db.to(input.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd_cpu);
  m.impl("gelu_bwd", &gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
