// fusedformer::attention_fwd / attention_bwd on CPU tensors: checks, dtype handling, mask views and
// threading around the per-capability bodies in kernels/attention.cpp. Nothing here allocates more than
// O(L * E) per (batch, head); the mask is read through a broadcast view, never expanded.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/common.h"
#include "cpu/kernels/attention.h"
#include "cpu/kernels/dropout.h"

namespace fusedformer {
namespace cpu {

KernelStub<AttentionFwdFn<float>> attention_fwd_f32_stub;
KernelStub<AttentionFwdFn<double>> attention_fwd_f64_stub;
KernelStub<AttentionBwdDeltaFn<float>> attention_bwd_delta_f32_stub;
KernelStub<AttentionBwdDeltaFn<double>> attention_bwd_delta_f64_stub;
KernelStub<AttentionBwdFn<float>> attention_bwd_f32_stub;
KernelStub<AttentionBwdFn<double>> attention_bwd_f64_stub;

namespace {

constexpr int64_t kMaxHeadDim = 256;
// Tiles of 64 queries x 64 keys: with E = 64 every float tile is 16 KiB, so the streamed operand
// stays in L1 and the per-thread buffers in L2. Blocks shrink, in steps of 16 (the float vector width,
// a multiple of the double one), when that gives an idle thread a task.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
constexpr int64_t kMinBlock = 16;
// A float32 logsumexp this large has an ulp of 2^-8 or more: too coarse to carry log l (see
// attention_bwd_cpu).
constexpr double kLargeLse = 65536.0;

struct Dims {
  int64_t B, Hq, Hk, L, S, E, Ev;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest block <= kBlock whose task count B_H * ceil(n / block) keeps every thread busy.
int64_t pick_block(int64_t full, int64_t heads, int64_t n) {
  int64_t block = full;
  while (block > kMinBlock && heads * ceil_div(n, block) < at::get_num_threads()) block /= 2;
  return block;
}

void check_rank4(const char* op, const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " to be 4-D ", layout, ", got shape ", t.sizes());
}

Dims check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  check_floating(query, op, "query");
  check_floating(key, op, "key");
  check_floating(value, op, "value");
  check_rank4(op, query, "query", "(B, Hq, L, E)");
  check_rank4(op, key, "key", "(B, Hk, S, E)");
  check_rank4(op, value, "value", "(B, Hk, S, Ev)");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
              ": expected query, key and value of one dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  const Dims d{query.size(0), query.size(1), key.size(1), query.size(2),
               key.size(2),   query.size(3), value.size(3)};
  TORCH_CHECK(key.size(0) == d.B && value.size(0) == d.B, op,
              ": expected query, key and value with one batch size, got shapes ", query.sizes(), ", ",
              key.sizes(), ", ", value.sizes());
  TORCH_CHECK(value.size(1) == d.Hk, op, ": expected value with key's number of heads (", d.Hk,
              "), got shape ", value.sizes());
  TORCH_CHECK(d.Hk > 0 ? d.Hq % d.Hk == 0 : d.Hq == 0, op, ": expected query's heads (", d.Hq,
              ") to be a multiple of key's (", d.Hk, ")");
  TORCH_CHECK(value.size(2) == d.S, op, ": expected value with key's length S = ", d.S, ", got shape ",
              value.sizes());
  TORCH_CHECK(key.size(3) == d.E, op, ": expected key's head dim to equal query's (", d.E, "), got shape ",
              key.sizes());
  TORCH_CHECK(d.E >= 1 && d.E <= kMaxHeadDim, op, ": expected query/key head dim E in [1, ", kMaxHeadDim,
              "], got ", d.E);
  TORCH_CHECK(d.Ev >= 1 && d.Ev <= kMaxHeadDim, op, ": expected value head dim Ev in [1, ", kMaxHeadDim,
              "], got ", d.Ev);
  return d;
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& query,
                at::IntArrayRef shape) {
  check_floating(t, op, name);
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": expected ", name, " of dtype ",
              query.scalar_type(), " like query, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
}

// In the compute dtype, with a contiguous last dim; other strides are kept (the kernels take them).
at::Tensor to_compute(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor x = t.to(ct);
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// A view of attn_mask broadcast to (B, Hq, L, S): broadcast dims have stride 0. A float mask in a
// half dtype is converted to `ct`, distinct elements only.
at::Tensor prepare_mask(const char* op, const std::optional<at::Tensor>& attn_mask, const at::Tensor& query,
                        const Dims& d, at::ScalarType ct) {
  if (!attn_mask) return at::Tensor();
  at::Tensor m = *attn_mask;
  TORCH_CHECK(m.device().is_cpu(), op, ": expected attn_mask on the CPU, got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == query.scalar_type(), op,
              ": expected attn_mask to be bool or of query's dtype ", query.scalar_type(), ", got ",
              m.scalar_type());
  const std::vector<int64_t> target{d.B, d.Hq, d.L, d.S};
  bool broadcasts = m.dim() <= 4;
  for (int64_t i = 0; broadcasts && i < m.dim(); ++i) {
    const int64_t size = m.size(i), want = target[4 - m.dim() + i];
    broadcasts = size == want || size == 1;
  }
  TORCH_CHECK(broadcasts, op, ": expected attn_mask broadcastable to (B, Hq, L, S) = ",
              at::IntArrayRef(target), " (each dim 1 or full), got shape ", m.sizes());
  while (m.dim() < 4) m = m.unsqueeze(0);
  if (m.scalar_type() != at::kBool && m.scalar_type() != ct) {
    for (int64_t i = 0; i < 4; ++i) {
      if (m.stride(i) == 0 && m.size(i) > 1) m = m.narrow(i, 0, 1);
    }
    m = m.to(ct);
  }
  return m.expand(target);
}

template <typename T, typename Args>
void set_common(Args& a, const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& mask, bool is_causal, double scale, double dropout_p, int64_t seed) {
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = k.stride(i);
    a.v_strides[i] = v.stride(i);
  }
  a.mask_keep = nullptr;
  a.mask_add = nullptr;
  for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask.defined() ? mask.stride(i) : 0;
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool) a.mask_keep = mask.data_ptr<bool>();
    else a.mask_add = mask.data_ptr<T>();
  }
  a.B = d.B;
  a.Hq = d.Hq;
  a.Hk = d.Hk;
  a.L = d.L;
  a.S = d.S;
  a.E = d.E;
  a.Ev = d.Ev;
  a.scale = scale;
  a.is_causal = is_causal;
  a.dropout_p = dropout_p;
  a.seed = seed;
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), got ", dropout_p);
}

