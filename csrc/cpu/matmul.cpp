// The product engines of kernels/matmul.h. oneDNN's brgemm is reached through torch's exported
// at::native::cpublas (ATen/native/CPUBlas.h): it JIT-compiles a kernel per shape for the CPU at hand
// (and for the ISA that ONEDNN_MAX_CPU_ISA allows), caches it per thread, and falls back to
// cpublas::gemm where oneDNN's ukernels are not built in. Our code only decides whether to pack:
// bf16/fp16 B panels are packed (VNNI) exactly when could_pack() says the CPU wants it, i.e. on AMX.
#include "cpu/matmul.h"

#include <ATen/native/CPUBlas.h>

namespace fusedformer {
namespace cpu {

namespace {

namespace cpublas = at::native::cpublas;

void brgemm_f32(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
                int64_t ldc, bool add_C) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, static_cast<const float*>(A), static_cast<const float*>(B),
                  static_cast<float*>(C), /*is_vnni=*/false);
}

template <typename T>
void brgemm_vnni(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
                 int64_t ldc, bool add_C) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, static_cast<const T*>(A), static_cast<const T*>(B),
                  static_cast<float*>(C), /*is_vnni=*/true);
}

template <at::ScalarType kType>
void pack_vnni(int64_t K, int64_t N, const void* in, int64_t ld_in, void* out, int64_t ld_out) {
  cpublas::pack(K, N, ld_in, ld_out, kType, kType, in, out);
}

void release_vnni() { cpublas::brgemm_release(/*is_vnni=*/true); }

const MatmulEngine kNativeF32{Scalar::kFloat32, "native", 1, nullptr, nullptr, nullptr};
const MatmulEngine kNativeF64{Scalar::kFloat64, "native", 1, nullptr, nullptr, nullptr};
const MatmulEngine kBrgemmF32{Scalar::kFloat32, "onednn-brgemm-f32", 1, &brgemm_f32, nullptr, nullptr};
const MatmulEngine kBrgemmBF16{Scalar::kBFloat16, "onednn-brgemm-bf16-vnni", 2, &brgemm_vnni<at::BFloat16>,
                               &pack_vnni<at::kBFloat16>, &release_vnni};
const MatmulEngine kBrgemmF16{Scalar::kFloat16, "onednn-brgemm-f16-vnni", 2, &brgemm_vnni<at::Half>,
                              &pack_vnni<at::kHalf>, &release_vnni};

}  // namespace

const MatmulEngine* matmul_engine(Scalar dtype, EngineKind kind) {
  switch (kind) {
    case EngineKind::kNative: return dtype == Scalar::kFloat64 ? &kNativeF64 : &kNativeF32;
    case EngineKind::kBrgemmF32: return dtype == Scalar::kFloat64 ? nullptr : &kBrgemmF32;
    case EngineKind::kBrgemm:
      // could_pack is false where oneDNN's ukernels are missing or mkldnn is disabled
      // (torch.backends.mkldnn.enabled = False): brgemm would then refuse VNNI-packed operands.
      if (dtype == Scalar::kBFloat16 && cpublas::could_pack(at::kBFloat16)) return &kBrgemmBF16;
      if (dtype == Scalar::kFloat16 && cpublas::could_pack(at::kHalf)) return &kBrgemmF16;
      return nullptr;
  }
  return nullptr;
}

const char* engine_kind_name(EngineKind kind) {
  switch (kind) {
    case EngineKind::kNative: return "native";
    case EngineKind::kBrgemmF32: return "brgemm-f32";
    case EngineKind::kBrgemm: return "brgemm";
  }
  return "?";
}

}  // namespace cpu
}  // namespace fusedformer
