// fusedformer::attention_fwd / attention_bwd on CPU tensors: checks, mask views, the choice of the
// product engine (measured, see `calibration`), scratch and threading around the per-capability bodies
// in kernels/attention.cpp. The tensors keep their dtype: the kernels convert tiles, never whole
// tensors. Scratch: per thread, the packed keys and values of one (batch, kv head) pair and tile
// buffers; O(L) per (batch, head) for the statistics; and, for bf16/fp16, a float32 accumulator of dQ.
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/attention.h"
#include "cpu/common.h"
#include "cpu/kernels/attention.h"
#include "cpu/kernels/dropout.h"
#include "cpu/matmul.h"

namespace fusedformer {
namespace cpu {

KernelStub<AttentionFwdFn> attention_fwd_stub;
KernelStub<AttentionDecodeFn> attention_decode_stub;
KernelStub<AttentionDecodeMergeFn> attention_decode_merge_stub;
KernelStub<AttentionBwdFn> attention_bwd_stub;

namespace {

constexpr int64_t kMaxHeadDim = 256;
// Query tiles shrink, in steps down to kMinBlock, when that gives an idle thread a task.
constexpr int64_t kMinBlock = 16;
// A float32 logsumexp this large has an ulp of 2^-8 or more: too coarse to carry log l (see
// attention_bwd_cpu).
constexpr double kLargeLse = 65536.0;

struct Dims {
  int64_t B, Hq, Hk, L, S, E, Ev;
};

// Tile sizes per engine: queries per tile, keys per block (forward) or per task (backward; its query
// tiles are at most kPanel). The micro-kernel keeps a 64-key panel of K^T or V in L1; oneDNN's
// kernels pay a per-call cost and, on AMX, load and store the accumulator tiles per call, so the
// forward gives them 128 x 512 tiles (P V a 512-long reduction). Measured on an Intel Xeon of the
// Sapphire Rapids class with AMX, forward 64 x 256 -> 128 x 512: bf16 non-causal L=4096 1.16x -> 1.28x
// torch; backward key tiles 64/128/256/512: 128 best (benchmarks/NOTES.md).
struct Blocks {
  int64_t fwd_m, fwd_n, bwd_m, bwd_n;
};

Blocks blocks_for(const MatmulEngine* engine) {
  return engine->mm == nullptr ? Blocks{64, 64, 64, 64} : Blocks{128, 512, 64, 128};
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest block <= full whose task count heads * ceil(n / block) keeps every thread busy.
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

// The kernels read rows in place: only the last dim must be contiguous.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A view of attn_mask broadcast to (B, Hq, L, S): broadcast dims have stride 0. A float mask in a
// half dtype is converted to float32 (the kernels add it in float32), distinct elements only.
at::Tensor prepare_mask(const char* op, const std::optional<at::Tensor>& attn_mask, const at::Tensor& query,
                        const Dims& d) {
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
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  if (m.scalar_type() != at::kBool && m.scalar_type() != acc) {
    for (int64_t i = 0; i < 4; ++i) {
      if (m.stride(i) == 0 && m.size(i) > 1) m = m.narrow(i, 0, 1);
    }
    m = m.to(acc);
  }
  return m.expand(target);
}

template <typename Args>
void set_common(Args& a, const Dims& d, const MatmulEngine* engine, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const at::Tensor& mask, bool is_causal, double scale, double dropout_p,
                int64_t seed) {
  a.dtype = scalar_of(q.scalar_type());
  a.engine = engine;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = k.stride(i);
    a.v_strides[i] = v.stride(i);
  }
  a.mask_keep = nullptr;
  a.mask_add = nullptr;
  for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask.defined() ? mask.stride(i) : 0;
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool) a.mask_keep = mask.const_data_ptr<bool>();
    else a.mask_add = mask.const_data_ptr();
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

// The dropout seed arrives as a tensor (one int64 element on the CPU) so that the caller can draw it inside
// a torch.compile'd region without a graph break (.item() there would be one); it is read here, in the
// glue, before any kernel runs. Without dropout it is not read and may be None.
int64_t read_seed(const char* op, const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), op,
              ": dropout_p > 0 needs a seed (a one-element int64 tensor on the CPU), got None");
  TORCH_CHECK(seed->scalar_type() == at::kLong, op, ": expected seed of dtype int64, got ", seed->scalar_type());
  TORCH_CHECK(seed->numel() == 1, op, ": expected seed with one element, got shape ", seed->sizes());
  TORCH_CHECK(seed->device().is_cpu(), op, ": expected seed on the CPU, got ", seed->device());
  return *seed->const_data_ptr<int64_t>();
}

// Fills out (dtype) and lse (acc); or, given log_sum, only lse = m and log_sum = log l. Needs L, S > 0.
void run_fwd(const MatmulEngine* engine, const Dims& d, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& mask, bool is_causal, double scale, double dropout_p,
             int64_t seed, at::Tensor& out, at::Tensor& lse, at::Tensor& log_sum) {
  AttentionFwdArgs a{};
  set_common(a, d, engine, q, k, v, mask, is_causal, scale, dropout_p, seed);
  a.out = log_sum.defined() ? nullptr : out.data_ptr();
  for (int i = 0; i < 3; ++i) a.out_strides[i] = out.defined() ? out.stride(i) : 0;
  a.lse = lse.data_ptr();
  a.log_sum = log_sum.defined() ? log_sum.data_ptr() : nullptr;
  const Blocks blocks = blocks_for(engine);
  a.block_m = pick_block(blocks.fwd_m, d.B * d.Hq, d.L);
  a.block_n = blocks.fwd_n;
  const auto fn = attention_fwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no attention kernel was built for this CPU");
  const int64_t tasks = d.B * d.Hq * ceil_div(d.L, a.block_m);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// The decode kernel serves a forward whose query rows per kv head (Hq / Hk x L) are at most this many
// (one token per sequence in generation, with GQA groups up to 16), against at least kDecodeMinKeys
// keys: the main kernel's tasks are query tiles, too few and too thin to keep the threads and the
// memory busy there (B=4, H=12, one query, S=4096: 48 single-row tasks).
constexpr int64_t kDecodeRows = 16;
constexpr int64_t kDecodeMinKeys = 64;

bool decode_shaped(const Dims& d, double dropout_p) {
  return dropout_p == 0.0 && d.Hk > 0 && d.Hq / d.Hk * d.L <= kDecodeRows && d.S >= kDecodeMinKeys;
}

// Fills out (dtype) and lse (acc) with the decode kernel: each (batch, kv head)'s keys split in chunks
// over the threads, then merged. seq_lens: (B,) keys per sequence, or nullptr (all S); causal as
// AttentionDecodeArgs::causal.
void run_decode(const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                int causal, const int64_t* seq_lens, int64_t max_keys, double scale, at::Tensor& out,
                at::Tensor& lse, bool inference, bool chunked_scores = false) {
  AttentionDecodeArgs a{};
  a.inference = inference;
  a.chunked_scores = chunked_scores;
  a.dtype = scalar_of(q.scalar_type());
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = k.stride(i);
    a.v_strides[i] = v.stride(i);
  }
  for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask.defined() ? mask.stride(i) : 0;
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool) a.mask_keep = mask.const_data_ptr<bool>();
    else a.mask_add = mask.const_data_ptr();
  }
  a.B = d.B;
  a.Hq = d.Hq;
  a.Hk = d.Hk;
  a.L = d.L;
  a.S = d.S;
  a.E = d.E;
  a.Ev = d.Ev;
  a.seq_lens = seq_lens;
  a.causal = causal;
  a.scale = scale;
  const int64_t rows = d.Hq / d.Hk * d.L;
  a.block_m = std::min<int64_t>(64, rows);
  const int64_t pairs = d.B * d.Hk * ceil_div(rows, a.block_m);
  // enough chunks for every thread to have a few tasks, none shorter than 256 keys
  const int64_t want = ceil_div(4 * at::get_num_threads(), pairs);
  const int64_t n_chunks = std::max<int64_t>(1, std::min(want, ceil_div(max_keys, 256)));
  a.chunk = std::max<int64_t>(kPanel, (ceil_div(max_keys, n_chunks) + kPanel - 1) / kPanel * kPanel);
  a.n_chunks = std::max<int64_t>(1, ceil_div(max_keys, a.chunk));
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  at::Tensor part_o = at::empty({pairs * a.n_chunks * a.block_m * d.Ev}, q.options().dtype(acc));
  at::Tensor part_ml = at::empty({pairs * a.n_chunks * a.block_m * 2}, q.options().dtype(acc));
  a.part_o = part_o.data_ptr();
  a.part_ml = part_ml.data_ptr();
  a.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) a.out_strides[i] = out.stride(i);
  a.lse = lse.data_ptr();
  const auto fn = attention_decode_stub.get();
  const auto merge = attention_decode_merge_stub.get();
  TORCH_INTERNAL_ASSERT(fn && merge, "no attention kernel was built for this CPU");
  at::parallel_for(0, pairs * a.n_chunks, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  at::parallel_for(0, d.B * d.Hq * d.L, 64, [&](int64_t begin, int64_t end) { merge(a, begin, end); });
}