// Fills out and lse, contiguous in T; or, given log_sum, only lse = m and log_sum = log l. Needs L, S > 0.
template <typename T>
void run_fwd(KernelStub<AttentionFwdFn<T>>& stub, const Dims& d, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& mask, bool is_causal, double scale, double dropout_p,
             int64_t seed, at::Tensor& out, at::Tensor& lse, at::Tensor& log_sum) {
  AttentionFwdArgs<T> a{};
  set_common<T>(a, d, q, k, v, mask, is_causal, scale, dropout_p, seed);
  a.out = log_sum.defined() ? nullptr : out.data_ptr<T>();
  a.lse = lse.data_ptr<T>();
  a.log_sum = log_sum.defined() ? log_sum.data_ptr<T>() : nullptr;
  a.block_m = pick_block(kBlockM, d.B * d.Hq, d.L);
  a.block_n = kBlockN;
  const auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no attention kernel was built for this CPU");
  const int64_t tasks = d.B * d.Hq * ceil_div(d.L, a.block_m);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     bool is_causal, double scale, double dropout_p,
                                                     int64_t seed) {
  const char* op = "fusedformer::attention_fwd";
  const Dims d = check_qkv(op, query, key, value);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  check_dropout(op, dropout_p);
  const auto ct = compute_dtype(query.scalar_type());
  const at::Tensor mask = prepare_mask(op, attn_mask, query, d, ct);
  const at::Tensor q = to_compute(query, ct), k = to_compute(key, ct), v = to_compute(value, ct);
  at::Tensor out = empty_output({d.B, d.Hq, d.L, d.Ev}, q.scalar_type());
  at::Tensor lse = at::empty({d.B, d.Hq, d.L}, q.options());
  if (out.numel() == 0 || d.S == 0) {
    // no key: every row is fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
  } else {
    at::Tensor no_split;
    if (ct == at::kDouble) {
      run_fwd<double>(attention_fwd_f64_stub, d, q, k, v, mask, is_causal, scale, dropout_p, seed, out, lse,
                      no_split);
    } else {
      run_fwd<float>(attention_fwd_f32_stub, d, q, k, v, mask, is_causal, scale, dropout_p, seed, out, lse,
                     no_split);
    }
  }
  return {out.to(query.scalar_type()), lse.to(at::kFloat)};
}

