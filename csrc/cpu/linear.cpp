// float32 linear layers on oneDNN's batch-reduce GEMM: out = input weight^T (+ bias).
//
// Why: torch's CPU float32 linear is MKL's sgemm, at the hardware's peak on Intel and on its AVX2 path
// on AMD (about 215 GFLOP/s on 2 Zen 5 cores, where oneDNN's JIT-compiled AVX-512 kernels reach twice
// that). oneDNN's brgemm is reached through torch's exported at::native::cpublas, as the attention's
// tile products are (csrc/cpu/matmul.cpp); which of the two serves a model's layer is measured, not
// assumed (fusedformer/nn/linear.py).
//
// Layouts: many rows take the weight packed into panels of weight^T (once per call, shared by every row
// block); a few rows (<= 64) take the weight as brgemm's A operand unpacked (linear_few_rows). A weight stored
// (in, out) (transformers' Conv1D) and passed transposed is weight^T as it lies: copied into panels for many
// rows, read in place by a few. The backward: grad_input = grad weight on the same tasks (linear_bwd_input),
// grad_weight = grad^T input over slabs of rows (linear_bwd_weight).
//
// Outputs and the per-call scratch (packed panels, a transposed operand) come from the fused ops' cache of
// huge-page blocks (cpu/allocator.h): a fresh 64 MiB output otherwise costs its 4 KiB page faults on
// every call (a quarter of the time of 8192 x 512 x 2048 on a Zen 5).
//
// Accuracy: the reduction over K runs in chunks of kChunk, each chunk's products summed by brgemm in one
// chain and the chunks' sums then added in order: a float32 error of about (kChunk + K / kChunk) roundings
// rather than K of a single chain (oneDNN's own matmul sums one chain: 3x torch's error at K = 2048).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "cpu/allocator.h"

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
constexpr int64_t kSlab = 1024;  // grad_weight: rows per slab (its scratch is one slab of the narrower operand)

void check_float_cpu(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "fusedformer.", op, ": expected CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "fusedformer.", op,
              ": the CPU kernel takes float32 ", a_name, " and ", b_name, ", got ", a.scalar_type(), " and ",
              b.scalar_type());
}

void check_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_float_cpu("linear", input, "input", weight, "weight");
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

// acc (M x N, ldc N) = A (M x K, lda) B (K x N, ldb), K summed in chunks of kChunk by brgemm, the chunks'
// sums added in order (see the accuracy note above); part: M x N scratch, used when K > kChunk.
void chunked_product(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* acc, float* part) {
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    float* dst = k0 == 0 ? acc : part;
    cpublas::brgemm(M, N, kc, lda, ldb, N, false, A + k0, B + k0 * ldb, dst, false);
    if (k0 > 0) {
      for (int64_t i = 0; i < M * N; ++i) acc[i] += part[i];
    }
  }
}

// The leading dimension of a copy of rows of K floats: whole 64-byte lines, an odd number of them, so
// that the rows of a block fall in different L1 sets. brgemm reads A's rows of a block together; at a
// stride of a power of two bytes (K = 512, 2048, or the R = 8192 rows of grad_weight's A) they share a
// few sets and evict each other: measured 20-25 % slower (8192 x 2048 x 512 on a Zen 5).
inline int64_t padded_ld(int64_t K) {
  const int64_t ld = (K + 15) / 16 * 16;
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for rows [0, R) and columns [c_begin, c_end), in strips of 16
// columns (one cache line of each source row per strip).
void transpose_columns(const float* src, int64_t R, int64_t ld_src, int64_t c_begin, int64_t c_end, float* dst,
                       int64_t ld_dst) {
  for (int64_t c0 = c_begin; c0 < c_end; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, c_end - c0);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < cn; ++c) dst[(c0 + c) * ld_dst + r] = src[r * ld_src + c0 + c];
    }
  }
}

// Panel p of src (R x C, ld): R x kPanel row-major, columns p * kPanel.., zero past C.
void pack_panel(const float* src, int64_t R, int64_t C, int64_t ld, int64_t p, float* dst) {
  const int64_t c0 = p * kPanel, cn = std::min(kPanel, C - c0);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(dst + r * kPanel, src + r * ld + c0, cn * sizeof(float));
    if (cn < kPanel) std::memset(dst + r * kPanel + cn, 0, (kPanel - cn) * sizeof(float));
  }
}

