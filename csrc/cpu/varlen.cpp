// fusedformer::varlen_attention_fwd / varlen_attention_bwd on CPU tensors: attention over packed
// sequences, on the attention kernels of kernels/attention.cpp, unchanged.
//
// Packed layout, tokens first: query (total_q, Hq, E), key (total_k, Hk, E), value (total_k, Hk, Ev);
// sequence b holds queries [cu_q[b], cu_q[b + 1]) and keys [cu_k[b], cu_k[b + 1]), and its queries see
// its keys only. Sequence b seen by the kernels is a batch of one: q_b = query[cu_q[b]:].permute(1, 0, 2)
// read in place through its strides (batch stride unused, head stride query.stride(1), row stride
// query.stride(0)), L = L_b, S = S_b. Nothing is padded, so no padding position is ever read or
// computed. The kernels write their outputs contiguous per call ((Hq, L_b, Ev) for out, (Hq, L_b) for
// the logsumexp and dQ's row sums, (Hk, S_b, E) for dK and dV): scratch blocks laid end to end at
// offsets Hq * cu_q[b] (Hk * cu_k[b] for keys), each tile (backward: each unit) copied into the packed
// layout by the thread that computed it, right after it (O(total * H * E) in all, against the
// O(L_b * S_b * H * E) of the attention). Outputs and scratch come from the huge-page output cache.
//
// Scheduling. Forward: the tasks of all sequences (b, query head, query tile) in one list, each with
// its cost (rows x keys it visits, so causal tiles count what they compute), cut into one contiguous
// range per thread of about equal cost; a thread runs its range as one kernel call per sequence it
// touches, so the packed keys of a head are reused across its tiles as in attention_fwd. Backward:
// one unit per (sequence, kv head) (a call with B = Hk = 1 and the group's Hq / Hk query heads), which
// owns its rows of dK, dV, dQ: no unit waits on another. Units go to threads by longest-first greedy
// bin packing, deterministic for a given thread count; a unit costing more than a thread's fair share
// runs alone, split over all threads by the kernel's own chunks (its deterministic dQ accumulation).
//
// Dropout: the kernels key the mask by (seed, bh, i, j) with bh = b * Hq + h (kernels/dropout.h); each
// call here passes its sequence's b * Hq (+ kv head * group) as dropout_bh_offset, and i, j count
// from the sequence's start. The mask is thus exactly attention_fwd's on the padded batch
// (B, Hq, max_L, max_S): fusedformer::attention_dropout_mask(B, Hq, max_L, max_S)[b, :, :L_b, :S_b].
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/attention.h"
#include "cpu/common.h"
#include "cpu/kernels/attention.h"