// Returns grad_q (B, Hq, L, E) in acc; fills grad_k and grad_v. Needs L, S > 0.
at::Tensor run_bwd(const MatmulEngine* engine, const Dims& d, const at::Tensor& go, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& log_sum, const at::Tensor& mask, bool is_causal, double scale,
                   double dropout_p, int64_t seed, at::Tensor& grad_k, at::Tensor& grad_v) {
  AttentionBwdArgs a{};
  set_common(a, d, engine, q, k, v, mask, is_causal, scale, dropout_p, seed);
  a.grad_out = go.const_data_ptr();
  a.out = out.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.grad_out_strides[i] = go.stride(i);
    a.out_strides[i] = out.stride(i);
  }
  a.lse = lse.const_data_ptr();
  a.log_sum = log_sum.defined() ? log_sum.const_data_ptr() : nullptr;
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  a.grad_k = grad_k.data_ptr();
  a.grad_v = grad_v.data_ptr();
  const Blocks blocks = blocks_for(engine);
  a.block_m = blocks.bwd_m;
  a.block_n = pick_block(blocks.bwd_n, d.B * d.Hk, d.S);
  // the kernels' key tiles are whole panels
  a.block_n = std::max<int64_t>(kPanel, a.block_n / kPanel * kPanel);
  const auto fn = attention_bwd_stub.get();
  TORCH_INTERNAL_ASSERT(fn, "no attention kernel was built for this CPU");

  // One chunk of key tiles per thread; dQ is summed across the chunks in a fixed order (see
  // AttentionBwdFn), chunks waiting only on higher ones: a thread that runs several (a parallel
  // region nested in another runs them all inline) runs them from the highest down.
  const int64_t tasks = d.B * d.Hk * ceil_div(d.S, a.block_n);
  a.chunks = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), tasks);
  const bool acc_is_dtype = acc == q.scalar_type();
  at::Tensor grad_q = acc_is_dtype ? empty_output({d.B, d.Hq, d.L, d.E}, acc)
                                   : at::empty({d.B, d.Hq, d.L, d.E}, q.options().dtype(acc));
  at::Tensor row_sum = at::empty({d.B, d.Hq, d.L}, q.options().dtype(acc));
  at::Tensor tickets = at::zeros({d.B * d.Hq * ceil_div(d.L, a.block_m)}, q.options().dtype(at::kInt));
  a.grad_q = grad_q.data_ptr();
  a.row_sum = row_sum.data_ptr();
  a.tickets = tickets.data_ptr<int32_t>();
  at::parallel_for(0, a.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = end - 1; c >= begin; --c) fn(a, c);
  });
  // rows with no key to attend to have a row sum of 0, and a gradient of 0
  return grad_q.div_(row_sum.masked_fill_(row_sum == 0, 1).unsqueeze(-1));
}

