// fusedformer::layer_norm_*, rms_norm_*, add_layer_norm_*, add_rms_norm_* on CPU tensors: checks and threading around the
// per-capability bodies in kernels/layer_norm.cpp. The tensors keep their dtype (bf16/fp16 included):
// the kernels widen a row at a time into a few float32 rows of scratch per chunk, never a whole tensor;
// mean, rstd and the partial sums of the parameter gradients are in the accumulation dtype (float32,
// float64 for float64).
#include <torch/library.h>

#include <limits>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/dropout.h"
#include "cpu/kernels/layer_norm.h"

namespace fusedformer {
namespace cpu {

KernelStub<LayerNormFn> layer_norm_fwd_stub;
KernelStub<LayerNormFn> layer_norm_bwd_stub;
KernelStub<LayerNormFn> rms_norm_fwd_stub;
KernelStub<LayerNormFn> rms_norm_bwd_stub;

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

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), got ", dropout_p);
}

// A tensor that must match `like` (input or residual_out) in shape and dtype, made contiguous.
at::Tensor like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_floating(t, op, name);
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " of dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  return t.contiguous();
}

// The forward of every norm op: LayerNorm (rms = false) or RMSNorm, of input or, with a residual, of
// h = dropout(input) + residual. Returns (out, residual_out (undefined without a residual), mean
// (undefined for RMS), rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const char* op, bool rms, const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, double dropout_p, int64_t seed) {
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  check_dropout(op, dropout_p);
  const at::Tensor x = input.contiguous();
  const at::Tensor res = residual ? like_input(op, "residual", *residual, input) : at::Tensor();
  const at::Tensor w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  at::Tensor y = empty_output_like(x);
  at::Tensor h = res.defined() ? empty_output_like(x) : at::Tensor();
  const auto lead = input.sizes().slice(0, input.dim() - normalized_shape.size());
  const auto stats = x.options().dtype(compute_dtype(input.scalar_type()));
  at::Tensor mean = rms ? at::Tensor() : at::empty(lead, stats);
  at::Tensor rstd = at::empty(lead, stats);
  if (cols == 0 || rows == 0) {  // as torch: an empty output, mean 0 and rstd 1/sqrt(0/0 + eps) = NaN per row
    if (mean.defined()) mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, h, mean, rstd};
  }
  LayerNormArgs a = make_args(x, w, b, rows, cols);
  a.out = y.data_ptr(), a.rstd = rstd.data_ptr(), a.eps = eps;
  a.mean = mean.defined() ? mean.data_ptr() : nullptr;
  if (res.defined()) {
    a.residual = res.const_data_ptr(), a.residual_out = h.data_ptr();
    a.dropout_p = dropout_p, a.seed = seed;
  }
  auto fn = (rms ? rms_norm_fwd_stub : layer_norm_fwd_stub).get();
  TORCH_INTERNAL_ASSERT(fn, "no norm kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(rows, cols);
  const at::Tensor scratch = scratch_for(x, chunks, cols);
  parallel_row_chunks(rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    LayerNormArgs ac = a;
    ac.scratch = row_ptr(scratch, c);
    fn(ac, rb, re);
  });
  return {y, h, mean, rstd};
}