// B (Kr x Nc: the reduction first) in panels of kPanel columns (panel p: Kr x kPanel row-major, zero past Nc), from
// row-major data of B itself (b_is_transposed false: Kr x Nc) or of B^T (true: Nc x Kr, as a linear layer's
// weight holds the forward's B).
at::Tensor b_panels(const float* data, bool b_is_transposed, int64_t Kr, int64_t Nc) {
  const int64_t n_panels = (Nc + kPanel - 1) / kPanel;
  at::Tensor panels = empty_output({n_panels, Kr, kPanel}, at::kFloat);
  float* pp = panels.data_ptr<float>();
  if (b_is_transposed) {
    pack_weight(data, Nc, Kr, pp);
  } else {
    at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) pack_panel(data, Kr, Nc, Nc, p, pp + p * Kr * kPanel);
    });
  }
  return panels;
}

// A 2-D weight as row-major data: itself when contiguous (transposed = false), else the data of its transpose
// when that is contiguous (transposed = true: a weight stored (in, out), as transformers' Conv1D holds it,
// passed as weight.t()), else a contiguous copy.
struct RowMajor {
  at::Tensor data;
  bool transposed;
};
RowMajor row_major(const at::Tensor& w) {
  if (w.is_contiguous()) return {w, false};
  if (w.t().is_contiguous()) return {w.t(), true};
  return {w.contiguous(), false};
}

// B of a product (K x N): in panels (b_panels: ldb kPanel, zero-padded), or row-major as it lies (ldb = N; its
// last panel narrower), which a few rows prefer (one pass over B, no copy of it).
struct BOperand {
  const float* data;
  int64_t K, N;
  bool packed;
  int64_t n_panels() const { return (N + kPanel - 1) / kPanel; }
  const float* panel(int64_t p) const { return packed ? data + p * K * kPanel : data + p * kPanel; }
  int64_t ldb() const { return packed ? kPanel : N; }
  int64_t width(int64_t p) const { return packed ? kPanel : std::min(kPanel, N - p * kPanel); }
};

// out blocks = A (rows x K, lda) B, the sum over K in chunks. Tasks: kRows rows x one panel of B, the panels of
// a row block together, so each thread copies a row block of A once (to padded_ld) for all of them.
// write(m0, mr, p, acc, ld): acc is mr x B.width(p) (leading dimension ld).
template <typename Write>
void rows_by_panels(int64_t rows, int64_t K, const float* A, int64_t lda, const BOperand& B, const Write& write) {
  const int64_t n_panels = B.n_panels();
  const int64_t m_blocks = (rows + kRows - 1) / kRows, ld = padded_ld(K);
  at::parallel_for(0, m_blocks * n_panels, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kRows * kPanel), part(K > kChunk ? kRows * kPanel : 0), a_rows(kRows * ld);
    int64_t copied = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / n_panels, p = t % n_panels;
      const int64_t m0 = mb * kRows, mr = std::min(kRows, rows - m0);
      if (mb != copied) {
        for (int64_t m = 0; m < mr; ++m) std::memcpy(a_rows.data() + m * ld, A + (m0 + m) * lda, K * sizeof(float));
        copied = mb;
      }
      const int64_t w = B.width(p);
      chunked_product(mr, w, K, a_rows.data(), ld, B.panel(p), B.ldb(), acc.data(), part.data());
      write(m0, mr, p, acc.data(), w);
    }
  });
}

// Few rows (at most kRows): out^T = weight input^T, so that the weight is brgemm's A operand as it lies
// (row-major N x K, no packing) and only input^T (K x rows, small) is written out; each task takes 64
// rows of the weight (64 outputs) and writes its block of out transposed back, bias added.
void linear_few_rows(const float* x, const float* w, const float* b, int64_t rows, int64_t N, int64_t K, float* out) {
  std::vector<float> xt(K * rows);
  transpose_columns(x, rows, K, 0, K, xt.data(), rows);
  const int64_t n_blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, n_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kRows * rows), part(K > kChunk ? kRows * rows : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kRows, nr = std::min(kRows, N - n0);
      chunked_product(nr, rows, K, w + n0 * K, K, xt.data(), rows, acc.data(), part.data());
      for (int64_t m = 0; m < rows; ++m) {
        float* row = out + m * N + n0;
        for (int64_t n = 0; n < nr; ++n) row[n] = acc[n * rows + m] + (b != nullptr ? b[n0 + n] : 0.0f);
      }
    }
  });
}

