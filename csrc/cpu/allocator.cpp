// See allocator.h.
#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <new>

namespace fusedformer {
namespace cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

// FUSEDFORMER_CPU_CACHE_MB (default 256; 0 turns the cache off).
size_t limit_from_environment() {
  const char* env = std::getenv("FUSEDFORMER_CPU_CACHE_MB");
  const long mb = env != nullptr && *env != '\0' ? std::strtol(env, nullptr, 10) : 256;
  return static_cast<size_t>(mb > 0 ? mb : 0) << 20;
}

// Freed blocks by size class, with one recency list over all of them for eviction: a training step
// allocates the same shapes every step, so a reused block costs neither page faults nor the kernel's
// compaction of huge pages (which on a fragmented machine stalls an madvise'd first touch for tens of ms).
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ += bytes;
    ++in_use_blocks_;
    auto it = by_size_.find(bytes);
    if (it == by_size_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    const auto lru_it = it->second;
    by_size_.erase(it);
    void* p = lru_it->data;
    lru_.erase(lru_it);
    cached_ -= bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ -= bytes;
    --in_use_blocks_;
    if (bytes > limit_) {
      std::free(p);
      return;
    }
    evict_to(limit_ - bytes);
    lru_.push_back({p, bytes});  // the back is the most recently freed
    by_size_.emplace(bytes, std::prev(lru_.end()));
    cached_ += bytes;
  }

  // Undoes take()'s in-use count for a block that could not be allocated.
  void not_allocated(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ -= bytes;
    --in_use_blocks_;
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = cached_;
    for (const auto& b : lru_) std::free(b.data);
    lru_.clear();
    by_size_.clear();
    cached_ = 0;
    return released;
  }

  size_t set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t before = limit_;
    limit_ = bytes;
    evict_to(limit_);
    return before;
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, lru_.size(), in_use_bytes_, in_use_blocks_, limit_, hits_, misses_, evictions_};
  }

  void reset_counters() {
    std::lock_guard<std::mutex> lock(mutex_);
    hits_ = misses_ = evictions_ = 0;
  }

 private:
  struct Free {
    void* data;
    size_t bytes;
  };

  // Frees the least recently freed blocks until at most `target` bytes are cached. Holds mutex_.
  void evict_to(size_t target) {
    while (cached_ > target) {
      const Free oldest = lru_.front();
      auto range = by_size_.equal_range(oldest.bytes);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == lru_.begin()) {
          by_size_.erase(it);
          break;
        }
      }
      lru_.pop_front();
      std::free(oldest.data);
      cached_ -= oldest.bytes;
      ++evictions_;
    }
  }

  std::mutex mutex_;
  std::list<Free> lru_;
  std::multimap<size_t, std::list<Free>::iterator> by_size_;
  size_t limit_ = limit_from_environment();
  size_t cached_ = 0;
  size_t in_use_bytes_ = 0;
  size_t in_use_blocks_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache();  // never destroyed: tensors may be freed at exit
  return *c;
}

// The block's size travels in the DataPtr's context.
struct Block {
  void* data;
  size_t bytes;
};

void free_block(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give(b->data, b->bytes);
  delete b;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = block_size_class(n);
    void* p = cache().take(bytes);
    if (p == nullptr) {
      p = std::aligned_alloc(kHugePage, bytes);
      if (p == nullptr) {
        cache().not_allocated(bytes);
        throw std::bad_alloc();
      }
      // Only advice: where THP is off the kernel ignores it and we get ordinary pages.
      madvise(p, bytes, MADV_HUGEPAGE);
    }
    return {p, new Block{p, bytes}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

size_t block_size_class(size_t bytes) {
  const size_t pages = (bytes + kHugePage - 1) / kHugePage;  // >= 1
  // keep the top 3 bits of the page count, rounding the rest up
  int top = 63 - __builtin_clzll(static_cast<unsigned long long>(pages));
  const int drop = top > 2 ? top - 2 : 0;
  const size_t rounded = ((pages + (size_t(1) << drop) - 1) >> drop) << drop;
  return rounded * kHugePage;
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

CacheStats cache_stats() { return cache().stats(); }
size_t release_cached_outputs() { return cache().release(); }
size_t set_cache_limit(size_t bytes) { return cache().set_limit(bytes); }
void reset_cache_counters() { cache().reset_counters(); }

}  // namespace cpu
}  // namespace fusedformer