namespace fusedformer {
namespace cpu {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMinBlock = 16;
constexpr double kLargeLse = 65536.0;  // as attention_bwd_cpu: a float32 lse too coarse to recompute P from

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// the kernels' order of query (forward) and key (backward) tiles within a head: 0, n-1, 1, n-2, ...
int64_t zigzag(int64_t u, int64_t n) { return u % 2 == 0 ? u / 2 : n - 1 - u / 2; }

struct Seq {
  int64_t q0, L, k0, S;  // first query and key row in the packed tensors, and the lengths
};

struct VarlenDims {
  int64_t B, Hq, Hk, E, Ev, total_q, total_k;
  std::vector<Seq> seqs;
};

// Reads and checks the cumulative lengths: int32, 1-D (B + 1,), on the CPU, from 0, non-decreasing,
// ending at the packed length, each length within its max_seqlen. TypeError / ValueError in Python, as
// the public function's own checks.
std::vector<int64_t> read_cu(const char* op, const at::Tensor& cu, const char* name, int64_t total,
                             int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": expected ", name, " of dtype int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), op, ": expected ", name, " on the CPU like query, got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, op, ": expected ", name, " to be 1-D (B + 1,), got shape ",
              cu.sizes());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + c.numel());
  TORCH_CHECK_VALUE(out[0] == 0, op, ": expected ", name, "[0] == 0, got ", out[0]);
  for (size_t b = 1; b < out.size(); ++b) {
    TORCH_CHECK_VALUE(out[b] >= out[b - 1], op, ": expected ", name, " non-decreasing, got ", name, "[", b, "] = ",
                out[b], " < ", name, "[", b - 1, "] = ", out[b - 1]);
    TORCH_CHECK_VALUE(out[b] - out[b - 1] <= max_seqlen, op, ": sequence ", b - 1, " has length ",
                out[b] - out[b - 1], " > ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(out.back() == total, op, ": expected ", name, "[-1] to equal the packed length ", total, ", got ",
              out.back());
  return out;
}

VarlenDims check_inputs(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_floating(query, op, "query");
  check_floating(key, op, "key");
  check_floating(value, op, "value");
  TORCH_CHECK(query.dim() == 3, op, ": expected query to be 3-D (total_q, Hq, E), got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, op, ": expected key to be 3-D (total_k, Hk, E), got shape ", key.sizes());
  TORCH_CHECK(value.dim() == 3, op, ": expected value to be 3-D (total_k, Hk, Ev), got shape ", value.sizes());
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
              ": expected query, key and value of one dtype, got ", query.scalar_type(), ", ", key.scalar_type(),
              ", ", value.scalar_type());
  VarlenDims d;
  d.total_q = query.size(0);
  d.Hq = query.size(1);
  d.E = query.size(2);
  d.total_k = key.size(0);
  d.Hk = key.size(1);
  d.Ev = value.size(2);
  TORCH_CHECK(value.size(0) == d.total_k && value.size(1) == d.Hk, op,
              ": expected value (total_k, Hk, Ev) with key's total_k = ", d.total_k, " and Hk = ", d.Hk,
              ", got shape ", value.sizes());
  TORCH_CHECK(key.size(2) == d.E, op, ": expected key's head dim to equal query's (", d.E, "), got shape ",
              key.sizes());
  TORCH_CHECK(d.Hk > 0 && d.Hq % d.Hk == 0, op, ": expected query's heads (", d.Hq,
              ") to be a positive multiple of key's (", d.Hk, ")");
  TORCH_CHECK(d.E >= 1 && d.E <= kMaxHeadDim, op, ": expected query/key head dim E in [1, ", kMaxHeadDim,
              "], got ", d.E);
  TORCH_CHECK(d.Ev >= 1 && d.Ev <= kMaxHeadDim, op, ": expected value head dim Ev in [1, ", kMaxHeadDim,
              "], got ", d.Ev);
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op, ": expected cu_seqlens_q and cu_seqlens_k of one length B + 1, got ",
              cu_q.numel(), " and ", cu_k.numel());
  const std::vector<int64_t> cq = read_cu(op, cu_q, "cu_seqlens_q", d.total_q, max_q, "max_seqlen_q");
  const std::vector<int64_t> ck = read_cu(op, cu_k, "cu_seqlens_k", d.total_k, max_k, "max_seqlen_k");
  d.B = static_cast<int64_t>(cq.size()) - 1;
  for (int64_t b = 0; b < d.B; ++b) d.seqs.push_back({cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]});
  return d;
}

at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

const char* at_row(const at::Tensor& t, int64_t row) {
  return static_cast<const char*>(t.const_data_ptr()) + row * t.stride(0) * t.element_size();
}

// Per-sequence forward arguments over all heads (B = 1), everything but out / lse / log_sum.
AttentionFwdArgs seq_fwd_args(const VarlenDims& d, const Seq& s, int64_t b, const MatmulEngine* engine,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                              double scale, double dropout_p, int64_t seed, int64_t block_m, int64_t block_n) {
  AttentionFwdArgs a{};
  a.dtype = scalar_of(q.scalar_type());
  a.engine = engine;
  a.q = at_row(q, s.q0);
  a.k = at_row(k, s.k0);
  a.v = at_row(v, s.k0);
  a.q_strides[0] = 0, a.q_strides[1] = q.stride(1), a.q_strides[2] = q.stride(0);
  a.k_strides[0] = 0, a.k_strides[1] = k.stride(1), a.k_strides[2] = k.stride(0);
  a.v_strides[0] = 0, a.v_strides[1] = v.stride(1), a.v_strides[2] = v.stride(0);
  a.B = 1, a.Hq = d.Hq, a.Hk = d.Hk, a.L = s.L, a.S = s.S, a.E = d.E, a.Ev = d.Ev;
  a.block_m = block_m;
  a.block_n = block_n;
  a.scale = scale;
  a.is_causal = is_causal;
  a.dropout_p = dropout_p;
  a.seed = seed;
  a.dropout_bh_offset = b * d.Hq;
  return a;
}