// ---- which engine runs the products: measured once per dtype and process ----------------------

struct Calibration {
  EngineKind fwd = EngineKind::kNative;
  EngineKind bwd = EngineKind::kNative;
  std::string how;                    // "measured", or what forced the choice
  std::vector<EngineKind> kinds;      // the candidates, as timed
  std::vector<double> fwd_ms, bwd_ms; // best of a few calls each; empty when not measured
  // Problems of at most this many scores per head (L x S) run on the native micro-kernel whatever the
  // choice above: a packed engine's per-call set-up (oneDNN's kernel lookups, packing K and V) costs
  // more than it saves on small tiles. Measured at calibration (the crossover of native against the
  // chosen engine at L = S = 16, 32, 64, 128); 0 when the engine was forced or native won anyway.
  int64_t native_up_to = 0;
  // Inference forwards (no backward follows) choose apart: the fastest forward alone, and its own
  // crossover.
  EngineKind infer = EngineKind::kNative;
  std::vector<double> infer_ms;  // per candidate, as fwd_ms
  int64_t infer_native_up_to = 0;
};

constexpr int kNumScalars = 4;

struct CalibrationSlot {
  std::mutex mutex;
  bool done = false;
  std::string forced;  // "" (automatic), or an EngineKind's name, set by set_attention_engine
  Calibration result;
};

