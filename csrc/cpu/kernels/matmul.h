// The tile products of the attention kernels, behind one interface: either the platform's GEMM engine
// (oneDNN's batch-reduce GEMM through torch's at::native::cpublas, wired up by the glue in
// csrc/cpu/matmul.cpp, which JIT-compiles for the CPU at hand: AMX tiles, AVX-512, AVX2) or the
// kernels' own register-blocked micro-kernel (csrc/cpu/kernels/attention.cpp). The glue measures which
// is faster on the machine at hand and hands the kernels the winner.
//
// Torch-free, like every header the per-capability kernel sources include.
#pragma once

#include <cstdint>

#include "cpu/kernels/scalar.h"

namespace fusedformer {
namespace cpu {

// Products are C = [C +] A B, row-major, M x N = (M x K)(K x N), with A of the operand type, C of
// float32 (float64 for float64 operands) and B in panels: column blocks of kPanel columns, each
// `K_pad x kPanel` elements (K_pad = K rounded up to k_align), zero-padded, row-major with leading
// dimension kPanel, then passed through `pack` when the engine has one (bf16/fp16 on AMX want VNNI
// pairs). A is padded to the same K_pad with zero columns.
constexpr int64_t kPanel = 64;

struct MatmulEngine {
  Scalar operand;    // the type of A and B
  const char* name;  // shown by fusedformer._C.attention_engines() and the benchmarks
  int64_t k_align;   // K is padded to a multiple of this (2 for VNNI pairs, else 1)
  // One panel: C (M x N, ldc) = [C +] A (M x K, lda) B (K x N, ldb), N <= kPanel. nullptr: the kernels'
  // own micro-kernel serves (float32 and float64 operands only).
  void (*mm)(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb,
             void* C, int64_t ldc, bool add_C);
  // A row-major K x N panel (ld_in) -> the layout mm reads (ld_out); nullptr: used as written.
  void (*pack)(int64_t K, int64_t N, const void* in, int64_t ld_in, void* out, int64_t ld_out);
  // Called by each thread when its products are done (hands back AMX tile state); or nullptr.
  void (*release)();
};

}  // namespace cpu
}  // namespace fusedformer