// The forward over every sequence with L_b, S_b > 0: out_s (dtype) and lse_s (acc) are the scratch
// blocks (see the file comment), or, with log_sum_s, only lse_s = m and log_sum_s = log l.
// After each kernel call, epilogue(b, h, i0, im) runs on the same thread for every query tile it computed
// (rows [i0, i0 + im) of head h of sequence b): the copy into the packed layout, while the tile is hot
// and without another parallel region (on a busy machine, each one costs a wake-up of every thread).
template <typename Epilogue>
void run_varlen_fwd(const VarlenDims& d, const MatmulEngine* engine, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, bool is_causal, double scale, double dropout_p, int64_t seed,
                    const at::Tensor& out_s, const at::Tensor& lse_s, const at::Tensor& log_sum_s,
                    const Epilogue& epilogue) {
  const AttentionBlocks blocks = attention_blocks(engine);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t block_m = blocks.fwd_m;
  auto count_tasks = [&](int64_t bm) {
    int64_t n = 0;
    for (const Seq& s : d.seqs) n += s.L > 0 && s.S > 0 ? d.Hq * ceil_div(s.L, bm) : 0;
    return n;
  };
  while (block_m > kMinBlock && count_tasks(block_m) < threads) block_m /= 2;
  // the tasks of all sequences in one list; cost = rows x keys visited
  std::vector<AttentionFwdArgs> args;
  std::vector<int64_t> seq_of;      // per call: its sequence
  std::vector<int64_t> first_task;  // per call: its first task in the global list
  std::vector<double> cum_cost{0.0};
  const size_t es = out_s.defined() ? out_s.element_size() : 0, acc_es = lse_s.element_size();
  for (int64_t b = 0; b < d.B; ++b) {
    const Seq& s = d.seqs[b];
    if (s.L == 0 || s.S == 0) continue;
    AttentionFwdArgs a = seq_fwd_args(d, s, b, engine, q, k, v, is_causal, scale, dropout_p, seed, block_m,
                                      blocks.fwd_n);
    const int64_t row0 = d.Hq * s.q0;  // the sequence's first row in the scratch blocks
    a.out = log_sum_s.defined() ? nullptr : static_cast<char*>(out_s.data_ptr()) + row0 * d.Ev * es;
    a.out_strides[0] = 0, a.out_strides[1] = s.L * d.Ev, a.out_strides[2] = d.Ev;  // (Hq, L_b, Ev) in the scratch
    a.lse = static_cast<char*>(lse_s.data_ptr()) + row0 * acc_es;
    a.log_sum = log_sum_s.defined() ? static_cast<char*>(log_sum_s.data_ptr()) + row0 * acc_es : nullptr;
    first_task.push_back(static_cast<int64_t>(cum_cost.size()) - 1);
    args.push_back(a);
    seq_of.push_back(b);
    const int64_t n_tiles = ceil_div(s.L, block_m);
    for (int64_t h = 0; h < d.Hq; ++h) {
      for (int64_t u = 0; u < n_tiles; ++u) {
        const int64_t i0 = zigzag(u, n_tiles) * block_m, im = std::min(block_m, s.L - i0);
        const int64_t keys = is_causal ? std::min(s.S, i0 + im) : s.S;
        cum_cost.push_back(cum_cost.back() + static_cast<double>(im) * static_cast<double>(keys + 16));
      }
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(cum_cost.size()) - 1;
  if (n_tasks == 0) return;
  first_task.push_back(n_tasks);
  const auto fn = attention_fwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no attention kernel was built for this CPU");
  // range r: the tasks whose cost prefix lies in [total * r / ranges, total * (r + 1) / ranges)
  const int64_t ranges = std::min(threads, n_tasks);
  std::vector<int64_t> bounds(ranges + 1, n_tasks);
  bounds[0] = 0;
  for (int64_t r = 1; r < ranges; ++r) {
    const double target = cum_cost.back() * static_cast<double>(r) / static_cast<double>(ranges);
    bounds[r] = std::lower_bound(cum_cost.begin(), cum_cost.end(), target) - cum_cost.begin();
    bounds[r] = std::clamp<int64_t>(bounds[r], bounds[r - 1], n_tasks);
  }
  at::parallel_for(0, ranges, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t t0 = bounds[r], t1 = bounds[r + 1];
      if (t0 >= t1) continue;
      size_t c = std::upper_bound(first_task.begin(), first_task.end(), t0) - first_task.begin() - 1;
      for (; c < args.size() && first_task[c] < t1; ++c) {
        const int64_t lo = std::max(t0, first_task[c]), hi = std::min(t1, first_task[c + 1]);
        fn(args[c], lo - first_task[c], hi - first_task[c]);
        const int64_t n_tiles = ceil_div(args[c].L, block_m);
        for (int64_t t = lo - first_task[c]; t < hi - first_task[c]; ++t) {
          const int64_t i0 = zigzag(t % n_tiles, n_tiles) * block_m;
          epilogue(seq_of[c], t / n_tiles, i0, std::min(block_m, args[c].L - i0));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool is_causal, double scale,
                                                            double dropout_p, int64_t seed) {
  const char* op = "fusedformer::varlen_attention_fwd";
  const VarlenDims d = check_inputs(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), got ", dropout_p);
  const at::ScalarType dtype = query.scalar_type(), acc = compute_dtype(dtype);
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  at::Tensor out = empty_output({d.total_q, d.Hq, d.Ev}, dtype);
  at::Tensor lse = at::empty({d.Hq, d.total_q}, query.options().dtype(at::kFloat));
  // a sequence with no key: out = 0, lse = +inf
  for (const Seq& s : d.seqs) {
    if (s.L > 0 && s.S == 0) {
      out.narrow(0, s.q0, s.L).zero_();
      lse.narrow(1, s.q0, s.L).fill_(std::numeric_limits<double>::infinity());
    }
  }
  if (d.total_q == 0 || d.total_k == 0) return {out, lse};
  at::Tensor out_s = empty_output({d.Hq * d.total_q, d.Ev}, dtype);
  at::Tensor lse_s = empty_output({d.Hq * d.total_q}, acc);
  run_varlen_fwd(d, attention_engine_for(dtype, false), q, k, v, is_causal, scale, dropout_p, seed, out_s, lse_s,
                 at::Tensor(), [&](int64_t b, int64_t h, int64_t i0, int64_t im) {
                   const Seq& s = d.seqs[b];
                   const int64_t r0 = d.Hq * s.q0 + h * s.L + i0;  // the tile's first scratch row
                   out.narrow(0, s.q0 + i0, im).select(1, h).copy_(out_s.narrow(0, r0, im));
                   lse.select(0, h).narrow(0, s.q0 + i0, im).copy_(lse_s.narrow(0, r0, im));
                 });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale,
    double dropout_p, int64_t seed) {
  const char* op = "fusedformer::varlen_attention_bwd";
  const VarlenDims d = check_inputs(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), got ", dropout_p);
  const std::vector<int64_t> o_shape{d.total_q, d.Hq, d.Ev};
  auto check_like_out = [&](const at::Tensor& t, const char* name) {
    check_floating(t, op, name);
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": expected ", name, " of dtype ", query.scalar_type(),
                " like query, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(o_shape), op, ": expected ", name, " of shape ",
                at::IntArrayRef(o_shape), ", got ", t.sizes());
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(out, "out");
  TORCH_CHECK(logsumexp.device().is_cpu() && logsumexp.scalar_type() == at::kFloat &&
                  logsumexp.sizes() == at::IntArrayRef({d.Hq, d.total_q}),
              op, ": expected logsumexp (Hq, total_q) = (", d.Hq, ", ", d.total_q, ") float32 on the CPU, got ",
              logsumexp.sizes(), " ", logsumexp.scalar_type(), " on ", logsumexp.device());
  const at::ScalarType dtype = query.scalar_type(), acc = compute_dtype(dtype);
  at::Tensor grad_q = empty_output({d.total_q, d.Hq, d.E}, dtype);
  at::Tensor grad_k = empty_output({d.total_k, d.Hk, d.E}, dtype);
  at::Tensor grad_v = empty_output({d.total_k, d.Hk, d.Ev}, dtype);
  // rows no unit computes (queries without keys, keys without queries) have gradient 0
  for (const Seq& s : d.seqs) {
    if (s.L > 0 && s.S == 0) grad_q.narrow(0, s.q0, s.L).zero_();
    if (s.S > 0 && s.L == 0) {
      grad_k.narrow(0, s.k0, s.S).zero_();
      grad_v.narrow(0, s.k0, s.S).zero_();
    }
  }
  if (d.total_q == 0 || d.total_k == 0) return {grad_q, grad_k, grad_v};
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  const at::Tensor go = rows_contiguous(grad_out), o = rows_contiguous(out);
  const int64_t G = d.Hq / d.Hk;

  // lse in the scratch layout; split into m and log l (one more Q K^T pass) where float32 is too
  // coarse: float64, or a huge |lse| (see attention_bwd_cpu)
  at::Tensor lse_s = empty_output({d.Hq * d.total_q}, acc), log_sum_s;
  bool split = acc == at::kDouble;
  const at::Tensor lse_in = logsumexp.contiguous();
  const float* lse_ptr = lse_in.const_data_ptr<float>();
  for (int64_t i = 0; i < lse_in.numel() && !split; ++i) {
    split = std::isfinite(lse_ptr[i]) && std::abs(lse_ptr[i]) >= kLargeLse;
  }
  if (split) {
    log_sum_s = at::empty({d.Hq * d.total_q}, query.options().dtype(acc));
    run_varlen_fwd(d, attention_engine_for(dtype, false), q, k, v, is_causal, scale, 0.0, 0, at::Tensor(), lse_s,
                   log_sum_s, [](int64_t, int64_t, int64_t, int64_t) {});
  } else {
    for (const Seq& s : d.seqs) {
      if (s.L == 0) continue;
      lse_s.narrow(0, d.Hq * s.q0, d.Hq * s.L).view({d.Hq, s.L}).copy_(lse_in.narrow(1, s.q0, s.L));
    }
  }

  const MatmulEngine* engine = attention_engine_for(dtype, true);
  const AttentionBlocks blocks = attention_blocks(engine);
  const int64_t block_m = blocks.bwd_m, block_n = std::max<int64_t>(kPanel, blocks.bwd_n / kPanel * kPanel);
  at::Tensor dq_s = empty_output({d.Hq * d.total_q, d.E}, acc);
  at::Tensor row_sum_s = empty_output({d.Hq * d.total_q}, acc);
  at::Tensor dk_s = empty_output({d.Hk * d.total_k * d.E}, dtype);
  at::Tensor dv_s = empty_output({d.Hk * d.total_k * d.Ev}, dtype);
  int64_t n_tickets = 0;
  for (const Seq& s : d.seqs) n_tickets += s.S > 0 ? d.Hq * ceil_div(s.L, block_m) : 0;
  at::Tensor tickets = at::zeros({std::max<int64_t>(1, n_tickets)}, query.options().dtype(at::kInt));

  // one unit per (sequence, kv head): B = Hk = 1, the group's G query heads
  std::vector<AttentionBwdArgs> units;
  std::vector<std::pair<int64_t, int64_t>> unit_of;  // (sequence, kv head)
  std::vector<double> costs;
  const size_t es = query.element_size(), acc_es = lse_s.element_size();
  int64_t ticket0 = 0;
  for (int64_t b = 0; b < d.B; ++b) {
    const Seq& s = d.seqs[b];
    if (s.L == 0 || s.S == 0) continue;
    for (int64_t hk = 0; hk < d.Hk; ++hk) {
      AttentionBwdArgs a{};
      a.dtype = scalar_of(dtype);
      a.engine = engine;
      const int64_t h0 = hk * G;
      auto at_qrow = [&](const at::Tensor& t) {
        return at_row(t, s.q0) + h0 * t.stride(1) * t.element_size();
      };
      auto at_krow = [&](const at::Tensor& t) {
        return at_row(t, s.k0) + hk * t.stride(1) * t.element_size();
      };
      a.q = at_qrow(q);
      a.grad_out = at_qrow(go);
      a.out = at_qrow(o);
      a.k = at_krow(k);
      a.v = at_krow(v);
      const at::Tensor* strided[] = {&go, &o, &q, &k, &v};
      int64_t* strides[] = {a.grad_out_strides, a.out_strides, a.q_strides, a.k_strides, a.v_strides};
      for (int i = 0; i < 5; ++i) {
        strides[i][0] = 0;
        strides[i][1] = strided[i]->stride(1);
        strides[i][2] = strided[i]->stride(0);
      }
      const int64_t qrow0 = d.Hq * s.q0 + h0 * s.L;  // the unit's first row in the query-side scratch
      const int64_t krow0 = d.Hk * s.k0 + hk * s.S;  // and in the key side's
      a.lse = static_cast<const char*>(lse_s.const_data_ptr()) + qrow0 * acc_es;
      a.log_sum = split ? static_cast<const char*>(log_sum_s.const_data_ptr()) + qrow0 * acc_es : nullptr;
      a.grad_q = static_cast<char*>(dq_s.data_ptr()) + qrow0 * d.E * acc_es;
      a.row_sum = static_cast<char*>(row_sum_s.data_ptr()) + qrow0 * acc_es;
      a.grad_k = static_cast<char*>(dk_s.data_ptr()) + krow0 * d.E * es;
      a.grad_v = static_cast<char*>(dv_s.data_ptr()) + krow0 * d.Ev * es;
      a.tickets = tickets.data_ptr<int32_t>() + ticket0;
      ticket0 += G * ceil_div(s.L, block_m);
      a.B = 1, a.Hq = G, a.Hk = 1, a.L = s.L, a.S = s.S, a.E = d.E, a.Ev = d.Ev;
      a.block_m = block_m;
      a.block_n = block_n;
      a.chunks = 1;
      a.scale = scale;
      a.is_causal = is_causal;
      a.dropout_p = dropout_p;
      a.seed = seed;
      a.dropout_bh_offset = b * d.Hq + h0;
      units.push_back(a);
      unit_of.emplace_back(b, hk);
      // query-key pairs computed (causal: query i sees min(i + 1, S) keys), per query head
      double pairs = static_cast<double>(s.L) * static_cast<double>(s.S);
      if (is_causal) {
        const double n = static_cast<double>(std::min(s.L, s.S));
        pairs = n * (n + 1) / 2 + static_cast<double>(std::max<int64_t>(0, s.L - s.S)) * static_cast<double>(s.S);
      }
      costs.push_back(static_cast<double>(G) * (pairs + 64.0 * static_cast<double>(s.L + s.S)));
    }
  }
  // A unit's rows into the packed gradients: dQ divided by its rows' probability sums (see
  // kernels/attention.cpp; every row of a unit sees a key, so no sum is 0), dK and dV as they are.
  auto unpack_unit = [&](size_t i) {
    const auto [b, hk] = unit_of[i];
    const Seq& s = d.seqs[b];
    const int64_t qrow0 = d.Hq * s.q0 + hk * G * s.L, krow0 = d.Hk * s.k0 + hk * s.S;
    const at::Tensor dq = dq_s.narrow(0, qrow0, G * s.L).view({G, s.L, d.E});
    dq.div_(row_sum_s.narrow(0, qrow0, G * s.L).view({G, s.L, 1}));
    grad_q.narrow(0, s.q0, s.L).narrow(1, hk * G, G).copy_(dq.transpose(0, 1));
    grad_k.narrow(0, s.k0, s.S).select(1, hk).copy_(dk_s.narrow(0, krow0 * d.E, s.S * d.E).view({s.S, d.E}));
    grad_v.narrow(0, s.k0, s.S).select(1, hk).copy_(dv_s.narrow(0, krow0 * d.Ev, s.S * d.Ev).view({s.S, d.Ev}));
  };
  const auto fn = attention_bwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no attention kernel was built for this CPU");
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  double total = 0.0;
  for (double c : costs) total += c;
  // longest first; a unit above a thread's share runs alone on every thread (the kernel's chunks)
  std::vector<size_t> order(units.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return costs[x] > costs[y]; });
  std::vector<std::vector<size_t>> bins(threads);
  std::vector<double> load(threads, 0.0);
  for (size_t i : order) {
    const int64_t tasks = ceil_div(units[i].S, block_n);
    if (threads > 1 && costs[i] > total / static_cast<double>(threads) && tasks > 1) {
      AttentionBwdArgs a = units[i];
      a.chunks = std::min<int64_t>(threads, tasks);
      at::parallel_for(0, a.chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = end - 1; c >= begin; --c) fn(a, c);
      });
      unpack_unit(i);
      continue;
    }
    const size_t t = std::min_element(load.begin(), load.end()) - load.begin();
    bins[t].push_back(i);
    load[t] += costs[i];
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (size_t i : bins[t]) {
        fn(units[i], 0);
        unpack_unit(i);
      }
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
