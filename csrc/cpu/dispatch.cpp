// Capability detection for the per-capability kernel builds (see dispatch.h, setup.py).
#include "cpu/dispatch.h"

#include "build_info.h"  // FF_BUILT_CAPABILITIES, written by setup.py

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fusedformer {
namespace cpu {

namespace {

Capability detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    return __builtin_cpu_supports("avx512bf16") ? kAVX512BF16 : kAVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAVX2;
#endif
  return kDefault;
}

Capability from_environment(Capability best) {
  const char* env = std::getenv("FUSEDFORMER_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  Capability wanted = best;
  if (std::strcmp(env, "default") == 0) wanted = kDefault;
  else if (std::strcmp(env, "avx2") == 0) wanted = kAVX2;
  else if (std::strcmp(env, "avx512") == 0) wanted = kAVX512;
  else if (std::strcmp(env, "avx512bf16") == 0) wanted = kAVX512BF16;
  // An unknown value or one the CPU cannot run keeps the best supported capability; the Python side
  // (fusedformer.backends) reports it.
  return wanted <= best ? wanted : best;
}

std::atomic<int>& active() {
  static std::atomic<int> cap{static_cast<int>(from_environment(best_supported_capability()))};
  return cap;
}

}  // namespace

bool capability_built(Capability cap) { return (FF_BUILT_CAPABILITIES >> static_cast<int>(cap)) & 1; }

// The best capability that this CPU supports and this build has: a build for a target other than x86-64
// has only the baseline kernels.
Capability best_supported_capability() {
  static const Capability best = [] {
    int c = detect();
    while (c > kDefault && !capability_built(static_cast<Capability>(c))) --c;
    return static_cast<Capability>(c);
  }();
  return best;
}

Capability active_capability() { return static_cast<Capability>(active().load(std::memory_order_relaxed)); }

bool set_capability(Capability cap) {
  if (cap < kDefault || cap > best_supported_capability()) return false;
  active().store(static_cast<int>(cap), std::memory_order_relaxed);
  return true;
}

const char* capability_name(Capability cap) {
  switch (cap) {
    case kAVX512: return "avx512";
    case kAVX512BF16: return "avx512bf16";
    case kAVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace fusedformer
