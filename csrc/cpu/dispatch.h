// Run-time choice among the per-capability builds of the kernel bodies (csrc/cpu/kernels/*.cpp).
//
// This header is included both by the glue (compiled for baseline x86-64, with torch) and by the
// kernel sources (compiled three times, without torch), so it includes nothing but <cstdint>.
#pragma once

#include <cstdint>

namespace fusedformer {
namespace cpu {

enum Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2, kAVX512BF16 = 3, kNumCapabilities = 4 };

// The capability the kernels run with: the best the CPU supports, unless lowered by the environment
// variable FUSEDFORMER_CPU_CAPABILITY=default|avx2|avx512|avx512bf16 or by set_capability().
Capability active_capability();
// Returns false (and changes nothing) if the CPU lacks `cap` or the build has no kernels for it.
bool set_capability(Capability cap);
// The best capability both this CPU supports and this build has kernels for.
Capability best_supported_capability();
// Whether the kernels were built for `cap` (setup.py builds the AVX variants only for x86-64 targets).
bool capability_built(Capability cap);
const char* capability_name(Capability cap);

// One function pointer per capability. Zero-initialised at compile time (constant initialisation),
// so the registrars in the kernel sources may fill it during dynamic initialisation in any order.
template <typename Fn>
struct KernelStub {
  Fn table[kNumCapabilities];

  // The pointer for the active capability, or the best lower one that was built.
  Fn get() const {
    for (int c = active_capability(); c >= 0; --c) {
      if (table[c] != nullptr) return table[c];
    }
    return nullptr;
  }
};

template <typename T>
struct NonDeduced {
  using type = T;
};

// Fills one slot of a stub; used through FF_REGISTER_KERNEL at namespace scope.
template <typename Fn>
bool register_kernel(KernelStub<Fn>& stub, int index, typename NonDeduced<Fn>::type fn) {
  stub.table[index] = fn;
  return true;
}

}  // namespace cpu
}  // namespace fusedformer

// In a kernel source: FF_REGISTER_KERNEL(gelu_fwd_f32_stub, gelu_fwd<float>);
// FF_CPU_CAPABILITY(_INDEX) are set by setup.py for each of the three compilations.
#define FF_CONCAT_INNER(a, b) a##b
#define FF_CONCAT(a, b) FF_CONCAT_INNER(a, b)
#define FF_REGISTER_KERNEL(stub, fn)                     \
  [[maybe_unused]] static const bool FF_CONCAT(registered_, __COUNTER__) = \
      ::fusedformer::cpu::register_kernel(::fusedformer::cpu::stub, FF_CPU_CAPABILITY_INDEX, fn)