CalibrationSlot& slot(Scalar dtype) {
  static CalibrationSlot slots[kNumScalars];
  return slots[static_cast<int>(dtype)];
}

std::vector<EngineKind> candidates(Scalar dtype) {
  std::vector<EngineKind> out;
  for (EngineKind kind : {EngineKind::kBrgemm, EngineKind::kBrgemmF32, EngineKind::kNative}) {
    if (matmul_engine(dtype, kind) != nullptr) out.push_back(kind);
  }
  return out;
}

bool parse_kind(const std::string& name, EngineKind& kind) {
  for (EngineKind k : {EngineKind::kNative, EngineKind::kBrgemmF32, EngineKind::kBrgemm}) {
    if (name == engine_kind_name(k)) {
      kind = k;
      return true;
    }
  }
  return false;
}

// The forced engine for dtype, falling back from "brgemm" to "brgemm-f32" where the dtype has no
// packed engine (float32; bf16/fp16 without AMX), and to "native" where oneDNN has none (float64).
bool forced_kind(Scalar dtype, const std::string& name, EngineKind& kind) {
  if (!parse_kind(name, kind)) return false;
  if (kind == EngineKind::kBrgemm && matmul_engine(dtype, kind) == nullptr) kind = EngineKind::kBrgemmF32;
  if (kind == EngineKind::kBrgemmF32 && matmul_engine(dtype, kind) == nullptr) kind = EngineKind::kNative;
  return true;
}

