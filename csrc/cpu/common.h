// Helpers shared by the CPU glue files (csrc/cpu/*.cpp); torch is available here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/kernels/scalar.h"

namespace fusedformer {
namespace cpu {

// The kernels accumulate in float32, or float64 for float64 tensors; bf16/fp16 tensors stay in their
// dtype and are converted a vector at a time inside the kernels.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Scalar scalar_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Scalar::kFloat32;
    case at::kDouble: return Scalar::kFloat64;
    case at::kBFloat16: return Scalar::kBFloat16;
    case at::kHalf: return Scalar::kFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", t);
  }
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": expected ", name, " to be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
}

// Row r of a 2-d tensor with contiguous rows, or nullptr for an undefined tensor.
inline void* row_ptr(const at::Tensor& t, int64_t r) {
  return t.defined() ? static_cast<char*>(t.data_ptr()) + r * t.stride(0) * t.element_size() : nullptr;
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
