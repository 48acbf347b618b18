// fusedformer::gelu_fwd / gelu_bwd on CPU tensors: checks and threading around the per-capability
// bodies in kernels/gelu.cpp. The tensors keep their dtype (bf16/fp16 included): the kernels convert a
// vector at a time, never a whole tensor; the partial sums of the bias gradient are in the accumulation
// dtype (float32, float64 for float64).
#include <torch/library.h>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/gelu.h"

namespace fusedformer {
namespace cpu {

KernelStub<GeluFn> gelu_fwd_stub;
KernelStub<GeluFn> gelu_bwd_stub;

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

GeluArgs make_args(const at::Tensor& x, const at::Tensor& b, bool tanh_approx) {
  GeluArgs a{};
  a.dtype = scalar_of(x.scalar_type());
  a.x = x.const_data_ptr();
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.cols = x.dim() == 0 ? 1 : x.size(-1);
  a.rows = a.cols == 0 ? 0 : x.numel() / a.cols;
  a.tanh_approx = tanh_approx;
  return a;
}

at::Tensor gelu_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                        c10::string_view approximate) {
  const char* op = "fusedformer::gelu_fwd";
  const bool tanh_approx = is_tanh(approximate, op);
  check_inputs(op, input, bias);
  const at::Tensor x = input.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = empty_output_like(x);
  GeluArgs a = make_args(x, b, tanh_approx);
  a.out = y.data_ptr();
  auto fn = gelu_fwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no GELU kernel was built for this CPU");
  const int64_t chunks = num_row_chunks(a.rows, a.cols);
  parallel_row_chunks(a.rows, chunks, [&](int64_t, int64_t rb, int64_t re) { fn(a, rb, re); });
  return y;
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
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(input.scalar_type()).contiguous();  // the kernel reads it in input's dtype
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor dx = empty_output_like(x);
  GeluArgs a = make_args(x, b, tanh_approx);
  a.grad_out = dy.const_data_ptr();
  a.out = dx.data_ptr();
  auto fn = gelu_bwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no GELU kernel was built for this CPU");
  // Per-chunk partial sums of the bias gradient in the accumulation dtype, added up below.
  const int64_t chunks = num_row_chunks(a.rows, a.cols);
  at::Tensor partial;
  if (b.defined()) partial = at::zeros({chunks, a.cols}, x.options().dtype(compute_dtype(input.scalar_type())));
  parallel_row_chunks(a.rows, chunks, [&](int64_t c, int64_t rb, int64_t re) {
    GeluArgs ac = a;
    ac.grad_bias_part = row_ptr(partial, c);
    fn(ac, rb, re);
  });
  at::Tensor db = at::empty({0}, input.options());  // empty where bias is None, in input's dtype
  if (b.defined()) db = partial.sum(0).to(input.scalar_type());
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd_cpu);
  m.impl("gelu_bwd", &gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