double best_ms(const std::function<void()>& fn, int repeats) {
  fn();  // warm-up: oneDNN compiles its kernels for these shapes
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Times each candidate engine on one attention forward and backward of a fixed, mid-sized shape
// (B = 1, 2 heads per thread, L = S = 512, E = 64, non-causal): a few milliseconds in all.
Calibration measure(Scalar dtype, at::ScalarType st) {
  Calibration c;
  c.kinds = candidates(dtype);
  const int64_t H = std::max<int64_t>(2, 2 * at::get_num_threads());
  const Dims d{1, H, H, 512, 512, 64, 64};
  at::Tensor q = at::randn({d.B, d.Hq, d.L, d.E}, at::TensorOptions().dtype(st));
  at::Tensor k = at::randn({d.B, d.Hk, d.S, d.E}, q.options());
  at::Tensor v = at::randn({d.B, d.Hk, d.S, d.Ev}, q.options());
  at::Tensor go = at::randn({d.B, d.Hq, d.L, d.Ev}, q.options());
  at::Tensor out = at::empty({d.B, d.Hq, d.L, d.Ev}, q.options());
  at::Tensor lse = at::empty({d.B, d.Hq, d.L}, q.options().dtype(acc_dtype(st)));
  at::Tensor gk = at::empty_like(k), gv = at::empty_like(v), none, mask;
  const double scale = 0.125;
  for (EngineKind kind : c.kinds) {
    const MatmulEngine* e = matmul_engine(dtype, kind);
    c.fwd_ms.push_back(best_ms([&] { run_fwd(e, d, q, k, v, mask, false, scale, 0.0, 0, out, lse, none); }, 3));
    c.bwd_ms.push_back(best_ms(
        [&] { run_bwd(e, d, go, q, k, v, out, lse, none, mask, false, scale, 0.0, 0, gk, gv); }, 3));
  }
  // One engine for both directions: the backward recomputes the forward's scores, and the same
  // engine rounds them the same way (a row with one key then gets P = 1 exactly, as in the forward).
  size_t best = 0;
  for (size_t i = 1; i < c.kinds.size(); ++i) {
    if (c.fwd_ms[i] + c.bwd_ms[i] < c.fwd_ms[best] + c.bwd_ms[best]) best = i;
  }
  c.fwd = c.bwd = c.kinds[best];
  c.infer_ms = c.fwd_ms;  // the same forward: an inference call differs only in its engine choice
  size_t best_infer = 0;
  for (size_t i = 1; i < c.kinds.size(); ++i) {
    if (c.infer_ms[i] < c.infer_ms[best_infer]) best_infer = i;
  }
  c.infer = c.kinds[best_infer];
  c.how = "measured";
  const MatmulEngine* native = matmul_engine(dtype, EngineKind::kNative);
  // The small-problem crossover of an engine: the largest n*n (of n timed, from the smallest up) at which
  // native runs L = S = n faster; timed on a forward and its backward (both, so that a call and its
  // backward take the same engine, see above), or for inference on the inference forward alone.
  auto crossover = [&](EngineKind kind, bool inference) {
    int64_t up_to = 0;
    if (kind == EngineKind::kNative || native == nullptr) return up_to;
    const MatmulEngine* chosen = matmul_engine(dtype, kind);
    for (int64_t n : {16, 32, 64, 128}) {
      const Dims dn{1, H, H, n, n, 64, 64};
      at::Tensor qn = q.narrow(2, 0, n), kn = k.narrow(2, 0, n), vn = v.narrow(2, 0, n);
      at::Tensor gon = go.narrow(2, 0, n), outn = out.narrow(2, 0, n).contiguous(), lsen = lse.narrow(2, 0, n).contiguous();
      at::Tensor gkn = gk.narrow(2, 0, n).contiguous(), gvn = gv.narrow(2, 0, n).contiguous();
      qn = qn.contiguous(), kn = kn.contiguous(), vn = vn.contiguous(), gon = gon.contiguous();
      auto time_of = [&](const MatmulEngine* e) {
        const double fwd = best_ms(
            [&] { run_fwd(e, dn, qn, kn, vn, mask, false, scale, 0.0, 0, outn, lsen, none); }, 5);
        if (inference) return fwd;
        return fwd + best_ms(
                         [&] { run_bwd(e, dn, gon, qn, kn, vn, outn, lsen, none, mask, false, scale, 0.0, 0, gkn, gvn); },
                         5);
      };
      if (time_of(native) >= time_of(chosen)) break;
      up_to = n * n;
    }
    return up_to;
  };
  c.native_up_to = crossover(c.fwd, false);
  c.infer_native_up_to = crossover(c.infer, true);
  return c;
}

const Calibration& calibration(Scalar dtype, at::ScalarType st) {
  CalibrationSlot& s = slot(dtype);
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.done) return s.result;
  EngineKind kind;
  const char* env = std::getenv("FUSEDFORMER_CPU_MATMUL");
  const std::string env_name = env != nullptr ? env : "";
  if (!s.forced.empty() && s.forced != "auto") {
    TORCH_INTERNAL_ASSERT(forced_kind(dtype, s.forced, kind));
    s.result = Calibration{kind, kind, "set by set_attention_engine", {kind}, {}, {}};
    s.result.infer = kind;
  } else if (s.forced.empty() && !env_name.empty() && env_name != "auto") {
    TORCH_CHECK(forced_kind(dtype, env_name, kind), "fusedformer: FUSEDFORMER_CPU_MATMUL='", env_name,
                "' names no engine; expected native, brgemm-f32, brgemm or auto");
    s.result = Calibration{kind, kind, "set by FUSEDFORMER_CPU_MATMUL", {kind}, {}, {}};
    s.result.infer = kind;
  } else {
    s.result = measure(dtype, st);
  }
  s.done = true;
  return s.result;
}

// The engines for a call: the calibrated ones, unless the machine changed its mind since (a packed
// engine needs oneDNN, which torch.backends.mkldnn.enabled = False turns off).
// scores_per_head: L x S of the call (a forward and its backward pass the same), for the small-problem
// crossover (Calibration::native_up_to); 0 where it does not apply. inference: a forward that no
// backward follows (Calibration::infer).
const MatmulEngine* engine_for(at::ScalarType st, bool backward, int64_t scores_per_head = 0, bool inference = false) {
  const Scalar dtype = scalar_of(st);
  const Calibration& c = calibration(dtype, st);
  const MatmulEngine* e = matmul_engine(dtype, inference ? c.infer : backward ? c.bwd : c.fwd);
  const int64_t native_up_to = inference ? c.infer_native_up_to : c.native_up_to;
  if (e == nullptr || (scores_per_head > 0 && scores_per_head <= native_up_to)) {
    return matmul_engine(dtype, EngineKind::kNative);
  }
  return e;
}

