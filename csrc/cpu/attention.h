// What the attention glue (csrc/cpu/attention.cpp) tells the Python module about its product engines.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fusedformer {
namespace cpu {

struct MatmulEngine;

// Which engine runs the tile products of attention in `dtype`, forward and backward, and why: measured
// at first use in this process (the times of each candidate, in ms), or forced.
struct EngineReport {
  std::string fwd, bwd;  // engine names (kernels/matmul.h MatmulEngine::name)
  std::string how;       // "measured", "set by FUSEDFORMER_CPU_MATMUL", "set by set_attention_engine"
  std::vector<std::string> candidates;
  std::vector<double> fwd_ms, bwd_ms;  // per candidate; empty when not measured
  int64_t native_up_to = 0;  // calls with L x S <= this run on the native micro-kernel (measured crossover)
  // Inference forwards (no backward follows; their scores may take the engine's own sums): the engine,
  // its time per candidate, and its own small-problem crossover.
  std::string infer;
  std::vector<double> infer_ms;
  int64_t infer_native_up_to = 0;
};

// The decode kernel (kernels/attention.h, AttentionDecodeArgs) on 4-d tensors with contiguous rows:
// q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev); mask a (B, Hq, L, S) view or undefined;
// seq_lens (B,) int64 or undefined; causal 0 none, 1 top-left, 2 bottom-right; keys past max_keys are
// never read; inference only (float32 scores in the lane-wise order). Fills out (B, Hq, L, Ev) in q's
// dtype and lse (B, Hq, L) in the accumulation dtype.
void attention_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                          int causal, const at::Tensor& seq_lens, int64_t max_keys, double scale, at::Tensor& out,
                          at::Tensor& lse);

// attention_fwd's kernels (no mask, no dropout) on 4-d tensors with contiguous rows, S > 0, for
// inference (no backward recomputes the scores): fills out (B, Hq, L, Ev) in q's dtype and lse
// (B, Hq, L) in the accumulation dtype. causal is top-left.
void attention_fwd_rows_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                            double scale, at::Tensor& out, at::Tensor& lse);

// Runs the measurement if this dtype has not been served yet and `measure`; else reports
// how = "not measured yet" (the measurement runs attention on torch's thread pool: a process that
// forks afterwards must not have started that pool, and GNU OpenMP's does not survive a fork).
EngineReport attention_engine_report(at::ScalarType dtype, bool measure);

// Forces the engine kind for dtype ("native", "brgemm-f32", "brgemm"), or "auto" to measure again.
// Where dtype has no such engine here, the next one down serves: brgemm (the dtype's own packed
// engine) -> brgemm-f32 -> native.
void set_attention_engine(at::ScalarType dtype, const std::string& kind);

// For other glue that runs the attention kernels (csrc/cpu/varlen.cpp): the calibrated engine of
// attention's tile products in dtype (forward or backward), and the tile sizes that go with it.
const MatmulEngine* attention_engine_for(at::ScalarType dtype, bool backward);
struct AttentionBlocks {
  int64_t fwd_m, fwd_n, bwd_m, bwd_n;  // queries per tile, keys per block (fwd) / per task (bwd)
};
AttentionBlocks attention_blocks(const MatmulEngine* engine);

}  // namespace cpu
}  // namespace fusedformer
