// See allocator.h.
#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace fusedformer {
namespace cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

// Freed blocks are kept, by size, for the next output of that size (a training step allocates the
// same shapes every step): a reused block costs neither page faults nor the kernel's compaction of
// huge pages, which on a fragmented machine stalls an madvise'd first touch for tens of ms. The cache
// holds at most cache_limit() bytes; beyond that, blocks go back to the system.
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= cache_limit()) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = cached_;
    for (auto& [bytes, p] : free_) std::free(p);
    free_.clear();
    cached_ = 0;
    return released;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  // FUSEDFORMER_CPU_CACHE_MB (default 1024; 0 turns the cache off).
  static size_t cache_limit() {
    static const size_t limit = [] {
      const char* env = std::getenv("FUSEDFORMER_CPU_CACHE_MB");
      const long mb = env != nullptr && *env != '\0' ? std::strtol(env, nullptr, 10) : 1024;
      return static_cast<size_t>(mb > 0 ? mb : 0) << 20;
    }();
    return limit;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
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
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = cache().take(bytes);
    if (p == nullptr) {
      p = std::aligned_alloc(kHugePage, bytes);
      if (p == nullptr) throw std::bad_alloc();
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

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

size_t release_cached_outputs() { return cache().release(); }

size_t cached_output_bytes() { return cache().cached(); }

}  // namespace cpu
}  // namespace fusedformer