// The forward's output, (B, Hq, L, Ev), laid out as query: (B, L, Hq, Ev) in memory when query's heads
// are inside its rows (the view q.view(B, L, H, E).transpose(1, 2) that models make from a linear layer's
// output, and torch's own CPU attention returns), so that the caller's transpose(1, 2).contiguous()
// back to (B, L, H * Ev) costs nothing; contiguous otherwise. The fake kernel (ops/attention.py) follows
// the same rule.
at::Tensor empty_attention_out(const at::Tensor& query, const Dims& d) {
  const bool heads_inner = d.Hq > 1 && d.L > 1 && query.stride(1) < query.stride(2);
  if (heads_inner) return empty_output({d.B, d.L, d.Hq, d.Ev}, query.scalar_type()).transpose(1, 2);
  return empty_output({d.B, d.Hq, d.L, d.Ev}, query.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     bool is_causal, double scale, double dropout_p,
                                                     const std::optional<at::Tensor>& seed_tensor,
                                                     bool inference) {
  const char* op = "fusedformer::attention_fwd";
  const Dims d = check_qkv(op, query, key, value);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  check_dropout(op, dropout_p);
  const int64_t seed = read_seed(op, seed_tensor, dropout_p);
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  const at::Tensor mask = prepare_mask(op, attn_mask, query, d);
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  at::Tensor out = empty_attention_out(query, d);
  at::Tensor lse = at::empty({d.B, d.Hq, d.L}, query.options().dtype(acc));
  if (out.numel() == 0 || d.S == 0) {
    // no key: every row is fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
  } else {
    at::Tensor no_split;
    if (decode_shaped(d, dropout_p)) {
      // a backward may follow: float32 scores summed as the backward's engine will recompute them
      const bool chunked = !inference && engine_for(query.scalar_type(), true, d.L * d.S)->mm == nullptr;
      run_decode(d, q, k, v, mask, is_causal ? 1 : 0, nullptr, d.S, scale, out, lse, inference, chunked);
    } else {
      run_fwd(engine_for(query.scalar_type(), false, d.L * d.S, inference), d, q, k, v, mask, is_causal, scale,
              dropout_p, seed, out, lse, no_split);
    }
  }
  return {out, lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale, double dropout_p, const std::optional<at::Tensor>& seed_tensor) {
  const char* op = "fusedformer::attention_bwd";
  const Dims d = check_qkv(op, query, key, value);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  check_dropout(op, dropout_p);
  const int64_t seed = read_seed(op, seed_tensor, dropout_p);
  check_like(op, grad_out, "grad_out", query, {d.B, d.Hq, d.L, d.Ev});
  check_like(op, out, "out", query, {d.B, d.Hq, d.L, d.Ev});
  TORCH_CHECK(logsumexp.device().is_cpu(), op, ": expected logsumexp on the CPU, got ", logsumexp.device());
  TORCH_CHECK(logsumexp.scalar_type() == at::kFloat, op, ": expected logsumexp of dtype float32, got ",
              logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.sizes() == at::IntArrayRef({d.B, d.Hq, d.L}), op, ": expected logsumexp of shape ",
              at::IntArrayRef({d.B, d.Hq, d.L}), ", got ", logsumexp.sizes());
  const at::ScalarType dtype = query.scalar_type(), acc = acc_dtype(dtype);
  const at::Tensor mask = prepare_mask(op, attn_mask, query, d);
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  at::Tensor grad_k = empty_output({d.B, d.Hk, d.S, d.E}, dtype);
  at::Tensor grad_v = empty_output({d.B, d.Hk, d.S, d.Ev}, dtype);
  at::Tensor grad_q;
  if (d.B * d.Hq * d.L == 0 || d.S == 0) {
    grad_q = at::zeros({d.B, d.Hq, d.L, d.E}, query.options());
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor go = rows_contiguous(grad_out), o = rows_contiguous(out);
  // The backward's P = exp(score - lse) is only as exact as lse. In float64 a float32 lse would cap
  // the gradients at float32 accuracy; and where the row max m is huge (a row masked entirely by a
  // finite additive mask such as finfo.min, a softmax over that row), m + log l rounds to m. Then
  // the backward recomputes lse, split as m and log l, in the accumulation dtype: one more Q K^T pass.
  at::Tensor lse = logsumexp.contiguous();
  bool split = acc == at::kDouble;
  const float* lse_ptr = lse.const_data_ptr<float>();
  for (int64_t i = 0; i < lse.numel() && !split; ++i) {
    split = std::isfinite(lse_ptr[i]) && std::abs(lse_ptr[i]) >= kLargeLse;
  }
  at::Tensor log_sum;
  if (split) {
    lse = at::empty({d.B, d.Hq, d.L}, query.options().dtype(acc));
    log_sum = at::empty({d.B, d.Hq, d.L}, query.options().dtype(acc));
    at::Tensor unused;
    // the recomputed logsumexp is that of the un-dropped probabilities: no dropout in that pass
    run_fwd(engine_for(dtype, false, d.L * d.S), d, q, k, v, mask, is_causal, scale, 0.0, 0, unused, lse, log_sum);
  }
  grad_q = run_bwd(engine_for(dtype, true, d.L * d.S), d, go, q, k, v, o, lse, log_sum, mask, is_causal, scale, dropout_p,
                   seed, grad_k, grad_v);
  return {grad_q.to(dtype), grad_k, grad_v};
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

void attention_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                          int causal, const at::Tensor& seq_lens, int64_t max_keys, double scale, at::Tensor& out,
                          at::Tensor& lse) {
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  run_decode(d, q, k, v, mask, causal, seq_lens.defined() ? seq_lens.const_data_ptr<int64_t>() : nullptr, max_keys,
             scale, out, lse, true);
}

void attention_fwd_rows_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                            double scale, at::Tensor& out, at::Tensor& lse) {
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  at::Tensor no_mask, no_split;
  if (decode_shaped(d, 0.0)) {
    run_decode(d, q, k, v, no_mask, is_causal ? 1 : 0, nullptr, d.S, scale, out, lse, true);
  } else {
    run_fwd(engine_for(q.scalar_type(), false, d.L * d.S, true), d, q, k, v, no_mask, is_causal, scale, 0.0, 0, out,
            lse, no_split);
  }
}

EngineReport attention_engine_report(at::ScalarType dtype, bool measure) {
  const Scalar s = scalar_of(dtype);
  EngineReport r;
  if (!measure) {
    CalibrationSlot& cs = slot(s);
    std::lock_guard<std::mutex> lock(cs.mutex);
    if (!cs.done) {
      r.how = "not measured yet";
      for (EngineKind kind : candidates(s)) r.candidates.push_back(matmul_engine(s, kind)->name);
      return r;
    }
  }
  const Calibration c = calibration(s, dtype);
  r.fwd = matmul_engine(s, c.fwd)->name;
  r.bwd = matmul_engine(s, c.bwd)->name;
  r.how = c.how;
  for (EngineKind kind : c.kinds) r.candidates.push_back(matmul_engine(s, kind)->name);
  r.fwd_ms = c.fwd_ms;
  r.bwd_ms = c.bwd_ms;
  r.native_up_to = c.native_up_to;
  r.infer = matmul_engine(s, c.infer)->name;
  r.infer_ms = c.infer_ms;
  r.infer_native_up_to = c.infer_native_up_to;
  return r;
}

void set_attention_engine(at::ScalarType dtype, const std::string& kind) {
  const Scalar s = scalar_of(dtype);
  EngineKind parsed;
  TORCH_CHECK(kind == "auto" || forced_kind(s, kind, parsed), "set_attention_engine: expected 'auto', 'native', ",
              "'brgemm-f32' or 'brgemm', got '", kind, "'");
  CalibrationSlot& cs = slot(s);
  std::lock_guard<std::mutex> lock(cs.mutex);
  cs.forced = kind;
  cs.done = false;
}

const MatmulEngine* attention_engine_for(at::ScalarType dtype, bool backward) {
  return engine_for(dtype, backward);
}

AttentionBlocks attention_blocks(const MatmulEngine* engine) {
  const Blocks b = blocks_for(engine);
  return {b.fwd_m, b.fwd_n, b.bwd_m, b.bwd_n};
}

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
