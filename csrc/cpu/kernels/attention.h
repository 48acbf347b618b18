// Interface between the attention glue (csrc/cpu/attention.cpp) and its per-capability bodies
// (attention.cpp here). The tensors keep the caller's dtype (`dtype`): the kernels convert tiles, never
// whole tensors. "acc" below is the accumulation type: float64 for float64 tensors, else float32.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels/matmul.h"

namespace fusedformer {
namespace cpu {

// Strides are in elements; the last dim of q, k, v, grad_out, out is contiguous (the glue ensures it).
// The mask is a stride-0-broadcast view of the caller's mask, never materialised.
struct AttentionFwdArgs {
  Scalar dtype;                // of q, k, v, out
  const MatmulEngine* engine;  // the tile products; its operand type is dtype's, or float32 for half types
  const void* q;               // (B, Hq, L, E), strides q_strides
  const void* k;               // (B, Hk, S, E), strides k_strides
  const void* v;               // (B, Hk, S, Ev), strides v_strides
  const bool* mask_keep;       // (B, Hq, L, S), strides mask_strides; true = take part; or nullptr
  const void* mask_add;        // (B, Hq, L, S) in acc, strides mask_strides; added to the scaled scores; or nullptr
  void* out;                   // (B, Hq, L, Ev), strides out_strides (Ev contiguous); not written when log_sum is given
  void* lse;                   // (B, Hq, L) contiguous, acc: m + log l; +inf for a row with no key to attend to
  // (B, Hq, L) contiguous acc, or nullptr. When given, the call only recomputes the logsumexp, split in
  // two: lse = m, the row max, and log_sum = log l, for a backward that needs it exact (see there).
  void* log_sum;
  int64_t q_strides[3];        // batch, head, row
  int64_t out_strides[3];      // batch, head, row of out
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t mask_strides[4];     // batch, head, query, key
  int64_t B, Hq, Hk, L, S, E, Ev;
  int64_t block_m;             // queries per task
  int64_t block_n;             // keys per softmax block; a multiple of kPanel
  double scale;
  bool is_causal;
  // Attention dropout on P before P V, 0 for none; the mask is keep(seed, b * Hq + h, i, j) of
  // kernels/dropout.h, the kept probabilities scaled by 1 / (1 - dropout_p). Ignored when log_sum is
  // given (the logsumexp is that of the un-dropped probabilities).
  double dropout_p;
  int64_t seed;
  // Added to b * Hq + h in the dropout key (0 for attention_fwd): a caller that runs a slice of a
  // larger problem (varlen: one packed sequence's heads) keeps the slice's mask that of the whole.
  int64_t dropout_bh_offset;
};

// Each call runs tasks [task_begin, task_end) of B * Hq * ceil(L / block_m) (one query tile each).
using AttentionFwdFn = void (*)(const AttentionFwdArgs&, int64_t task_begin, int64_t task_end);

struct AttentionBwdArgs {
  Scalar dtype;
  const MatmulEngine* engine;
  const void* grad_out;        // (B, Hq, L, Ev), strides grad_out_strides
  const void* q;               // (B, Hq, L, E), strides q_strides
  const void* k;               // (B, Hk, S, E), strides k_strides
  const void* v;               // (B, Hk, S, Ev), strides v_strides
  const void* out;             // (B, Hq, L, Ev), strides out_strides
  const void* lse;             // (B, Hq, L) contiguous acc: m + log l, or m alone when log_sum is given
  const void* log_sum;         // (B, Hq, L) contiguous acc: log l; or nullptr
  const bool* mask_keep;       // (B, Hq, L, S), strides mask_strides; or nullptr
  const void* mask_add;        // (B, Hq, L, S) acc, strides mask_strides; or nullptr
  void* grad_k;                // (B, Hk, S, E) contiguous, dtype
  void* grad_v;                // (B, Hk, S, Ev) contiguous, dtype
  // (B, Hq, L, E) contiguous acc: dQ before the division by row_sum (see kernels/attention.cpp), and
  // (B, Hq, L) acc: the sums of the recomputed probabilities' rows. Each element is written by the
  // calls in a fixed order (see AttentionBwdFn): neither needs initialising.
  void* grad_q;
  void* row_sum;
  // (B * Hq * ceil(L / block_m)) zeroed int32 counters, one per query tile: the ordering of the writes
  // into grad_q and row_sum.
  int32_t* tickets;
  int64_t grad_out_strides[3];
  int64_t out_strides[3];
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t mask_strides[4];
  int64_t B, Hq, Hk, L, S, E, Ev;
  int64_t block_m;             // queries per inner tile, at most kPanel
  int64_t block_n;             // keys per task; a multiple of kPanel
  int64_t chunks;              // how the B * Hk * ceil(S / block_n) tasks are split: chunk c runs
                               // [tasks * c / chunks, tasks * (c + 1) / chunks)
  double scale;
  bool is_causal;
  double dropout_p;            // as the forward's: the backward draws the same mask again
  int64_t seed;
  int64_t dropout_bh_offset;   // as the forward's
};

// Runs chunk c (see AttentionBwdArgs::chunks). A chunk owns the rows of grad_k and grad_v of its key
// tiles. The rows of grad_q and row_sum of a query tile are summed over the chunks that share its
// (batch, kv head) pair, each adding its own partial once, in decreasing chunk order (the last chunk
// writes, the earlier ones add, each waiting for the later ones' ticket): the result does not depend
// on timing, and needs no per-thread copy of grad_q. Chunks may wait on higher chunks only: they must
// run concurrently, or a thread running several must run them from the highest down.
using AttentionBwdFn = void (*)(const AttentionBwdArgs&, int64_t chunk);

// Few query rows against a long key range (decoding, a KV cache): the keys of each (batch, kv head)
// are split into chunks (flash-decoding), and one task runs one chunk for up to block_m of the pair's
// query rows, all query heads of the GQA group together (row r = g * L + i is query i of head
// hk * G + g, G = Hq / Hk): it reads each key and value once, and writes an unnormalised partial
// output with its rows' max and sum. The merge then combines a row's chunks. Forward only; the
// logsumexp it returns is the ordinary one, so attention_bwd runs after it as after attention_fwd.
struct AttentionDecodeArgs {
  Scalar dtype;               // of q, k, v, out
  const void* q;              // (B, Hq, L, E), strides q_strides
  const void* k;              // (B, Hk, S, E), strides k_strides
  const void* v;              // (B, Hk, S, Ev), strides v_strides
  const bool* mask_keep;      // (B, Hq, L, S), strides mask_strides; or nullptr
  const void* mask_add;       // (B, Hq, L, S) in acc, strides mask_strides; or nullptr
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t mask_strides[4];
  int64_t B, Hq, Hk, L, S, E, Ev;
  const int64_t* seq_lens;    // (B,): keys sequence b holds, <= S (the rest is never read); or nullptr: S
  int causal;                 // 0: none; 1: query i sees keys j <= i (SDPA, top-left);
                              // 2: j <= n_b - L + i (a KV cache, bottom-right: the last query sees all)
  double scale;
  int64_t block_m;            // query rows per task
  int64_t chunk;              // keys per task, a multiple of 64
  int64_t n_chunks;           // ceil(max key count / chunk)
  void* part_o;               // (B * Hk, row blocks, n_chunks, block_m, Ev) acc: unnormalised partials
  void* part_ml;              // (B * Hk, row blocks, n_chunks, block_m, 2) acc: their rows' max and sum
  void* out;                  // (B, Hq, L, Ev), strides out_strides (Ev contiguous), dtype: written by the merge
  int64_t out_strides[3];     // batch, head, row of out
  void* lse;                  // (B, Hq, L) contiguous acc: m + log l, +inf for a row with no key
  // No backward recomputes these scores (an inference call): float32 S may take the lane-wise sums of
  // bf16/fp16 (no transposes) instead of the main kernels' order, which the backward repeats.
  bool inference;
  // Otherwise float32 S sums as the engine of the backward will (score_chunk in attention.cpp): in
  // chunks when that is the micro-kernel, else in one chain.
  bool chunked_scores;
};

// Tasks [task_begin, task_end) of B * Hk * ceil(G * L / block_m) * n_chunks.
using AttentionDecodeFn = void (*)(const AttentionDecodeArgs&, int64_t task_begin, int64_t task_end);
// Rows [row_begin, row_end) of B * Hq * L: out and lse from the partials.
using AttentionDecodeMergeFn = void (*)(const AttentionDecodeArgs&, int64_t row_begin, int64_t row_end);

extern KernelStub<AttentionFwdFn> attention_fwd_stub;
extern KernelStub<AttentionDecodeFn> attention_decode_stub;
extern KernelStub<AttentionDecodeMergeFn> attention_decode_merge_stub;
extern KernelStub<AttentionBwdFn> attention_bwd_stub;

}  // namespace cpu
}  // namespace fusedformer
