// Every op schema of the fusedformer namespace, in one place; the Python module fusedformer._C.
//
// Device bodies register elsewhere: CPU in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL), the Triton launchers
// from kernels/ in Python. Fake kernels and autograd are registered once, in fusedformer/ops/.
#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"  // FF_TORCH_VERSION, written by setup.py
#include "cpu/allocator.h"
#include "cpu/attention.h"
#include "cpu/dispatch.h"

TORCH_LIBRARY(fusedformer, m) {
  // query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), Hq a multiple of Hk;
  // attn_mask broadcastable to (B, Hq, L, S): bool (True = take part) or additive in query's dtype.
  // dropout_p in [0, 1): attention dropout on the probabilities (after the softmax, before P V), the mask
  // a pure function of (seed, b, h, i, j) (see attention_dropout_mask), kept ones scaled by 1 / (1 - p).
  // seed: a one-element int64 CPU tensor (a tensor, not an int, so that it can be drawn inside a
  // torch.compile'd graph), needed when dropout_p > 0 and not read otherwise.
  // inference: no backward will be taken through this call (the public function passes True when no
  // input needs a gradient). The CPU kernels may then take the engine measured fastest for a forward
  // alone, and the decode kernel sums float32 scores lane-wise, not in the order the backward repeats;
  // a backward through such a call raises.
  // Returns out (B, Hq, L, Ev) in query's dtype and logsumexp (B, Hq, L) in float32 (+inf where a
  // row has no key to attend to), that of the un-dropped probabilities.
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
      "float scale, float dropout_p=0.0, Tensor? seed=None, bool inference=False) "
      "-> (Tensor out, Tensor logsumexp)");
  // Returns grad_query, grad_key, grad_value shaped as query, key, value. dropout_p and seed as given to
  // attention_fwd: the backward draws the same mask again.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor? attn_mask, bool is_causal, float scale, float dropout_p=0.0, "
      "Tensor? seed=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // Generation: query (B, Hq, L, E) against k_cache (B, Hk, S_max, E), v_cache (B, Hk, S_max, Ev). When
  // given, key (B, Hk, L, E) and value (B, Hk, L, Ev) are first written into the caches, in place, at
  // [cache_seqlens[b], cache_seqlens[b] + L); sequence b then attends to its first n_b entries (n_b =
  // cache_seqlens[b] (+ L when appending), S_max when cache_seqlens is None), causal aligned bottom-right
  // (query i sees entries j <= n_b - L + i). Returns out (B, Hq, L, Ev). Inference only.
  m.def(
      "attention_with_kv_cache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? key, Tensor? value, "
      "Tensor? cache_seqlens, bool is_causal, float scale) -> Tensor");
  // The mask attention_fwd(..., dropout_p, seed) draws for query (B, H, L, *) and key length S, dense:
  // (B, H, L, S) bool, True = kept. For tests only: the kernels never build it.
  m.def("attention_dropout_mask(int B, int H, int L, int S, float dropout_p, int seed) -> Tensor");
  // input (*, D1..Dk) normalised over its last k = len(normalized_shape) dims; weight, bias
  // (D1..Dk) or None. mean and rstd are (*) in float32 (float64 for float64 input).
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  // grad_weight and grad_bias are (D1..Dk), or empty where weight (bias) is None.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // RMSNorm: out = input·rstd·weight, rstd = 1/sqrt(mean(input²) + eps) over the last k dims, (*) in
  // float32 (float64 for float64 input). grad_weight is (D1..Dk), or empty where weight is None.
  m.def(
      "rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor out, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, Tensor? weight) "
      "-> (Tensor grad_input, Tensor grad_weight)");
  // Residual add + norm: residual_out = dropout(input) + residual (rounded to the dtype), out =
  // norm(residual_out). dropout_p in [0, 1): the mask a pure function of (seed, row, column) (see
  // add_norm_dropout_mask), kept elements scaled by 1 / (1 - p). The backward takes residual_out (not
  // input and residual) and grad_residual_out or None; it returns grad_residual (= d residual_out plus
  // the norm's gradient) and grad_input = grad_residual·keep/(1 - p), empty when dropout_p is 0 (then it
  // equals grad_residual).
  m.def(
      "add_layer_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, float dropout_p=0.0, int seed=0) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "add_layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, int[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, float dropout_p=0.0, int seed=0) "
      "-> (Tensor grad_residual, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "add_rms_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, float eps, "
      "float dropout_p=0.0, int seed=0) -> (Tensor out, Tensor residual_out, Tensor rstd)");
  m.def(
      "add_rms_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, int[] normalized_shape, "
      "Tensor rstd, Tensor? weight, float dropout_p=0.0, int seed=0) "
      "-> (Tensor grad_residual, Tensor grad_input, Tensor grad_weight)");
  // The mask add_*_norm_fwd(..., dropout_p, seed) draws for an input of (rows, cols): (rows, cols) bool,
  // True = kept. For tests only: the kernels never build it.
  m.def("add_norm_dropout_mask(int rows, int cols, float dropout_p, int seed) -> Tensor");
  // gelu(input + bias); input (*, D), bias (D,) or None; approximate is "none" or "tanh".
  m.def("gelu_fwd(Tensor input, Tensor? bias, str approximate) -> Tensor");
  // float32 linear layer on oneDNN's brgemm (csrc/cpu/linear.cpp): input (*, K), weight (N, K) -> (*, N)
  m.def("linear_fwd(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // its backward's products on the same engine: grad (*, N), weight (N, K) -> grad_input (*, K) = grad weight;
  // grad (*, N), input (*, K) -> grad_weight (N, K) = grad^T input, summed over every leading index
  m.def("linear_bwd_input(Tensor grad, Tensor weight) -> Tensor");
  m.def("linear_bwd_weight(Tensor grad, Tensor input) -> Tensor");
  // grad_bias is (D,), or empty where bias is None.
  m.def(
      "gelu_bwd(Tensor grad_out, Tensor input, Tensor? bias, str approximate) "
      "-> (Tensor grad_input, Tensor grad_bias)");
  // Packed sequences (fusedformer/ops/varlen.py): query (total_q, Hq, E), key (total_k, Hk, E), value
  // (total_k, Hk, Ev); cu_seqlens_q / cu_seqlens_k int32 (B + 1,), cumulative lengths from 0 to total;
  // max_seqlen_* bound the lengths. Sequence b's queries attend to sequence b's keys only; is_causal
  // top-left per sequence; dropout's mask that of attention_fwd on the padded batch (key b * Hq + h,
  // positions within the sequence). Returns out (total_q, Hq, Ev) and logsumexp (Hq, total_q) float32.
  m.def(
      "varlen_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool is_causal, float scale, float dropout_p=0.0, int seed=0) "
      "-> (Tensor out, Tensor logsumexp)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "bool is_causal, float scale, float dropout_p=0.0, int seed=0) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

namespace {

std::string cpu_capability() {
  return fusedformer::cpu::capability_name(fusedformer::cpu::active_capability());
}

std::vector<std::string> built_cpu_capabilities() {
  using namespace fusedformer::cpu;
  std::vector<std::string> names;
  for (int c = kDefault; c < kNumCapabilities; ++c) {
    if (capability_built(static_cast<Capability>(c))) names.push_back(capability_name(static_cast<Capability>(c)));
  }
  return names;
}

std::string best_cpu_capability() {
  return fusedformer::cpu::capability_name(fusedformer::cpu::best_supported_capability());
}

// Lowers (or restores) the capability the CPU kernels run with; used by the tests to check every
// build of the kernels on one machine.
void set_cpu_capability(const std::string& name) {
  using namespace fusedformer::cpu;
  Capability cap;
  if (name == "default") cap = kDefault;
  else if (name == "avx2") cap = kAVX2;
  else if (name == "avx512") cap = kAVX512;
  else if (name == "avx512bf16") cap = kAVX512BF16;
  else TORCH_CHECK(false, "set_cpu_capability: expected 'default', 'avx2', 'avx512' or 'avx512bf16', got '", name, "'");
  TORCH_CHECK(set_capability(cap), "set_cpu_capability: this CPU (or this build) does not support '", name,
              "' (best: '", capability_name(best_supported_capability()), "')");
}

at::ScalarType dtype_named(const std::string& name, const char* fn) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, fn, ": expected a dtype name 'float32', 'float64', 'bfloat16' or 'float16', got '", name, "'");
}