// Returns grad_q (B, Hq, L, E) in T; fills grad_k and grad_v. Needs L, S > 0.
template <typename T>
at::Tensor run_bwd(KernelStub<AttentionBwdDeltaFn<T>>& delta_stub, KernelStub<AttentionBwdFn<T>>& stub,
                   const Dims& d, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& log_sum, const at::Tensor& mask, bool is_causal, double scale,
                   double dropout_p, int64_t seed, at::Tensor& grad_k, at::Tensor& grad_v) {
  AttentionBwdArgs<T> a{};
  set_common<T>(a, d, q, k, v, mask, is_causal, scale, dropout_p, seed);
  a.grad_out = go.data_ptr<T>();
  a.out = out.data_ptr<T>();
  for (int i = 0; i < 3; ++i) {
    a.grad_out_strides[i] = go.stride(i);
    a.out_strides[i] = out.stride(i);
  }
  a.lse = lse.data_ptr<T>();
  a.log_sum = log_sum.defined() ? log_sum.data_ptr<T>() : nullptr;
  at::Tensor delta = at::empty({d.B, d.Hq, d.L}, q.options());
  a.delta = delta.data_ptr<T>();
  a.grad_k = grad_k.data_ptr<T>();
  a.grad_v = grad_v.data_ptr<T>();
  a.block_m = kBlockM;
  a.block_n = pick_block(kBlockN, d.B * d.Hk, d.S);
  const auto delta_fn = delta_stub.get();
  const auto fn = stub.get();
  TORCH_INTERNAL_ASSERT(fn && delta_fn, "no attention kernel was built for this CPU");

  const int64_t rows = d.B * d.Hq * d.L;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / d.Ev),
                   [&](int64_t begin, int64_t end) { delta_fn(a, begin, end); });

  // Each chunk (one per thread) runs consecutive tasks, whole key tiles: it owns its rows of grad_k
  // and grad_v, and the grad_q rows of the (batch, kv head) pairs it starts. A pair whose key tiles
  // straddle two chunks is also summed into a private copy by the later one, added in at the end.
  const int64_t n_ktiles = ceil_div(d.S, a.block_n), group = d.Hq / d.Hk;
  const int64_t tasks = d.B * d.Hk * n_ktiles;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), tasks);
  at::Tensor grad_q = empty_output({d.B, d.Hq, d.L, d.E}, q.scalar_type());
  at::Tensor row_sum = at::empty({d.B, d.Hq, d.L}, q.options());
  a.grad_q = grad_q.data_ptr<T>();
  a.row_sum = row_sum.data_ptr<T>();
  at::Tensor shared_grad_q = at::empty({chunks, group, d.L, d.E}, q.options());
  at::Tensor shared_row_sum = at::empty({chunks, group, d.L}, q.options());
  parallel_row_chunks(tasks, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    fn(a, begin, end, shared_grad_q[c].data_ptr<T>(), shared_row_sum[c].data_ptr<T>());
  });
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t begin = tasks * c / chunks;  // as parallel_row_chunks splits
    if (begin % n_ktiles == 0) continue;       // no shared pair
    const int64_t pair = begin / n_ktiles, b = pair / d.Hk, hk = pair % d.Hk;
    grad_q[b].narrow(0, hk * group, group).add_(shared_grad_q[c]);
    row_sum[b].narrow(0, hk * group, group).add_(shared_row_sum[c]);
  }
  // rows with no key to attend to have a row sum of 0, and a gradient of 0
  return grad_q.div_(row_sum.masked_fill_(row_sum == 0, 1).unsqueeze(-1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale, double dropout_p, int64_t seed) {
  const char* op = "fusedformer::attention_bwd";
  const Dims d = check_qkv(op, query, key, value);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  check_dropout(op, dropout_p);
  check_like(op, grad_out, "grad_out", query, {d.B, d.Hq, d.L, d.Ev});
  check_like(op, out, "out", query, {d.B, d.Hq, d.L, d.Ev});
  TORCH_CHECK(logsumexp.device().is_cpu(), op, ": expected logsumexp on the CPU, got ", logsumexp.device());
  TORCH_CHECK(logsumexp.scalar_type() == at::kFloat, op, ": expected logsumexp of dtype float32, got ",
              logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.sizes() == at::IntArrayRef({d.B, d.Hq, d.L}), op, ": expected logsumexp of shape ",
              at::IntArrayRef({d.B, d.Hq, d.L}), ", got ", logsumexp.sizes());
  const auto ct = compute_dtype(query.scalar_type());
  const at::Tensor mask = prepare_mask(op, attn_mask, query, d, ct);
  const at::Tensor q = to_compute(query, ct), k = to_compute(key, ct), v = to_compute(value, ct);
  at::Tensor grad_k = empty_output({d.B, d.Hk, d.S, d.E}, q.scalar_type());
  at::Tensor grad_v = empty_output({d.B, d.Hk, d.S, d.Ev}, q.scalar_type());
  at::Tensor grad_q;
  if (d.B * d.Hq * d.L == 0 || d.S == 0) {
    grad_q = at::zeros({d.B, d.Hq, d.L, d.E}, q.options());
    grad_k.zero_();
    grad_v.zero_();
  } else {
    const at::Tensor go = to_compute(grad_out, ct), o = to_compute(out, ct);
    // The backward's P = exp(score - lse) is only as exact as lse. In float64 a float32 lse would cap
    // the gradients at float32 accuracy; and where the row max m is huge (a row masked entirely by a
    // finite additive mask such as finfo.min, a softmax over that row), m + log l rounds to m. Then
    // the backward recomputes lse, split as m and log l, in the compute dtype: one more Q K^T pass.
    at::Tensor lse = logsumexp.contiguous();
    bool split = ct == at::kDouble;
    const float* lse_ptr = lse.data_ptr<float>();
    for (int64_t i = 0; i < lse.numel() && !split; ++i) {
      split = std::isfinite(lse_ptr[i]) && std::abs(lse_ptr[i]) >= kLargeLse;
    }
    if (split) lse = at::empty({d.B, d.Hq, d.L}, q.options());
    at::Tensor log_sum = split ? at::empty({d.B, d.Hq, d.L}, q.options()) : at::Tensor();
    at::Tensor unused;
    // the recomputed logsumexp is that of the un-dropped probabilities: no dropout in that pass
    if (ct == at::kDouble) {
      run_fwd<double>(attention_fwd_f64_stub, d, q, k, v, mask, is_causal, scale, 0.0, 0, unused, lse, log_sum);
      grad_q = run_bwd<double>(attention_bwd_delta_f64_stub, attention_bwd_f64_stub, d, go, q, k, v, o, lse,
                               log_sum, mask, is_causal, scale, dropout_p, seed, grad_k, grad_v);
    } else {
      if (split) {
        run_fwd<float>(attention_fwd_f32_stub, d, q, k, v, mask, is_causal, scale, 0.0, 0, unused, lse,
                       log_sum);
      }
      grad_q = run_bwd<float>(attention_bwd_delta_f32_stub, attention_bwd_f32_stub, d, go, q, k, v, o, lse,
                              log_sum, mask, is_causal, scale, dropout_p, seed, grad_k, grad_v);
    }
  }
  return {grad_q.to(query.scalar_type()), grad_k.to(key.scalar_type()), grad_v.to(value.scalar_type())};
}

// The dropout mask the kernels draw for these sizes, dense: (B, H, L, S) bool, True = kept. For tests.
at::Tensor attention_dropout_mask_cpu(int64_t B, int64_t H, int64_t L, int64_t S, double dropout_p,
                                      int64_t seed) {
  const char* op = "fusedformer::attention_dropout_mask";
  TORCH_CHECK(B >= 0 && H >= 0 && L >= 0 && S >= 0, op, ": expected sizes >= 0, got (", B, ", ", H, ", ", L,
              ", ", S, ")");
  check_dropout(op, dropout_p);
  at::Tensor keep = at::empty({B, H, L, S}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  bool* out = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold(dropout_p);
  at::parallel_for(0, B * H * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const DropoutKeys keys = dropout_keys(seed, r / L);
      for (int64_t j = 0; j < S; ++j) out[r * S + j] = dropout_keep(keys, threshold, r % L, j);
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

// No tensor argument: nothing for the dispatcher to route by, so the op registers as a composite (it
// makes a CPU tensor) rather than under the CPU key.
TORCH_LIBRARY_IMPL(fusedformer, CompositeExplicitAutograd, m) {
  m.impl("attention_dropout_mask", &attention_dropout_mask_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
