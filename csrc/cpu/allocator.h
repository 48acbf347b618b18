// Outputs on transparent huge pages, from a bounded cache of size-classed blocks.
//
// On this class of machine (a VM, THP in "madvise" mode) the first touch of a freshly allocated
// 128 MiB output costs ~55 ms of 4 KiB page faults, more than a memory-bound kernel itself (GELU over
// it: ~8 ms). Outputs of the fused ops from 2 MiB up are therefore allocated 2 MiB-aligned with
// MADV_HUGEPAGE: 64 faults instead of 32768. Smaller ones come from torch's CPU allocator.
//
// Freed blocks are cached for reuse. A request is rounded up to its size class: a multiple of 2 MiB
// with at most 3 significant bits (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... MiB), at most
// 25% more than asked, so that outputs of nearby shapes share blocks. The cache holds at most
// FUSEDFORMER_CPU_CACHE_MB (default 256; 0 turns it off) and evicts the least recently freed blocks
// to stay under it. fusedformer.cpu_memory_stats() reports it; fusedformer.empty_cache() empties it.
// torch's own allocator uses huge pages only when the process sets THP_MEM_ALLOC_ENABLE=1; we leave it alone.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fusedformer {
namespace cpu {

// Like at::empty(sizes, dtype) on the CPU, contiguous; huge-page backed and cached from 2 MiB up.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.scalar_type()); }

// The size class a request of `bytes` (>= 2 MiB) is served from.
size_t block_size_class(size_t bytes);

struct CacheStats {
  size_t cached_bytes;   // held by the cache, free for reuse
  size_t cached_blocks;
  size_t in_use_bytes;   // handed out and not yet freed (by size class)
  size_t in_use_blocks;
  size_t limit_bytes;    // the cap on cached_bytes
  uint64_t hits;         // requests served from the cache
  uint64_t misses;       // requests that allocated a new block
  uint64_t evictions;    // blocks returned to the system to stay under the cap
};

CacheStats cache_stats();
// Frees the cached blocks; returns how many bytes were released. Blocks in use are untouched.
size_t release_cached_outputs();
// Sets the cap (evicting down to it at once); returns the previous one.
size_t set_cache_limit(size_t bytes);
// Zeroes hits, misses and evictions.
void reset_cache_counters();

}  // namespace cpu
}  // namespace fusedformer