// B (Kr x Nc) for rows_by_panels, from row-major data of B (b_is_transposed false) or of B^T (true). B^T is
// packed (transposed into panels); B itself is read in place by a few rows (<= kRows: one pass over it, where
// a copy would be a second), packed for more (its rows at any stride then, see padded_ld). keep: the panels.
BOperand b_operand(const float* data, bool b_is_transposed, int64_t Kr, int64_t Nc, int64_t rows, at::Tensor& keep) {
  if (!b_is_transposed && rows <= kRows) return {data, Kr, Nc, false};
  keep = b_panels(data, b_is_transposed, Kr, Nc);
  return {keep.const_data_ptr<float>(), Kr, Nc, true};
}

at::Tensor linear_fwd_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_args(input, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = empty_output(out_shape, at::kFloat);
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
  // B = weight^T (K x N): packed from the weight (N x K) as it lies, or copied in panels from an (in, out)
  // weight passed transposed; a few rows take an (out, in) weight unpacked (linear_few_rows)
  const RowMajor w = row_major(weight);
  if (rows <= kRows && !w.transposed) {
    linear_few_rows(x.const_data_ptr<float>(), w.data.const_data_ptr<float>(), b, rows, N, K, out.data_ptr<float>());
    return out;
  }
  at::Tensor panels;
  const BOperand B = b_operand(w.data.const_data_ptr<float>(), !w.transposed, K, N, rows, panels);
  float* op = out.data_ptr<float>();
  rows_by_panels(rows, K, x.const_data_ptr<float>(), K, B,
                 [&](int64_t m0, int64_t mr, int64_t p, const float* acc, int64_t ld) {
                   const int64_t n0 = p * kPanel, nb = std::min(kPanel, N - n0);
                   for (int64_t m = 0; m < mr; ++m) {
                     float* row = op + (m0 + m) * N + n0;
                     const float* src = acc + m * ld;
                     if (b != nullptr) {
                       for (int64_t n = 0; n < nb; ++n) row[n] = src[n] + b[n0 + n];
                     } else {
                       std::memcpy(row, src, nb * sizeof(float));
                     }
                   }
                 });
  return out;
}