pybind11::dict attention_engine(const std::string& dtype, bool measure) {
  const auto r = fusedformer::cpu::attention_engine_report(dtype_named(dtype, "attention_engine"), measure);
  pybind11::dict d;
  d["fwd"] = r.fwd;
  d["bwd"] = r.bwd;
  d["how"] = r.how;
  pybind11::dict timings;
  for (size_t i = 0; i < r.candidates.size(); ++i) {
    if (i < r.fwd_ms.size()) timings[r.candidates[i].c_str()] = pybind11::make_tuple(r.fwd_ms[i], r.bwd_ms[i]);
  }
  d["candidates"] = r.candidates;
  d["timings_ms"] = timings;
  d["native_up_to"] = r.native_up_to;
  d["inference"] = r.infer;
  pybind11::dict infer_timings;
  for (size_t i = 0; i < r.candidates.size() && i < r.infer_ms.size(); ++i) {
    infer_timings[r.candidates[i].c_str()] = r.infer_ms[i];
  }
  d["inference_ms"] = infer_timings;
  d["inference_native_up_to"] = r.infer_native_up_to;
  return d;
}

void set_attention_engine(const std::string& dtype, const std::string& kind) {
  fusedformer::cpu::set_attention_engine(dtype_named(dtype, "set_attention_engine"), kind);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_capability", &cpu_capability, "The CPU capability the kernels run with.");
  m.def("best_cpu_capability", &best_cpu_capability, "The best CPU capability this CPU supports and this build has.");
  m.def("built_cpu_capabilities", &built_cpu_capabilities,
        "The CPU capabilities this build has kernels for (only 'default' off x86-64).");
  m.def("built_with_torch", [] { return std::string(FF_TORCH_VERSION); },
        "The torch version (torch.__version__) that _C was compiled against.");
  m.def("set_cpu_capability", &set_cpu_capability, "Run the CPU kernels built for this capability.");
  m.def("attention_engine", &attention_engine, pybind11::arg("dtype"), pybind11::arg("measure") = true,
        "The engine of CPU attention's tile products for a dtype name, forward and backward: "
        "{'fwd', 'bwd', 'how', 'candidates', 'timings_ms': {engine: (fwd_ms, bwd_ms)}, 'native_up_to', "
        "'inference', 'inference_ms': {engine: ms}, 'inference_native_up_to'} ('inference': the engine of "
        "forwards that no backward follows, chosen on the forward's time alone). Measures the "
        "candidates on first use; with measure=False, fwd and bwd are '' until something has (the "
        "measurement starts torch's thread pool, which a process that forks later must not have).");
  m.def("set_attention_engine", &set_attention_engine,
        "Force the engine kind of CPU attention for a dtype name: 'native', 'brgemm-f32', 'brgemm' (the "
        "dtype's own packed engine, else brgemm-f32), or 'auto' (measure).");
  m.def("empty_cache", &fusedformer::cpu::release_cached_outputs,
        "Return the cached output blocks to the system; returns the bytes released.");
  m.def("cache_stats", [] {
        const auto s = fusedformer::cpu::cache_stats();
        pybind11::dict d;
        d["cached_bytes"] = s.cached_bytes, d["cached_blocks"] = s.cached_blocks;
        d["in_use_bytes"] = s.in_use_bytes, d["in_use_blocks"] = s.in_use_blocks;
        d["limit_bytes"] = s.limit_bytes;
        d["hits"] = s.hits, d["misses"] = s.misses, d["evictions"] = s.evictions;
        return d;
      }, "The output block cache: {cached_bytes, cached_blocks, in_use_bytes, in_use_blocks, limit_bytes, "
         "hits, misses, evictions}.");
  m.def("set_cache_limit", &fusedformer::cpu::set_cache_limit, pybind11::arg("bytes"),
        "Cap the output block cache at `bytes` (evicting down to it now); returns the previous cap.");
  m.def("reset_cache_counters", &fusedformer::cpu::reset_cache_counters, "Zero hits, misses and evictions.");
  m.def("block_size_class", &fusedformer::cpu::block_size_class, pybind11::arg("bytes"),
        "The size of the cached block that serves an output of `bytes` (>= 2 MiB).");
}