// The backward of every norm op, x being the normalised rows (input, or residual_out h). Returns (dx
// (dh with a residual, plus grad_residual_out), the dropped input's gradient (empty unless dropout_p >
// 0), grad_weight, grad_bias (empty where weight, bias are None)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const char* op, bool rms, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double dropout_p, int64_t seed) {
  const auto [rows, cols] = check_inputs(op, input, normalized_shape, weight, bias);
  check_floating(grad_out, op, "grad_out");
  check_dropout(op, dropout_p);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(),
              " like input, got ", grad_out.sizes());
  const auto acc = compute_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::make_pair("mean", mean ? &*mean : nullptr), std::make_pair("rstd", &rstd)}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == acc, op, ": expected ", name, " with ", rows,
                " elements of dtype ", acc, " (from the forward), got shape ", t->sizes(), " dtype ",
                t->scalar_type());
  }
  TORCH_INTERNAL_ASSERT(rms || mean.has_value(), op, ": LayerNorm's backward needs mean");
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(input.scalar_type()).contiguous();  // the kernel reads it in input's dtype
  const at::Tensor dres =
      grad_residual_out ? like_input(op, "grad_residual_out", grad_residual_out->to(input.scalar_type()), input)
                        : at::Tensor();
  const at::Tensor w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  const at::Tensor mu = mean ? mean->contiguous() : at::Tensor(), rs = rstd.contiguous();
  at::Tensor dx = empty_output_like(x);
  at::Tensor dinput = dropout_p > 0 ? empty_output_like(x) : at::empty({0}, input.options());
  if (cols == 0 || rows == 0) {  // nothing to normalise: empty dx; dw, db (as torch) zeros of normalized_shape
    at::Tensor dw = w.defined() ? at::zeros(normalized_shape, input.options()) : at::empty({0}, input.options());
    at::Tensor db = b.defined() ? at::zeros(normalized_shape, input.options()) : at::empty({0}, input.options());
    if (dinput.numel() > 0) dinput.zero_();
    return {dx, dinput, dw, db};
  }
  LayerNormArgs a = make_args(x, w, b, rows, cols);
  a.grad_out = dy.const_data_ptr(), a.out = dx.data_ptr();
  a.mean = mu.defined() ? mu.data_ptr() : nullptr, a.rstd = rs.data_ptr();
  a.grad_residual_out = dres.defined() ? dres.const_data_ptr() : nullptr;
  if (dropout_p > 0) a.grad_input = dinput.data_ptr(), a.dropout_p = dropout_p, a.seed = seed;
  auto fn = (rms ? rms_norm_bwd_stub : layer_norm_bwd_stub).get();
  TORCH_INTERNAL_ASSERT(fn, "no norm kernel was built for this CPU");
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
  return {dx, dinput, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& input,
                                                                  at::IntArrayRef normalized_shape,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  auto [y, h, mean, rstd] =
      norm_fwd("fusedformer::layer_norm_fwd", false, input, std::nullopt, normalized_shape, weight, bias, eps, 0, 0);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  auto [dx, dinput, dw, db] = norm_bwd("fusedformer::layer_norm_bwd", false, grad_out, std::nullopt, input,
                                       normalized_shape, mean, rstd, weight, bias, 0, 0);
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                    const std::optional<at::Tensor>& weight, double eps) {
  auto [y, h, mean, rstd] =
      norm_fwd("fusedformer::rms_norm_fwd", true, input, std::nullopt, normalized_shape, weight, std::nullopt, eps, 0, 0);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                    at::IntArrayRef normalized_shape, const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& weight) {
  auto [dx, dinput, dw, db] = norm_bwd("fusedformer::rms_norm_bwd", true, grad_out, std::nullopt, input,
                                       normalized_shape, std::nullopt, rstd, weight, std::nullopt, 0, 0);
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, double dropout_p,
    int64_t seed) {
  return norm_fwd("fusedformer::add_layer_norm_fwd", false, input, residual, normalized_shape, weight, bias, eps,
                  dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& residual_out,
    at::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double dropout_p, int64_t seed) {
  return norm_bwd("fusedformer::add_layer_norm_bwd", false, grad_out, grad_residual_out, residual_out,
                  normalized_shape, mean, rstd, weight, bias, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cpu(const at::Tensor& input,
                                                                    const at::Tensor& residual,
                                                                    at::IntArrayRef normalized_shape,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    double eps, double dropout_p, int64_t seed) {
  auto [y, h, mean, rstd] = norm_fwd("fusedformer::add_rms_norm_fwd", true, input, residual, normalized_shape, weight,
                                     std::nullopt, eps, dropout_p, seed);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& residual_out,
    at::IntArrayRef normalized_shape, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    double dropout_p, int64_t seed) {
  auto [dh, dinput, dw, db] = norm_bwd("fusedformer::add_rms_norm_bwd", true, grad_out, grad_residual_out,
                                       residual_out, normalized_shape, std::nullopt, rstd, weight, std::nullopt,
                                       dropout_p, seed);
  return {dh, dinput, dw};
}

at::Tensor add_norm_dropout_mask_cpu(int64_t rows, int64_t cols, double dropout_p, int64_t seed) {
  const char* op = "fusedformer::add_norm_dropout_mask";
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": expected sizes >= 0, got (", rows, ", ", cols, ")");
  check_dropout(op, dropout_p);
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  bool* out = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold(dropout_p);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const DropoutKeys keys = dropout_keys(seed, r >> 32);
      const uint32_t a = dropout_row_hash<uint32_t>(keys, static_cast<uint32_t>(r));
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = add_norm_dropout_keep(keys, a, threshold, c);
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cpu);
  m.impl("add_rms_norm_bwd", &add_rms_norm_bwd_cpu);
}

// No tensor argument: nothing for the dispatcher to route by, so the op registers as a composite (it
// makes a CPU tensor) rather than under the CPU key.
TORCH_LIBRARY_IMPL(fusedformer, CompositeExplicitAutograd, m) {
  m.impl("add_norm_dropout_mask", &add_norm_dropout_mask_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
