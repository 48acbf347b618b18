// Outputs on transparent huge pages.
//
// On this class of machine (a VM, THP in "madvise" mode) the first touch of a freshly allocated
// 128 MiB output costs ~55 ms of 4 KiB page faults, more than a memory-bound kernel itself (GELU over
// it: ~8 ms). Large outputs of the fused ops are therefore allocated 2 MiB-aligned with
// MADV_HUGEPAGE: 64 faults instead of 32768. torch's own allocator does the same only when the
// process sets THP_MEM_ALLOC_ENABLE=1; we leave torch's allocator alone.
#pragma once

#include <ATen/ATen.h>

namespace fusedformer {
namespace cpu {

// Like at::empty(sizes, dtype) on the CPU, contiguous; huge-page backed from 2 MiB up.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.scalar_type()); }

}  // namespace cpu
}  // namespace fusedformer
