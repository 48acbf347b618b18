// float32 linear layers on oneDNN's batch-reduce GEMM: out = input weight^T (+ bias).
//
// Why: torch's CPU float32 linear is MKL's sgemm, at the hardware's peak on Intel and on its AVX2 path
// on AMD (about 215 GFLOP/s on 2 Zen 5 cores, where oneDNN's JIT-compiled AVX-512 kernels reach twice
// that). oneDNN's brgemm is reached through torch's exported at::native::cpublas, as the attention's
// tile products are (csrc/cpu/matmul.cpp); which of the two serves a model's layer is measured, not
// assumed (fusedformer/nn/linear.py).
//
// Two layouts: many rows take the weight packed into panels of weight^T (once per call, shared by every
// row block); a few rows (<= 64) take the weight as brgemm's A operand unpacked (linear_few_rows).
//
// Accuracy: the reduction over K runs in chunks of kChunk, each chunk's products summed by brgemm in one
// chain and the chunks' sums then added in order: a float32 error of about (kChunk + K / kChunk) roundings
// rather than K of a single chain (oneDNN's own matmul sums one chain: 3x torch's error at K = 2048).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fusedformer {
namespace cpu {
namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kPanel = 64;   // columns of out per product (one brgemm N block)
constexpr int64_t kRows = 64;    // rows of out per task
constexpr int64_t kChunk = 128;  // K per brgemm call; the chunks' sums are added in order

void check_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "fusedformer.linear: expected CPU tensors");
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "fusedformer.linear: the CPU kernel takes float32 input and weight, got ", input.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "fusedformer.linear: expected a 2-D weight (out_features, in_features), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "fusedformer.linear: input's last dimension (",
              input.dim() >= 1 ? input.size(-1) : 0, ") must equal weight's in_features (", weight.size(1), ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                "fusedformer.linear: expected a float32 CPU bias of shape (", weight.size(0), ",), got ",
                bias->scalar_type(), " ", bias->sizes());
  }
}

// weight (N x K, row-major) -> panels of kPanel columns of weight^T: panel p is K x kPanel row-major,
// column n = weight row p * kPanel + n, zero past N.
void pack_weight(const float* w, int64_t N, int64_t K, float* panels) {
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* out = panels + p * K * kPanel;
      const int64_t nb = std::min(kPanel, N - p * kPanel);
      if (nb < kPanel) std::memset(out, 0, K * kPanel * sizeof(float));
      for (int64_t n = 0; n < nb; ++n) {
        const float* row = w + (p * kPanel + n) * K;
        for (int64_t k = 0; k < K; ++k) out[k * kPanel + n] = row[k];
      }
    }
  });
}

// acc (M x N, ldc N) = A (M x K, lda) B (K x N, ldb N), K summed in chunks of kChunk by brgemm, the
// chunks' sums added in order (see the accuracy note above); part: M x N scratch, used when K > kChunk.
void chunked_product(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, float* acc,
                     float* part) {
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    float* dst = k0 == 0 ? acc : part;
    cpublas::brgemm(M, N, kc, lda, N, N, false, A + k0, B + k0 * N, dst, false);
    if (k0 > 0) {
      for (int64_t i = 0; i < M * N; ++i) acc[i] += part[i];
    }
  }
}

// Few rows (at most kPanel): out^T = weight input^T, so that the weight is brgemm's A operand as it lies
// (row-major N x K, no packing) and only input^T (K x rows, small) is written out; each task takes 64
// rows of the weight (64 outputs) and writes its block of out transposed back, bias added.
void linear_few_rows(const float* x, const float* w, const float* b, int64_t rows, int64_t N, int64_t K, float* out) {
  std::vector<float> xt(K * rows);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t k = 0; k < K; ++k) xt[k * rows + m] = x[m * K + k];
  }
  const int64_t n_blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, n_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kRows * rows), part(K > kChunk ? kRows * rows : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kRows, nr = std::min(kRows, N - n0);
      chunked_product(nr, rows, K, w + n0 * K, K, xt.data(), acc.data(), part.data());
      for (int64_t m = 0; m < rows; ++m) {
        float* row = out + m * N + n0;
        for (int64_t n = 0; n < nr; ++n) row[n] = acc[n * rows + m] + (b != nullptr ? b[n0 + n] : 0.0f);
      }
    }
  });
}

at::Tensor linear_fwd_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_args(input, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty(out_shape, input.options());
  const int64_t rows = out.numel() / std::max<int64_t>(N, 1);
  if (out.numel() == 0) return out;
  const at::Tensor b_keep = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* b = b_keep.defined() ? b_keep.const_data_ptr<float>() : nullptr;
  if (K == 0) {  // an empty sum: the bias alone
    if (b_keep.defined()) {
      out.view({rows, N}).copy_(b_keep.unsqueeze(0).expand({rows, N}));
    } else {
      out.zero_();
    }
    return out;
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  if (rows <= kPanel) {
    linear_few_rows(x.const_data_ptr<float>(), w.const_data_ptr<float>(), b, rows, N, K, out.data_ptr<float>());
    return out;
  }
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  at::Tensor panels = at::empty({n_panels, K, kPanel}, w.options());
  pack_weight(w.const_data_ptr<float>(), N, K, panels.data_ptr<float>());
  const float* xp = x.const_data_ptr<float>();
  const float* pp = panels.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t m_blocks = (rows + kRows - 1) / kRows;
  // tasks: (row block, panel), the panels of one row block together (its rows of input stay in cache)
  at::parallel_for(0, m_blocks * n_panels, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kRows * kPanel), part(K > kChunk ? kRows * kPanel : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / n_panels, p = t % n_panels;
      const int64_t m0 = mb * kRows, mr = std::min(kRows, rows - m0);
      const int64_t n0 = p * kPanel, nb = std::min(kPanel, N - n0);
      const float* a = xp + m0 * K;
      const float* panel = pp + p * K * kPanel;
      chunked_product(mr, kPanel, K, a, K, panel, acc.data(), part.data());
      for (int64_t m = 0; m < mr; ++m) {
        float* row = op + (m0 + m) * N + n0;
        const float* src = acc.data() + m * kPanel;
        if (b != nullptr) {
          for (int64_t n = 0; n < nb; ++n) row[n] = src[n] + b[n0 + n];
        } else {
          std::memcpy(row, src, nb * sizeof(float));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) { m.impl("linear_fwd", &linear_fwd_cpu); }

}  // namespace cpu
}  // namespace fusedformer
