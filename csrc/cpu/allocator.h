// Outputs on transparent huge pages.
//
// On this class of machine (a VM, THP in "madvise" mode) the first touch of a freshly allocated
// 128 MiB output costs ~55 ms of 4 KiB page faults, more than a memory-bound kernel itself (GELU over
// it: ~8 ms). Large outputs of the fused ops are therefore allocated 2 MiB-aligned with
// MADV_HUGEPAGE: 64 faults instead of 32768, and freed blocks are cached for reuse (bounded by
// FUSEDFORMER_CPU_CACHE_MB, default 1024; fusedformer._C.empty_cache() returns them). torch's own
// allocator uses huge pages only when the process sets THP_MEM_ALLOC_ENABLE=1; we leave it alone.
#pragma once

#include <ATen/ATen.h>

namespace fusedformer {
namespace cpu {

// Like at::empty(sizes, dtype) on the CPU, contiguous; huge-page backed from 2 MiB up.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees the cached blocks; returns how many bytes were released.
size_t release_cached_outputs();
size_t cached_output_bytes();

inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.scalar_type()); }

}  // namespace cpu
}  // namespace fusedformer
