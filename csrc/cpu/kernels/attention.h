// Interface between the attention glue (csrc/cpu/attention.cpp) and its per-capability bodies
// (attention.cpp here). T is the compute type, float or double; the glue converts half types.
#pragma once

#include <cstdint>

#include "cpu/dispatch.h"

namespace fusedformer {
namespace cpu {

// Strides are in elements; the last dim of q, k, v, grad_out, out is contiguous (the glue ensures it).
// The mask is a stride-0-broadcast view of the caller's mask, never materialised.
template <typename T>
struct AttentionFwdArgs {
  const T* q;               // (B, Hq, L, E), strides q_strides
  const T* k;               // (B, Hk, S, E), strides k_strides
  const T* v;               // (B, Hk, S, Ev), strides v_strides
  const bool* mask_keep;    // (B, Hq, L, S), strides mask_strides; true = take part; or nullptr
  const T* mask_add;        // (B, Hq, L, S), strides mask_strides; added to the scaled scores; or nullptr
  T* out;                   // (B, Hq, L, Ev) contiguous; not written when log_sum is given
  T* lse;                   // (B, Hq, L) contiguous: m + log l; +inf for a row with no key to attend to
  // (B, Hq, L) contiguous, or nullptr. When given, the call only recomputes the logsumexp, split in
  // two: lse = m, the row max, and log_sum = log l, for a backward that needs it exact (see there).
  T* log_sum;
  int64_t q_strides[3];     // batch, head, row
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t mask_strides[4];  // batch, head, query, key
  int64_t B, Hq, Hk, L, S, E, Ev;
  int64_t block_m;          // queries per task; a multiple of Vec<T>::kSize
  int64_t block_n;          // keys per inner tile
  double scale;
  bool is_causal;
  // Attention dropout on P before P V, 0 for none; the mask is keep(seed, b * Hq + h, i, j) of
  // kernels/dropout.h, the kept probabilities scaled by 1 / (1 - dropout_p). Ignored when log_sum is
  // given (the logsumexp is that of the un-dropped probabilities).
  double dropout_p;
  int64_t seed;
};

// Each call runs tasks [task_begin, task_end) of B * Hq * ceil(L / block_m) (one query tile each).
template <typename T>
using AttentionFwdFn = void (*)(const AttentionFwdArgs<T>&, int64_t task_begin, int64_t task_end);

template <typename T>
struct AttentionBwdArgs {
  const T* grad_out;        // (B, Hq, L, Ev), strides grad_out_strides
  const T* q;               // (B, Hq, L, E), strides q_strides
  const T* k;               // (B, Hk, S, E), strides k_strides
  const T* v;               // (B, Hk, S, Ev), strides v_strides
  const T* out;             // (B, Hq, L, Ev), strides out_strides
  const T* lse;             // (B, Hq, L) contiguous: m + log l, or m alone when log_sum is given
  const T* log_sum;         // (B, Hq, L) contiguous: log l; or nullptr
  T* delta;                 // (B, Hq, L) contiguous: rowsum(grad_out * out), written by the delta pass
                            // (out after dropout: with dropout too, rowsum(P * dP) = rowsum(dO * O))
  const bool* mask_keep;    // (B, Hq, L, S), strides mask_strides; or nullptr
  const T* mask_add;        // (B, Hq, L, S), strides mask_strides; or nullptr
  T* grad_k;                // (B, Hk, S, E) contiguous
  T* grad_v;                // (B, Hk, S, Ev) contiguous
  T* grad_q;                // (B, Hq, L, E) contiguous, before the division by row_sum (see below)
  T* row_sum;               // (B, Hq, L) contiguous: the sums of the recomputed probabilities' rows
  int64_t grad_out_strides[3];
  int64_t out_strides[3];
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t mask_strides[4];
  int64_t B, Hq, Hk, L, S, E, Ev;
  int64_t block_m;          // queries per inner tile
  int64_t block_n;          // keys per task; a multiple of Vec<T>::kSize
  double scale;
  bool is_causal;
  double dropout_p;         // as the forward's: the backward draws the same mask again
  int64_t seed;
};

// The backward's first pass: delta for rows [row_begin, row_end) of B * Hq * L.
template <typename T>
using AttentionBwdDeltaFn = void (*)(const AttentionBwdArgs<T>&, int64_t row_begin, int64_t row_end);

// Each call runs tasks [task_begin, task_end) of B * Hk * ceil(S / block_n), task t being a key tile
// of (batch, kv head) pair t / ceil(S / block_n); concurrent calls take disjoint ranges. A call owns
// the rows of grad_k and grad_v of its key tiles, and the rows of grad_q and row_sum of the query
// heads of every pair whose first task is among its own: it zeroes them, then sums into them. Its first
// pair, when that began in an earlier range, is shared: the call sums that pair's rows into
// shared_grad_q, (Hq / Hk, L, E), and shared_row_sum, (Hq / Hk, L), instead (zeroing them too), and the
// caller adds them in. The caller divides grad_q by row_sum at the end (see kernels/attention.cpp).
template <typename T>
using AttentionBwdFn = void (*)(const AttentionBwdArgs<T>&, int64_t task_begin, int64_t task_end,
                                T* shared_grad_q, T* shared_row_sum);

extern KernelStub<AttentionFwdFn<float>> attention_fwd_f32_stub;
extern KernelStub<AttentionFwdFn<double>> attention_fwd_f64_stub;
extern KernelStub<AttentionBwdDeltaFn<float>> attention_bwd_delta_f32_stub;
extern KernelStub<AttentionBwdDeltaFn<double>> attention_bwd_delta_f64_stub;
extern KernelStub<AttentionBwdFn<float>> attention_bwd_f32_stub;
extern KernelStub<AttentionBwdFn<double>> attention_bwd_f64_stub;

}  // namespace cpu
}  // namespace fusedformer
