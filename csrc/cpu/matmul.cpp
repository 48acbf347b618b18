// The product engines of kernels/matmul.h. oneDNN's brgemm is reached through torch's exported
// at::native::cpublas (ATen/native/CPUBlas.h): it JIT-compiles a kernel per shape for the CPU at hand
// (and for the ISA that ONEDNN_MAX_CPU_ISA allows), caches it per thread, and falls back to
// cpublas::gemm where oneDNN's ukernels are not built in. Our code only decides whether to pack:
// bf16/fp16 B panels are packed (VNNI) by oneDNN where could_pack() says the CPU wants it (AMX), and by
// us where brgemm takes such pairs without AMX (AVX512-BF16/FP16: brgemm_takes_pairs).
#include "cpu/matmul.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <exception>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// VNNI pairs packed by us: out[(k / 2) * 2 * ld_out + 2 * n + k % 2] = in[k * ld_in + n], columns past N
// zero, K even (k_align = 2). For CPUs where oneDNN's brgemm takes bf16 (fp16) tiles in that layout
// but torch's pack() declines (could_pack is true with AMX only): AVX512-BF16 (AVX512-FP16) CPUs such as
// AMD's Zen 4 and Zen 5, where the products then run on vdpbf16ps.
template <typename T>
void pack_pairs(int64_t K, int64_t N, const void* in, int64_t ld_in, void* out, int64_t ld_out) {
  const uint16_t* src = static_cast<const uint16_t*>(in);
  uint16_t* dst = static_cast<uint16_t*>(out);
  static_assert(sizeof(T) == 2, "pairs of 16-bit values");
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* r0 = src + k * ld_in;
    const uint16_t* r1 = r0 + ld_in;
    uint16_t* d = dst + k * ld_out;
    int64_t n = 0;
#if defined(__SSE2__)
    for (; n + 8 <= N; n += 8) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + n));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + n));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * n), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * n + 8), _mm_unpackhi_epi16(a, b));
    }
#endif
    for (; n < N; ++n) {
      d[2 * n] = r0[n];
      d[2 * n + 1] = r1[n];
    }
    if (ld_out > N) std::memset(d + 2 * N, 0, (ld_out - N) * 2 * sizeof(uint16_t));
  }
}

// Whether oneDNN's brgemm runs `T` tiles in VNNI layout here (torch checks the ISA oneDNN may use,
// ONEDNN_MAX_CPU_ISA included, and throws where it cannot): one small product, checked against its
// known result, once per process.
template <typename T>
bool brgemm_takes_pairs() {
  static const bool ok = [] {
    constexpr int64_t M = 2, N = 16, K = 4;
    T a[M * K], b[K * N], packed[K * N];
    float c[M * N], want[M * N];
    for (int64_t i = 0; i < M * K; ++i) a[i] = T(static_cast<float>(i % 5) - 2.0f);
    for (int64_t i = 0; i < K * N; ++i) b[i] = T(static_cast<float>(i % 7) - 3.0f);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(a[m * K + k]) * static_cast<float>(b[k * N + n]);
        want[m * N + n] = acc;
      }
    }
    pack_pairs<T>(K, N, b, N, packed, N);
    try {
      cpublas::brgemm(M, N, K, K, N, N, false, a, packed, c, /*is_vnni=*/true);
      cpublas::brgemm_release(/*is_vnni=*/true);
    } catch (const std::exception&) {
      return false;
    }
    return std::equal(c, c + M * N, want);
  }();
  return ok;
}

const MatmulEngine kNativeF32{Scalar::kFloat32, "native", 1, nullptr, nullptr, nullptr};
const MatmulEngine kNativeF64{Scalar::kFloat64, "native", 1, nullptr, nullptr, nullptr};
const MatmulEngine kBrgemmF32{Scalar::kFloat32, "onednn-brgemm-f32", 1, &brgemm_f32, nullptr, nullptr};
const MatmulEngine kBrgemmBF16{Scalar::kBFloat16, "onednn-brgemm-bf16-vnni", 2, &brgemm_vnni<at::BFloat16>,
                               &pack_vnni<at::kBFloat16>, &release_vnni};
const MatmulEngine kBrgemmF16{Scalar::kFloat16, "onednn-brgemm-f16-vnni", 2, &brgemm_vnni<at::Half>,
                              &pack_vnni<at::kHalf>, &release_vnni};
const MatmulEngine kBrgemmBF16Pairs{Scalar::kBFloat16, "onednn-brgemm-bf16-pairs", 2, &brgemm_vnni<at::BFloat16>,
                                    &pack_pairs<at::BFloat16>, &release_vnni};
const MatmulEngine kBrgemmF16Pairs{Scalar::kFloat16, "onednn-brgemm-f16-pairs", 2, &brgemm_vnni<at::Half>,
                                   &pack_pairs<at::Half>, &release_vnni};

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
      // no AMX: brgemm may still take the pairs (AVX512-BF16, AVX512-FP16), packed by us
      if (!at::globalContext().userEnabledMkldnn()) return nullptr;
      if (dtype == Scalar::kBFloat16 && brgemm_takes_pairs<at::BFloat16>()) return &kBrgemmBF16Pairs;
      if (dtype == Scalar::kFloat16 && brgemm_takes_pairs<at::Half>()) return &kBrgemmF16Pairs;
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
