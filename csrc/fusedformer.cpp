// Every op schema of the fusedformer namespace, in one place; the Python module fusedformer._C.
//
// Device bodies register elsewhere: CPU in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL), the Triton launchers
// from kernels/ in Python. Fake kernels and autograd are registered once, in fusedformer/ops/.
#include <torch/extension.h>
#include <torch/library.h>

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
  // Returns out (B, Hq, L, Ev) in query's dtype and logsumexp (B, Hq, L) in float32 (+inf where a
  // row has no key to attend to), that of the un-dropped probabilities.
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
      "float scale, float dropout_p=0.0, Tensor? seed=None) -> (Tensor out, Tensor logsumexp)");
  // Returns grad_query, grad_key, grad_value shaped as query, key, value. dropout_p and seed as given to
  // attention_fwd: the backward draws the same mask again.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor? attn_mask, bool is_causal, float scale, float dropout_p=0.0, "
      "Tensor? seed=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
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
  // gelu(input + bias); input (*, D), bias (D,) or None; approximate is "none" or "tanh".
  m.def("gelu_fwd(Tensor input, Tensor? bias, str approximate) -> Tensor");
  // grad_bias is (D,), or empty where bias is None.
  m.def(
      "gelu_bwd(Tensor grad_out, Tensor input, Tensor? bias, str approximate) "
      "-> (Tensor grad_input, Tensor grad_bias)");
}

namespace {

std::string cpu_capability() {
  return fusedformer::cpu::capability_name(fusedformer::cpu::active_capability());
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
  TORCH_CHECK(set_capability(cap), "set_cpu_capability: this CPU does not support '", name,
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
  return d;
}

void set_attention_engine(const std::string& dtype, const std::string& kind) {
  fusedformer::cpu::set_attention_engine(dtype_named(dtype, "set_attention_engine"), kind);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_capability", &cpu_capability, "The CPU capability the kernels run with.");
  m.def("best_cpu_capability", &best_cpu_capability, "The best CPU capability this CPU supports.");
  m.def("set_cpu_capability", &set_cpu_capability, "Run the CPU kernels built for this capability.");
  m.def("attention_engine", &attention_engine, pybind11::arg("dtype"), pybind11::arg("measure") = true,
        "The engine of CPU attention's tile products for a dtype name, forward and backward: "
        "{'fwd', 'bwd', 'how', 'candidates', 'timings_ms': {engine: (fwd_ms, bwd_ms)}}. Measures the "
        "candidates on first use; with measure=False, fwd and bwd are '' until something has (the "
        "measurement starts torch's thread pool, which a process that forks later must not have).");
  m.def("set_attention_engine", &set_attention_engine,
        "Force the engine kind of CPU attention for a dtype name: 'native', 'brgemm-f32', 'brgemm' (the "
        "dtype's own packed engine, else brgemm-f32), or 'auto' (measure).");
  m.def("empty_cache", &fusedformer::cpu::release_cached_outputs,
        "Return the cached output blocks to the system; returns the bytes released.");
  m.def("cached_bytes", &fusedformer::cpu::cached_output_bytes, "Bytes held by the output block cache.");
}
