// fusedformer::layer_norm_fwd / layer_norm_bwd on CPU tensors: checks, dtype handling and threading
// around the per-capability bodies in kernels/layer_norm.cpp.
#include <torch/library.h>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/layer_norm.h"

namespace fusedformer {
namespace cpu {

KernelStub<LayerNormFn<float>> layer_norm_fwd_f32_stub;
KernelStub<LayerNormFn<double>> layer_norm_fwd_f64_stub;
KernelStub<LayerNormFn<float>> layer_norm_bwd_f32_stub;
KernelStub<LayerNormFn<double>> layer_norm_bwd_f64_stub;

namespace {

// Checks input/weight/bias against normalized_shape; returns (rows, cols).
std::pair<int64_t, int64_t> check_inputs(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias) {
  check_floating(input, op, "input");
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": expected a non-empty normalized_shape");
  TORCH_CHECK(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape, op,
              ": normalized_shape ", normalized_shape, " does not match the last dims of input of shape ",
              input.sizes());
  for (const auto& [name, t] : {std::make_pair("weight", &weight), std::make_pair("bias", &bias)}) {
    if (!t->has_value()) continue;
    const at::Tensor& w = t->value();
    check_floating(w, op, name);
    TORCH_CHECK(w.sizes() == normalized_shape, op, ": expected ", name, " of shape ", normalized_shape, ", got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ", input.scalar_type(),
                " like input, got ", w.scalar_type());
  }
  int64_t cols = 1;
  for (int64_t s : normalized_shape) cols *= s;
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  return {rows, cols};
}

at::Tensor to_compute(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  return t ? t->to(ct).contiguous() : at::Tensor();
}

template <typename T>
LayerNormArgs<T> make_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t rows,
                           int64_t cols) {
  LayerNormArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.weight = w.defined() ? w.data_ptr<T>() : nullptr;
  a.bias = b.defined() ? b.data_ptr<T>() : nullptr;
  a.rows = rows;
  a.cols = cols;
  return a;
}

template <typename T>
void run_fwd(KernelStub<LayerNormFn<T>>& stub, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
             int64_t rows, int64_t cols, double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  auto a = make_args<T>(x, w, b, rows, cols);
  a.out = y.data_ptr<T>(), a.mean = mean.data_ptr<T>(), a.rstd = rstd.data_ptr<T>(), a.eps = eps;
  auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no LayerNorm kernel was built for this CPU");
  parallel_row_chunks(rows, num_row_chunks(rows, cols), [&](int64_t, int64_t rb, int64_t re) { fn(a, rb, re); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& input,
                                                                  at::IntArrayRef normalized_shape,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  const char* op = "fusedformer::layer_norm_fwd";
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  const auto ct = compute_dtype(input.scalar_type());
  const at::Tensor x = input.to(ct).contiguous();
  const at::Tensor w = to_compute(weight, ct), b = to_compute(bias, ct);
  at::Tensor y = empty_output_like(x);
  const auto lead = input.sizes().slice(0, input.dim() - normalized_shape.size());
  at::Tensor mean = at::empty(lead, x.options());
  at::Tensor rstd = at::empty(lead, x.options());
  if (ct == at::kDouble) {
    run_fwd<double>(layer_norm_fwd_f64_stub, x, w, b, rows, cols, eps, y, mean, rstd);
  } else {
    run_fwd<float>(layer_norm_fwd_f32_stub, x, w, b, rows, cols, eps, y, mean, rstd);
  }
  return {y.to(input.scalar_type()), mean, rstd};
}

template <typename T>
void run_bwd(KernelStub<LayerNormFn<T>>& stub, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
             const at::Tensor& b, const at::Tensor& mean, const at::Tensor& rstd, int64_t rows, int64_t cols,
             at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  auto a = make_args<T>(x, w, b, rows, cols);
  a.grad_out = dy.data_ptr<T>(), a.out = dx.data_ptr<T>();
  a.mean = mean.data_ptr<T>(), a.rstd = rstd.data_ptr<T>();
  auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no LayerNorm kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(rows, cols);
  at::Tensor pw = w.defined() ? at::zeros({chunks, cols}, x.options()) : at::Tensor();
  at::Tensor pb = b.defined() ? at::zeros({chunks, cols}, x.options()) : at::Tensor();
  parallel_row_chunks(rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    LayerNormArgs<T> ac = a;
    ac.grad_weight_part = w.defined() ? pw.data_ptr<T>() + c * cols : nullptr;
    ac.grad_bias_part = b.defined() ? pb.data_ptr<T>() + c * cols : nullptr;
    fn(ac, rb, re);
  });
  if (w.defined()) dw = pw.sum(0);
  if (b.defined()) db = pb.sum(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fusedformer::layer_norm_bwd";
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  check_floating(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(),
              " like input, got ", grad_out.sizes());
  const auto ct = compute_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::make_pair("mean", &mean), std::make_pair("rstd", &rstd)}) {
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == ct, op, ": expected ", name, " with ", rows,
                " elements of dtype ", ct, " (from layer_norm_fwd), got shape ", t->sizes(), " dtype ",
                t->scalar_type());
  }
  const at::Tensor x = input.to(ct).contiguous();
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor w = to_compute(weight, ct), b = to_compute(bias, ct);
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = empty_output_like(x);
  // empty where weight (bias) is None, in input's dtype like the fake kernel says
  at::Tensor dw = at::empty({0}, input.options()), db = at::empty({0}, input.options());
  if (ct == at::kDouble) {
    run_bwd<double>(layer_norm_bwd_f64_stub, dy, x, w, b, mu, rs, rows, cols, dx, dw, db);
  } else {
    run_bwd<float>(layer_norm_bwd_f32_stub, dy, x, w, b, mu, rs, rows, cols, dx, dw, db);
  }
  if (w.defined()) dw = dw.view(normalized_shape).to(input.scalar_type());
  if (b.defined()) db = db.view(normalized_shape).to(input.scalar_type());
  return {dx.to(input.scalar_type()), dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
