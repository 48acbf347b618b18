// Helpers shared by the CPU glue files (csrc/cpu/*.cpp); torch is available here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace fusedformer {
namespace cpu {

// The kernels compute in float32 or float64; half types are converted at the boundary.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": expected ", name, " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
}

// How many chunks to split `n` rows of `cols` elements into: at most one per thread, and at least
// kMinElementsPerChunk elements each (below that, waking a thread costs more than the work).
constexpr int64_t kMinElementsPerChunk = 1 << 14;

inline int64_t num_row_chunks(int64_t n, int64_t cols) {
  const int64_t min_rows = std::max<int64_t>(1, kMinElementsPerChunk / std::max<int64_t>(1, cols));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / min_rows));
}

// Runs fn(chunk_index, begin, end) over `chunks` contiguous ranges of `n` rows, in parallel; callers
// size their per-chunk partial buffers with num_row_chunks() first.
template <typename F>
void parallel_row_chunks(int64_t n, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) fn(c, n * c / chunks, n * (c + 1) / chunks);
  });
}

}  // namespace cpu
}  // namespace fusedformer
