// fusedformer::layer_norm_fwd / layer_norm_bwd on CPU tensors: checks and threading around the
// per-capability bodies in kernels/layer_norm.cpp. The tensors keep their dtype (bf16/fp16 included):
// the kernels widen a row at a time into a few float32 rows of scratch per chunk, never a whole tensor;
// mean, rstd and the partial sums of the parameter gradients are in the accumulation dtype (float32,
// float64 for float64).
#include <torch/library.h>

#include <limits>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/layer_norm.h"

namespace fusedformer {
namespace cpu {

KernelStub<LayerNormFn> layer_norm_fwd_stub;
KernelStub<LayerNormFn> layer_norm_bwd_stub;

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
  int64_t rows = 1;  // the product of the leading dims (not numel / cols: cols may be 0)
  for (int64_t i = 0; i < input.dim() - k; ++i) rows *= input.size(i);
  return {rows, cols};
}

// Each chunk's kernel scratch (kernels/layer_norm.h): (chunks, kLayerNormScratchRows * cols) float32 for
// bf16/fp16 input, undefined for float32/float64.
at::Tensor scratch_for(const at::Tensor& x, int64_t chunks, int64_t cols) {
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) return at::Tensor();
  return at::empty({chunks, kLayerNormScratchRows * cols}, x.options().dtype(at::kFloat));
}

at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); }

LayerNormArgs make_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t rows,
                        int64_t cols) {
  LayerNormArgs a{};
  a.dtype = scalar_of(x.scalar_type());
  a.x = x.const_data_ptr();
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.rows = rows;
  a.cols = cols;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& input,
                                                                  at::IntArrayRef normalized_shape,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  const char* op = "fusedformer::layer_norm_fwd";
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  at::Tensor y = empty_output_like(x);
  const auto lead = input.sizes().slice(0, input.dim() - normalized_shape.size());
  const auto stats = x.options().dtype(compute_dtype(input.scalar_type()));
  at::Tensor mean = at::empty(lead, stats);
  at::Tensor rstd = at::empty(lead, stats);
  if (cols == 0) {  // as torch: an empty output, mean 0 and rstd 1/sqrt(0/0 + eps) = NaN per row
    mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  LayerNormArgs a = make_args(x, w, b, rows, cols);
  a.out = y.data_ptr(), a.mean = mean.data_ptr(), a.rstd = rstd.data_ptr(), a.eps = eps;
  auto fn = layer_norm_fwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no LayerNorm kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(rows, cols);
  const at::Tensor scratch = scratch_for(x, chunks, cols);
  parallel_row_chunks(rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    LayerNormArgs ac = a;
    ac.scratch = row_ptr(scratch, c);
    fn(ac, rb, re);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fusedformer::layer_norm_bwd";
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  check_floating(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(),
              " like input, got ", grad_out.sizes());
  const auto acc = compute_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::make_pair("mean", &mean), std::make_pair("rstd", &rstd)}) {
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == acc, op, ": expected ", name, " with ", rows,
                " elements of dtype ", acc, " (from layer_norm_fwd), got shape ", t->sizes(), " dtype ",
                t->scalar_type());
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(input.scalar_type()).contiguous();  // the kernel reads it in input's dtype
  const at::Tensor w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = empty_output_like(x);
  if (cols == 0 || rows == 0) {  // nothing to normalise: empty dx; dw, db (as torch) zeros of normalized_shape
    at::Tensor dw = w.defined() ? at::zeros(normalized_shape, input.options()) : at::empty({0}, input.options());
    at::Tensor db = b.defined() ? at::zeros(normalized_shape, input.options()) : at::empty({0}, input.options());
    return {dx, dw, db};
  }
  LayerNormArgs a = make_args(x, w, b, rows, cols);
  a.grad_out = dy.const_data_ptr(), a.out = dx.data_ptr();
  a.mean = mu.data_ptr(), a.rstd = rs.data_ptr();
  auto fn = layer_norm_bwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no LayerNorm kernel was built for this CPU");
  // Per-chunk partial sums of dw and db in the accumulation dtype, added up below.
  const int64_t chunks = num_row_chunks(rows, cols);
  const auto part = x.options().dtype(acc);
  at::Tensor pw = w.defined() ? at::zeros({chunks, cols}, part) : at::Tensor();
  at::Tensor pb = b.defined() ? at::zeros({chunks, cols}, part) : at::Tensor();
  const at::Tensor scratch = scratch_for(x, chunks, cols);
  parallel_row_chunks(rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    LayerNormArgs ac = a;
    ac.grad_weight_part = row_ptr(pw, c), ac.grad_bias_part = row_ptr(pb, c), ac.scratch = row_ptr(scratch, c);
    fn(ac, rb, re);
  });
  // empty where weight (bias) is None, in input's dtype like the fake kernel says
  at::Tensor dw = at::empty({0}, input.options()), db = at::empty({0}, input.options());
  if (w.defined()) dw = pw.sum(0).view(normalized_shape).to(input.scalar_type());
  if (b.defined()) db = pb.sum(0).view(normalized_shape).to(input.scalar_type());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
