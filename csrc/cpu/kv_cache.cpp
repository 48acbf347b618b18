// fusedformer::attention_with_kv_cache on CPU tensors: every check before anything is written, the new
// keys and values appended to the caches in place, then the decode kernel (kernels/attention.cpp) over
// each sequence's first n_b cache entries, causal aligned bottom-right.
#include <torch/library.h>

#include <cmath>

#include "cpu/allocator.h"
#include "cpu/attention.h"
#include "cpu/common.h"

namespace fusedformer {
namespace cpu {
namespace {

void check_4d(const char* op, const at::Tensor& t, const char* name, const char* layout) {
  check_floating(t, op, name);
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " to be 4-D ", layout, ", got shape ", t.sizes());
}

at::Tensor attention_with_kv_cache_cpu(const at::Tensor& query, at::Tensor& k_cache, at::Tensor& v_cache,
                                       const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
                                       const std::optional<at::Tensor>& cache_seqlens, bool is_causal, double scale) {
  const char* op = "fusedformer::attention_with_kv_cache";
  check_4d(op, query, "query", "(B, Hq, L, E)");
  check_4d(op, k_cache, "k_cache", "(B, Hk, S_max, E)");
  check_4d(op, v_cache, "v_cache", "(B, Hk, S_max, Ev)");
  const int64_t B = query.size(0), Hq = query.size(1), L = query.size(2), E = query.size(3);
  const int64_t Hk = k_cache.size(1), S_max = k_cache.size(2), Ev = v_cache.size(3);
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(), op,
              ": expected k_cache and v_cache of query's dtype ", query.scalar_type(), ", got ", k_cache.scalar_type(),
              " and ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.size(0) == B && v_cache.size(0) == B, op, ": expected caches with query's batch size ", B,
              ", got k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes());
  TORCH_CHECK(v_cache.size(1) == Hk && v_cache.size(2) == S_max, op,
              ": expected v_cache (B, Hk, S_max, Ev) with k_cache's Hk = ", Hk, " and S_max = ", S_max, ", got ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == E, op, ": expected k_cache's head dim to equal query's (", E, "), got ",
              k_cache.sizes());
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": expected query's heads (", Hq, ") to be a multiple of the caches' (",
              Hk, ")");
  TORCH_CHECK(E >= 1 && E <= 256 && Ev >= 1 && Ev <= 256, op, ": expected head dims in [1, 256], got E = ", E,
              ", Ev = ", Ev);
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  TORCH_CHECK(key.has_value() == value.has_value(), op, ": expected key and value both given or both None");
  const bool append = key.has_value();
  if (append) {
    check_4d(op, *key, "key", "(B, Hk, L, E)");
    check_4d(op, *value, "value", "(B, Hk, L, Ev)");
    TORCH_CHECK(key->scalar_type() == query.scalar_type() && value->scalar_type() == query.scalar_type(), op,
                ": expected key and value of query's dtype ", query.scalar_type());
    TORCH_CHECK(key->sizes() == at::IntArrayRef({B, Hk, L, E}), op, ": expected key of shape ",
                at::IntArrayRef({B, Hk, L, E}), ", got ", key->sizes());
    TORCH_CHECK(value->sizes() == at::IntArrayRef({B, Hk, L, Ev}), op, ": expected value of shape ",
                at::IntArrayRef({B, Hk, L, Ev}), ", got ", value->sizes());
    TORCH_CHECK(cache_seqlens.has_value(), op,
                ": key and value are appended at cache_seqlens: expected cache_seqlens, got None");
  }
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->device() == query.device(), op, ": expected the caches on ", query.device(),
                " like query, got ", t->device());
  }
  if (append) {
    for (const at::Tensor* t : {&*key, &*value}) {
      TORCH_CHECK(t->device() == query.device(), op, ": expected key and value on ", query.device(),
                  " like query, got ", t->device());
    }
  }
  // entries per sequence before the call
  at::Tensor before;
  if (cache_seqlens.has_value()) {
    const at::Tensor& c = *cache_seqlens;
    TORCH_CHECK(c.device() == query.device(), op, ": expected cache_seqlens on ", query.device(), " like query, got ",
                c.device());
    TORCH_CHECK(!at::isFloatingType(c.scalar_type()) && c.scalar_type() != at::kBool && !at::isComplexType(c.scalar_type()),
                op, ": expected integer cache_seqlens, got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 1 && c.size(0) == B, op, ": expected cache_seqlens of shape (", B, ",), got ", c.sizes());
    before = c.to(at::kLong).contiguous();
  } else {
    before = at::full({B}, S_max, at::TensorOptions().dtype(at::kLong));
  }
  at::Tensor lengths = append ? before + L : before;  // n_b: the entries each sequence attends to
  const int64_t* b_ptr = before.const_data_ptr<int64_t>();
  const int64_t* n_ptr = lengths.const_data_ptr<int64_t>();
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(b_ptr[b] >= 0, op, ": expected cache_seqlens >= 0, got ", b_ptr[b], " for sequence ", b);
    TORCH_CHECK(n_ptr[b] <= S_max, op, ": the cache overflows: sequence ", b, " holds ", b_ptr[b],
                append ? " entries and gets " : " entries", append ? std::to_string(L) : std::string(),
                append ? " more" : "", ", more than the caches' S_max = ", S_max);
    max_keys = std::max(max_keys, n_ptr[b]);
  }
  // checked: now write
  if (append) {
    for (int64_t b = 0; b < B; ++b) {
      k_cache[b].narrow(1, b_ptr[b], L).copy_((*key)[b]);
      v_cache[b].narrow(1, b_ptr[b], L).copy_((*value)[b]);
    }
  }
  at::Tensor out = empty_output({B, Hq, L, Ev}, query.scalar_type());
  at::Tensor lse = at::empty({B, Hq, L}, query.options().dtype(compute_dtype(query.scalar_type())));
  if (out.numel() == 0) return out;
  if (max_keys == 0) return out.zero_();
  auto rows = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = rows(query);
  // A prefill (many queries) over caches whose sequences all hold n entries, causal only where n == L
  // (bottom-right is then top-left): the main forward kernel on the caches' first n entries, tiles on
  // the GEMM engine. Anything else (ragged lengths, a chunk appended after earlier entries) runs on the
  // decode kernel, which takes per-sequence lengths and bottom-right causality.
  bool uniform = true;
  for (int64_t b = 1; b < B; ++b) uniform = uniform && n_ptr[b] == n_ptr[0];
  if (uniform && Hq / Hk * L > 16 && (!is_causal || n_ptr[0] == L)) {
    const int64_t n = n_ptr[0];
    attention_fwd_rows_cpu(q, rows(k_cache.narrow(2, 0, n)), rows(v_cache.narrow(2, 0, n)), is_causal, scale, out,
                           lse);
    return out;
  }
  attention_decode_cpu(q, rows(k_cache), rows(v_cache), at::Tensor(), is_causal ? 2 : 0, lengths, max_keys, scale,
                       out, lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedformer, CPU, m) {
  m.impl("attention_with_kv_cache", &attention_with_kv_cache_cpu);
}

}  // namespace cpu
}  // namespace fusedformer