// grad_input (*, K) = grad (*, N) weight (N, K): the weight cut into panels of kPanel of its columns (a
// copy, no transposition; an (in, out) weight passed transposed is packed instead), then the forward's
// tasks, the sum over N in chunks.
at::Tensor linear_bwd_input_cpu(const at::Tensor& grad, const at::Tensor& weight) {
  check_float_cpu("linear_bwd_input", grad, "grad", weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && grad.dim() >= 1 && grad.size(-1) == weight.size(0),
              "fusedformer.linear_bwd_input: expected grad (*, N) and weight (N, K), got ", grad.sizes(), " and ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end() - 1);
  out_shape.push_back(K);
  at::Tensor out = empty_output(out_shape, at::kFloat);
  if (out.numel() == 0) return out;
  if (N == 0) return out.zero_();
  const int64_t rows = out.numel() / K;
  const at::Tensor g = grad.contiguous();
  const RowMajor w = row_major(weight);  // B = weight (N x K): as it lies, or from an (in, out) weight's data
  at::Tensor panels;
  const BOperand B = b_operand(w.data.const_data_ptr<float>(), w.transposed, N, K, rows, panels);
  float* op = out.data_ptr<float>();
  rows_by_panels(rows, N, g.const_data_ptr<float>(), N, B,
                 [&](int64_t m0, int64_t mr, int64_t p, const float* acc, int64_t ld) {
                   const int64_t c0 = p * kPanel, cn = std::min(kPanel, K - c0);
                   for (int64_t m = 0; m < mr; ++m) std::memcpy(op + (m0 + m) * K + c0, acc + m * ld, cn * sizeof(float));
                 });
  return out;
}

// grad_weight (N, K) = grad^T input, summed over the R rows of grad (R x N) and input (R x K) in chunks.
// brgemm's A operand is row-major, so one of the two is transposed once per call, the narrower: grad
// (then grad_weight = grad^T input) or input (then grad_weight^T = input^T grad, written back transposed).
at::Tensor linear_bwd_weight_cpu(const at::Tensor& grad, const at::Tensor& input) {
  check_float_cpu("linear_bwd_weight", grad, "grad", input, "input");
  TORCH_CHECK(grad.dim() >= 1 && input.dim() >= 1 && grad.sizes().slice(0, grad.dim() - 1) ==
                                                         input.sizes().slice(0, input.dim() - 1),
              "fusedformer.linear_bwd_weight: expected grad (*, N) and input (*, K) with the same leading shape, got ",
              grad.sizes(), " and ", input.sizes());
  const int64_t N = grad.size(-1), K = input.size(-1);
  at::Tensor out = empty_output({N, K}, at::kFloat);
  if (out.numel() == 0) return out;
  const int64_t R = grad.numel() / N;
  if (R == 0) return out.zero_();
  const bool grad_is_a = N <= K;
  const at::Tensor a_rows = (grad_is_a ? grad : input).reshape({R, grad_is_a ? N : K});
  const at::Tensor b_rows = (grad_is_a ? input : grad).reshape({R, grad_is_a ? K : N}).contiguous();
  const int64_t na = a_rows.size(1), nb = b_rows.size(1);
  // The rows in slabs of kSlab: per slab, a_rows^T (na x slab, at a padded leading dimension) is written
  // out, then tasks (panel of b_rows' columns, 64 rows of a_t) sum its chunks and add the slab's sum into
  // out in slab order. The scratch stays na x kSlab however many rows there are.
  const int64_t slab_max = std::min(R, kSlab), lda = padded_ld(slab_max);
  at::Tensor a_t_keep = empty_output({na, lda}, at::kFloat);
  float* a_t = a_t_keep.data_ptr<float>();
  const at::Tensor a_src = a_rows.contiguous();
  const float* sp = a_src.const_data_ptr<float>();
  const float* bp = b_rows.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t m_blocks = (na + kRows - 1) / kRows, n_panels = (nb + kPanel - 1) / kPanel;
  for (int64_t r0 = 0; r0 < R; r0 += kSlab) {
    const int64_t rn = std::min(kSlab, R - r0);
    at::parallel_for(0, m_blocks, 1, [&](int64_t b0, int64_t b1) {
      transpose_columns(sp + r0 * na, rn, na, b0 * kRows, std::min(na, b1 * kRows), a_t, lda);
    });
    // the row blocks of one panel together, so each thread copies a panel (rn x kPanel) once for all of them
    at::parallel_for(0, m_blocks * n_panels, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(kRows * kPanel), part(rn > kChunk ? kRows * kPanel : 0), panel(rn * kPanel);
      int64_t packed = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / m_blocks, mb = t % m_blocks;
        const int64_t m0 = mb * kRows, mr = std::min(kRows, na - m0);
        const int64_t c0 = p * kPanel, cn = std::min(kPanel, nb - c0);
        if (p != packed) {
          pack_panel(bp + r0 * nb, rn, nb, nb, p, panel.data());
          packed = p;
        }
        chunked_product(mr, kPanel, rn, a_t + m0 * lda, lda, panel.data(), kPanel, acc.data(), part.data());
        // into out along its rows: out[m0 + m, c0 + c] (grad_is_a) or out[c0 + c, m0 + m] (transposed back)
        const bool first = r0 == 0;
        if (grad_is_a) {
          for (int64_t m = 0; m < mr; ++m) {
            float* dst = op + (m0 + m) * K + c0;
            const float* src = acc.data() + m * kPanel;
            for (int64_t c = 0; c < cn; ++c) dst[c] = first ? src[c] : dst[c] + src[c];
          }
        } else {
          for (int64_t c = 0; c < cn; ++c) {
            float* dst = op + (c0 + c) * K + m0;
            const float* src = acc.data() + c;
            for (int64_t m = 0; m < mr; ++m) dst[m] = first ? src[m * kPanel] : dst[m] + src[m * kPanel];
          }
        }
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_bwd_input", &linear_bwd_input_cpu);
  m.impl("linear_bwd_weight", &linear_bwd_weight_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
