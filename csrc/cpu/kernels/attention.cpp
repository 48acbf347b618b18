// Attention forward and backward, FlashAttention-2 style; compiled once per CPU capability.
//
// The tile products run on a MatmulEngine (kernels/matmul.h): oneDNN's batch-reduce GEMM, which the
// glue JIT-compiles for the CPU at hand (AMX tiles for bf16 where present, AVX-512/AVX2 otherwise), or
// the register-blocked micro-kernel below; the glue measures which is faster here. bf16 and fp16 tiles
// stay in their dtype through the products where the engine takes them (fp32 accumulation); otherwise
// tiles are converted to fp32 as they are packed, never whole tensors. What no GEMM library does is
// ours: the online softmax, masks, causal skipping, dropout, dead rows, GQA, and the scheduling.
//
// Forward, one task per (batch, head, query tile of block_m rows): stream key blocks of block_n keys,
//   S = Q K^T,  m' = max(m, rowmax(scale * S + mask)),  P = exp(scale * S + mask - m'),
//   l' = l exp(m - m') + rowsum(P),  O' = O exp(m - m') + P V,
// then out = O / l and lse = m + log l. K^T and V are packed into the engine's panels once per
// (batch, kv head) per thread and reused by every query tile of that head the thread runs (the heads
// of a GQA group included); causal key blocks past a tile's last query are never visited.
//
// Backward, one task per (batch, kv head, key tile of block_n keys); each thread runs a contiguous
// range of tasks and, per query head of the group and query tile of block_m rows, every key tile of
// its range: it recomputes P = exp(scale * Q K^T + mask - lse) and
//   dV^T += dO^T P,  dP = dO V^T,  dS = scale * P * (dP - delta),  dK^T += Q^T dS,  dQ += dS K,
// with delta = rowsum(dO * O). P and dS serve as the B operands as they come (row-major, or packed
// for the engine), and dO^T, Q^T are built once per query tile: no transpose per pair of tiles. It
// owns its key tiles' dK and dV. dQ of a query tile is summed over the thread's key tiles in a tile
// buffer, then added into the shared dQ once, in a fixed order of threads (AttentionBwdFn): no
// atomics, no per-thread copy of dQ, and the same bits whatever the timing.
//
// Dropout (kernels/dropout.h) acts on P after the softmax: the forward sums the un-dropped P into l
// (the logsumexp is the ordinary one) and multiplies P by D = M / (1 - p) before P V, so
// O = (P * D) V. The backward draws M again and, with dP~ = dO V^T the gradient of P * D,
//   dV += (P * D)^T dO,  dP = dP~ * D,  dS = scale * P * (dP - delta),
// where delta = rowsum(P * dP) = rowsum((P * D) * dP~) = rowsum(dO * O), O being the dropped output:
// delta is computed as without dropout.
//
// P's rows hold exp(lse_true - lse) instead of 1 in total, where lse is the float32 logsumexp: off by
// up to half an ulp of lse, i.e. 2^-21 relative for |lse| in [8, 16), several times the rounding of the
// float32 reference's own softmax. That common factor of a row passes unchanged into dQ's row, so the
// backward also sums P's rows and the caller divides dQ by them: dQ then uses exactly normalised rows.
// (dK and dV mix many rows, whose factors do not line up, and stay as they are.)
#include "cpu/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include "cpu/kernels/dropout.h"
#include "cpu/kernels/half.h"
#include "cpu/kernels/vec.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <sched.h>

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {
namespace {

// ---- helpers ------------------------------------------------------------------------------------

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// A per-call tile buffer, 64-byte aligned.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// 0, n-1, 1, n-2, ...: consecutive tasks pair a long causal tile with a short one, so that the
// contiguous task ranges of the threads get about equal work.
inline int64_t zigzag(int64_t u, int64_t n) { return u % 2 == 0 ? u / 2 : n - 1 - u / 2; }

template <typename T>
inline vec_t<T> viota() {
  vec_t<T> v;
  for (int i = 0; i < Vec<T>::kSize; ++i) v[i] = T(i);
  return v;
}

// Horizontal max and sum by halving: log2(W) shuffles instead of W scalar steps.
#if FF_CPU_CAPABILITY_INDEX == 1
inline vf vhalf_max(vf v) {  // 8 lanes
  v = vmax<float>(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax<float>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = vmax<float>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v;
}
inline float vhmax(vf v) { return vhalf_max(v)[0]; }
inline float vhsum(vf v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}
#else
inline vf vhalf_max(vf v) {  // 16 lanes
  v = vmax<float>(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax<float>(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax<float>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax<float>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v;
}
inline float vhmax(vf v) { return vhalf_max(v)[0]; }
inline float vhsum(vf v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}
#endif
inline double vhmax(vd v) { return vmax_reduce<double>(v); }
inline double vhsum(vd v) { return vsum<double>(v); }

// The polynomial degree of the softmax's exp for probabilities that are rounded to Op next.
template <typename Op>
constexpr int kExpDegree = sizeof(Op) == 2 ? 4 : 6;

// ---- the kernels' own product: register-blocked micro-kernel ------------------------------------

// Register blocking, kRows broadcast rows x kVecs vectors, each with a chunk accumulator and a
// running total, sized to the register file: a 64-byte Vec is one zmm with AVX-512 (32 registers:
// 2 x 4 x 2 accumulators, 2 of B, 1 broadcast, room for the compiler) and four xmm in the baseline
// build (16); with AVX2 a Vec is one ymm (16 registers: 2 x 2 x 2, 2 of B, 1 broadcast). float with
// AVX2 has its own kernel (micro_kernel_ymm below): 6 rows.
#if FF_CPU_CAPABILITY_INDEX >= 2
constexpr int kRows = 4;
constexpr int kVecs = 2;
#elif FF_CPU_CAPABILITY_INDEX == 1
constexpr int kRows = 2;
constexpr int kVecs = 2;
#else
constexpr int kRows = 1;
constexpr int kVecs = 1;
#endif
#if FF_CPU_CAPABILITY_INDEX == 1
constexpr bool kYmmKernel = true;  // float's products on micro_kernel_ymm
#else
constexpr bool kYmmKernel = false;
#endif
// The rows of one micro-kernel call, per operand type.
template <typename T>
constexpr int kRowsOf = std::is_same_v<T, float> && kYmmKernel ? 6 : kRows;

// C[r, :] = (C[r, :] if accumulate) + sum_k A[r, k] * B[k, :] for R rows and NV vectors of columns,
// where A[r, k] = a[r * lda + k] is broadcast and row k of B is b + k * ldb. The sum runs in chunks of
// k_chunk terms, each from zero and then added to the running total, in registers (see kSumChunk):
// total = chunk + total, the first chunk starting from C (accumulate) or from nothing.
template <typename T, int R, int NV>
void micro_kernel(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                  bool accumulate, int64_t k_chunk) {
  constexpr int W = Vec<T>::kSize;
  vec_t<T> tot[R][NV];
  int64_t k0 = 0;
  do {  // at least once: K = 0 still stores C
    const int64_t k1 = std::min(K, k0 + k_chunk);
    vec_t<T> acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vec_t<T>{};
    }
    auto step = [&](int64_t k) {
      vec_t<T> bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vec_t<T> av = vbroadcast(a[r * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
    };
    if (k1 - k0 == 8) {  // the chunked products' usual chunk (kSumChunk), unrolled
#pragma GCC unroll 8
      for (int kk = 0; kk < 8; ++kk) step(k0 + kk);
    } else {
      for (int64_t k = k0; k < k1; ++k) step(k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if (k0 > 0) tot[r][v] = acc[r][v] + tot[r][v];
        else if (accumulate) tot[r][v] = acc[r][v] + vload(c + r * ldc + v * W);
        else tot[r][v] = acc[r][v];
      }
    }
    k0 = k1;
  } while (k0 < K);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * W, tot[r][v]);
  }
}

template <typename T>
using MicroKernel = void (*)(int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, bool, int64_t);

#if FF_CPU_CAPABILITY_INDEX == 1
// micro_kernel<float, R, NV> for AVX2, written with __m256: the same arithmetic in the same order (the
// same bits). Its chunk totals live in C itself (c = chunk + c after each chunk), which frees the
// registers for 6 rows x 2 ymm of accumulators: 12 independent FMA chains, enough to cover the FMA
// latency on two ports (~65 GFLOP/s per core on an AMD EPYC, Zen 4 with AVX2 only, where the generic
// kernel on 64-byte vectors, spilled by GCC, ran at ~20).
template <int R, int NV>
void micro_kernel_ymm(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                      bool accumulate, int64_t k_chunk) {
  constexpr int NY = NV;
  int64_t k0 = 0;
  do {  // at least once: K = 0 still stores C
    const int64_t k1 = std::min(K, k0 + k_chunk);
    __m256 acc[R][NY];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int y = 0; y < NY; ++y) acc[r][y] = _mm256_setzero_ps();
    }
    auto step = [&](int64_t k) __attribute__((always_inline)) {
      __m256 bv[NY];
#pragma GCC unroll 16
      for (int y = 0; y < NY; ++y) bv[y] = _mm256_loadu_ps(b + k * ldb + 8 * y);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
#pragma GCC unroll 16
        for (int y = 0; y < NY; ++y) acc[r][y] = _mm256_fmadd_ps(av, bv[y], acc[r][y]);
      }
    };
    if (k1 - k0 == 8) {  // the chunked products' usual chunk (kSumChunk), unrolled
#pragma GCC unroll 8
      for (int kk = 0; kk < 8; ++kk) step(k0 + kk);
    } else {
      for (int64_t k = k0; k < k1; ++k) step(k);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int y = 0; y < NY; ++y) {
        float* p = c + r * ldc + 8 * y;
        if (k0 > 0 || accumulate) _mm256_storeu_ps(p, _mm256_add_ps(acc[r][y], _mm256_loadu_ps(p)));
        else _mm256_storeu_ps(p, acc[r][y]);
      }
    }
    k0 = k1;
  } while (k0 < K);
}
#endif

// The micro-kernel for a block of r <= R rows and nv <= NV vectors.
template <typename T, int R, int NV>
MicroKernel<T> micro_kernel_for(int64_t r, int64_t nv) {
  if constexpr (R > 1) {
    if (r < R) return micro_kernel_for<T, R - 1, NV>(r, nv);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return micro_kernel_for<T, R, NV - 1>(r, nv);
  }
#if FF_CPU_CAPABILITY_INDEX == 1
  if constexpr (std::is_same_v<T, float>) return &micro_kernel_ymm<R, NV>;
#endif
  return &micro_kernel<T, R, NV>;
}

// C (M rows x nvec vectors, ldc) = [C +] A (M x K, lda) B (K x nvec vectors, ldb). B's panel of kVecs
// vectors stays in L1 across the row blocks.
template <typename T>
void native_gemm(int64_t M, int64_t nvec, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc, bool accumulate, int64_t k_chunk) {
  constexpr int64_t W = Vec<T>::kSize;
  if (k_chunk <= 0) k_chunk = std::max<int64_t>(K, 1);
  constexpr int R = kRowsOf<T>;
  for (int64_t v0 = 0; v0 < nvec; v0 += kVecs) {
    const int64_t nv = std::min<int64_t>(kVecs, nvec - v0);
    const MicroKernel<T> full = micro_kernel_for<T, R, kVecs>(R, nv);
    int64_t r0 = 0;
    for (; r0 + R <= M; r0 += R) {
      full(K, a + r0 * lda, lda, b + v0 * W, ldb, c + r0 * ldc + v0 * W, ldc, accumulate, k_chunk);
    }
    if (r0 < M) {
      micro_kernel_for<T, R, kVecs>(M - r0, nv)(K, a + r0 * lda, lda, b + v0 * W, ldb, c + r0 * ldc + v0 * W,
                                                ldc, accumulate, k_chunk);
    }
  }
}

// dP = dO V^T (K = Ev), whose rows cancel against delta in dP - delta (to the small dS where a row has
// few keys), is summed by the micro-kernel in chunks of kSumChunk terms, whatever the engine, in
// float32 (and delta, its diagonal with O for V, the same way). One chain of Ev fused multiply-adds, as
// oneDNN's kernels sum, took float32 gradients past the 3x rule (random cases with masks, causal, GQA,
// L != S, E = 16: 5-6 of every 300 calls, up to 5.4x, on an AMD EPYC; chunks of 16 stayed within 3x,
// at up to 2.9x).
//
// S = Q K^T (K = E) on oneDNN takes oneDNN's own sums, a single chain, in the forward and in the
// backward's recomputation alike: on ~1,100 random float32 cases (float masks with causal, E = 16 with
// L < S among them) every gradient stayed within 3x, as with chunked scores, and the products run
// ~10 % faster (oneDNN against the micro-kernel's chunked sums). On the micro-kernel (small calls
// below the measured crossover, the native engine, float64) S keeps the chunked sums: single chains
// there added calls over the rule among tests/test_attention_fuzz.py's tiny cases (20 of 1000 against
// 15), where speed does not count. The backward recomputes S with the forward's engine, hence its sums
// (score_chunk), so a row with one key gets P = exp(s - lse) = 1 exactly there.
constexpr int64_t kSumChunk = 8;

// The k_chunk of S = Q K^T on `eng` (0: the engine's single chains), forward and backward alike.
template <typename Acc>
int64_t score_chunk(const MatmulEngine& eng) {
  return eng.mm == nullptr || std::is_same_v<Acc, double> ? kSumChunk : 0;
}

// Probability tiles are padded with zeros to a multiple of this many keys (queries, in the
// backward's dO^T P and Q^T dS): fewer distinct product shapes for oneDNN to compile, whole AMX K-tiles.
constexpr int64_t kKeyAlign = 32;

// ---- panels: the B operands -------------------------------------------------------------------

// The column width of B's panels for a B of N columns: kPanel (VNNI panels are at most 64 wide, and
// a 64-wide panel of E = 64 float rows, 16 KiB, stays in L1 under the micro-kernel), or less for a
// narrow B.
inline int64_t panel_width(const MatmulEngine&, int64_t N) { return std::min(kPanel, round_up(N, 16)); }

// A W x W block of floats (W = Vec<float>::kSize) transposed in registers: log2(W) butterfly stages;
// at distance d, rows a and a + d (a with bit d clear) trade the d-wide off-diagonal blocks of their
// 2d x 2d block. Each row of a stage is one two-source permutation (vpermt2ps with AVX-512).
#define FF_T_STAGE(n, d, LO, HI)                                                                     \
  for (int a = 0; a < n; ++a) {                                                                      \
    if (a & d) continue;                                                                             \
    const vf x = r[a], y = r[a + d];                                                                 \
    r[a] = __builtin_shufflevector(x, y, LO);                                                        \
    r[a + d] = __builtin_shufflevector(x, y, HI);                                                    \
  }
#define FF_L(...) __VA_ARGS__
#if FF_CPU_CAPABILITY_INDEX == 1
__attribute__((always_inline)) inline void transpose_w(vf r[8]) {
  FF_T_STAGE(8, 4, FF_L(0, 1, 2, 3, 8, 9, 10, 11), FF_L(4, 5, 6, 7, 12, 13, 14, 15))
  FF_T_STAGE(8, 2, FF_L(0, 1, 8, 9, 4, 5, 12, 13), FF_L(2, 3, 10, 11, 6, 7, 14, 15))
  FF_T_STAGE(8, 1, FF_L(0, 8, 2, 10, 4, 12, 6, 14), FF_L(1, 9, 3, 11, 5, 13, 7, 15))
}
#else
__attribute__((always_inline)) inline void transpose_w(vf r[16]) {
  // row a: its columns k with bit d clear, then row a + d's columns k - d; row a + d: row a's
  // columns k + d, then its own columns k with bit d set
  FF_T_STAGE(16, 8, FF_L(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
             FF_L(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  FF_T_STAGE(16, 4, FF_L(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
             FF_L(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  FF_T_STAGE(16, 2, FF_L(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
             FF_L(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  FF_T_STAGE(16, 1, FF_L(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
             FF_L(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#endif
#undef FF_L
#undef FF_T_STAGE

// Writes B (K x N), B[k][n] = src[k * rs + n * cs] converted to Op, as the engine's panels at dst:
// panels of ldb columns (panel_width), panel p at dst + p * k_fill * ldb, rows [K, k_fill) and columns
// past N zero; each passed through eng.pack when it has one. staging: k_fill * ldb elements.
template <typename Op, typename Src>
void pack_b(const MatmulEngine& eng, int64_t K, int64_t N, const Src* src, int64_t rs, int64_t cs,
            int64_t k_fill, int64_t ldb, Op* dst, Op* staging) {
  const int64_t panel_stride = k_fill * ldb;
  for (int64_t n0 = 0; n0 < std::max<int64_t>(N, 1); n0 += ldb) {
    const int64_t nb = std::min(ldb, N - n0);
    Op* out = dst + (n0 / ldb) * panel_stride;
    Op* st = eng.pack != nullptr ? staging : out;
    if (cs == 1) {
      for (int64_t k = 0; k < K; ++k) {
        convert_row(st + k * ldb, src + k * rs + n0, nb);
        std::memset(static_cast<void*>(st + k * ldb + nb), 0, (ldb - nb) * sizeof(Op));
      }
    } else {  // a transpose: walk the source rows (src + n * cs), write the panel's columns
      if (nb < ldb) std::memset(static_cast<void*>(st), 0, K * ldb * sizeof(Op));
      int64_t n16 = 0, k16 = 0;  // the whole blocks' extent
      if constexpr (std::is_same_v<Op, float>) {
        if (rs == 1) {  // whole W x W blocks in registers
          constexpr int W = Vec<float>::kSize;
          n16 = nb / W * W;
          k16 = K / W * W;
          vf r[W];
          for (int64_t n = 0; n < n16; n += W) {
            for (int64_t k = 0; k < k16; k += W) {
              for (int i = 0; i < W; ++i) r[i] = load_lanes<Src, float>(src + (n0 + n + i) * cs + k);
              transpose_w(r);
              for (int i = 0; i < W; ++i) vstore(st + (k + i) * ldb + n, r[i]);
            }
          }
        }
      }
      for (int64_t n = 0; n < nb; ++n) {
        const Src* row = src + (n0 + n) * cs;
        // the rest: columns past the whole blocks, and the rows past them in the blocks' columns
        for (int64_t k = n < n16 ? k16 : 0; k < K; ++k) st[k * ldb + n] = convert<Op>(row[k * rs]);
      }
    }
    std::memset(static_cast<void*>(st + K * ldb), 0, (k_fill - K) * ldb * sizeof(Op));
    if (eng.pack != nullptr) eng.pack(k_fill, ldb, st, ldb, out, ldb);
  }
}

// C (M x N, ldc) = [C +] A (M x K, lda) B, B in panels of ldb columns panel_stride apart (pack_b). K is
// rounded up to the engine's k_align: A's padding columns and B's padding rows are zero. The
// micro-kernel writes C's columns up to N rounded up to its vector width: ldc must leave room
// (round_up(N, 16)).
//
// k_chunk > 0 asks for the micro-kernel's chunked sums (see kSumChunk) even where the engine is
// oneDNN's, whose kernels sum each element in one chain: its row-major float32 panels are the
// micro-kernel's layout too. Only the float32 attention asks (see dP in the backward).
template <typename Op, typename Acc>
void mm(const MatmulEngine& eng, int64_t M, int64_t N, int64_t K, const Op* A, int64_t lda, const Op* B,
        int64_t ldb, int64_t panel_stride, Acc* C, int64_t ldc, bool add, int64_t k_chunk) {
  if (M <= 0 || N <= 0) return;
  const int64_t Kp = round_up(K, eng.k_align);
  for (int64_t n0 = 0; n0 < N; n0 += ldb) {
    const int64_t nb = std::min(ldb, N - n0);
    const Op* b = B + (n0 / ldb) * panel_stride;
    if (eng.mm != nullptr && (k_chunk <= 0 || eng.pack != nullptr || !std::is_same_v<Op, Acc>)) {
      eng.mm(M, nb, Kp, A, lda, b, ldb, C + n0, ldc, add);
    } else if constexpr (std::is_same_v<Op, Acc>) {
      native_gemm<Acc>(M, ceil_div(nb, Vec<Acc>::kSize), Kp, A, lda, b, ldb, C + n0, ldc, add, k_chunk);
    }
  }
}

// ---- masks and dropout --------------------------------------------------------------------------

// The mask's contribution to W lanes of scores: lane l reads element off + l * lane_stride of the
// mask (0 or -inf for a bool mask). Lanes >= n are never read; their value is unspecified.
template <typename T>
inline vec_t<T> mask_bias(const bool* keep, const T* add, int64_t off, int64_t lane_stride, int64_t n) {
  constexpr int64_t W = Vec<T>::kSize;
  if (lane_stride == 0) return vbroadcast(keep != nullptr ? (keep[off] ? T(0) : kNegInf<T>) : add[off]);
  if (add != nullptr && lane_stride == 1 && n == W) return vload(add + off);
  if (keep != nullptr && lane_stride == 1 && n == W) {  // W bytes of bool, widened to lane masks
    typedef uint8_t bytes __attribute__((vector_size(W)));
    typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_int;
    typedef lane_int lanes __attribute__((vector_size(kVecBytes)));
    bytes kb;
    std::memcpy(&kb, keep + off, W);
    return __builtin_convertvector(kb, lanes) != 0 ? vec_t<T>{} : vbroadcast(kNegInf<T>);
  }
  T buf[W] = {};
  if (keep != nullptr) {
    for (int64_t l = 0; l < n; ++l) buf[l] = keep[off + l * lane_stride] ? T(0) : kNegInf<T>;
  } else {
    for (int64_t l = 0; l < n; ++l) buf[l] = add[off + l * lane_stride];
  }
  return vload(buf);
}

// W lanes of uint32 dropout bits, and the lane mask type of vec_t<T>.
template <typename T>
struct DropoutLanes;
template <>
struct DropoutLanes<float> {
  typedef uint32_t bits __attribute__((vector_size(kVecBytes)));
  typedef int32_t mask __attribute__((vector_size(kVecBytes)));
};
template <>
struct DropoutLanes<double> {
  typedef uint32_t bits __attribute__((vector_size(kVecBytes / 2)));
  typedef int64_t mask __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using dropout_bits_t = typename DropoutLanes<T>::bits;

template <typename T>
inline dropout_bits_t<T> load_bits(const uint32_t* p) {
  dropout_bits_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline dropout_bits_t<T> broadcast_bits(uint32_t x) {
  return dropout_bits_t<T>{} + x;
}

// x * keep_scale in the lanes whose bits reach the threshold, 0 in the others.
template <typename T>
inline vec_t<T> apply_dropout(vec_t<T> x, dropout_bits_t<T> bits, uint32_t threshold, T keep_scale) {
  const auto keep = __builtin_convertvector(bits >= broadcast_bits<T>(threshold), typename DropoutLanes<T>::mask);
  return keep ? x * keep_scale : vec_t<T>{};
}

// The scores of one row of a tile, x = scale * S[j] + mask (scale is 1 where the caller folded it
// into Q, see load_q), with -inf at keys j >= limit (past the tile's keys, or causal, after the row's
// query). Rewrites x in place where it differs from S; n: the tile's keys rounded up to whole vectors.
// Returns the row's max. The forward and the backward both take x from here, through memory: bit for
// bit the same scores, with no multiply-add contracted differently in one of them (a row with one key
// then gets P = exp(x - lse) = 1 exactly in the backward, as in the forward).
template <typename Acc>
inline Acc score_row(Acc* s, int64_t n, int64_t limit, Acc scale, const bool* keep, const Acc* add,
                     int64_t mask_off, int64_t mask_stride) {
  constexpr int64_t W = Vec<Acc>::kSize;
  const vec_t<Acc> iota = viota<Acc>();
  const vec_t<Acc> neg_inf = vbroadcast(kNegInf<Acc>);
  const bool has_mask = keep != nullptr || add != nullptr;
  const bool scaled = scale != Acc(1);
  vec_t<Acc> row_max = neg_inf;
  for (int64_t c = 0; c < n; c += W) {
    vec_t<Acc> x = vload(s + c);
    const int64_t lanes = limit - c;  // visible lanes of this vector
    if (scaled || has_mask || lanes < W) {
      if (scaled) x *= scale;
      if (has_mask && lanes > 0) {
        x += mask_bias<Acc>(keep, add, mask_off + c * mask_stride, mask_stride, std::min(W, lanes));
      }
      if (lanes < W) x = iota < Acc(std::max<int64_t>(lanes, 0)) ? x : neg_inf;
      vstore(s + c, x);
    }
    row_max = vmax<Acc>(row_max, x);
  }
  __asm__ volatile("" ::: "memory");  // the callers' next pass reads x back from memory
  return vhmax(row_max);
}

// Whether multiplying by x is exact (a power of two, or 1): then Q takes the scale (load_q).
inline bool is_power_of_two(double x) {
  int e;
  return x > 0.0 && std::frexp(x, &e) == 0.5;
}

// A tile of Q (im rows of E) as the A operand of S = Q K^T: converted to Op, times q_scale (the softmax
// scale when that is a power of two, so exactly; else 1, and score_row scales), zero-padded to Ep.
template <typename Op, typename In, typename Acc>
void load_q(Op* dst, const In* q, int64_t q_stride, int64_t im, int64_t E, int64_t Ep, Acc q_scale) {
  for (int64_t i = 0; i < im; ++i) {
    for (int64_t e = 0; e < E; ++e) {
      dst[i * Ep + e] = Elem<Op>::store(static_cast<acc_t<Op>>(Elem<In>::load(q[i * q_stride + e]) * q_scale));
    }
    for (int64_t e = E; e < Ep; ++e) dst[i * Ep + e] = convert<Op>(Acc(0));
  }
}

// ---- forward ------------------------------------------------------------------------------------

template <typename In, typename Op>
void attention_fwd_impl(const AttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  using Acc = acc_t<In>;
  constexpr int64_t W = Vec<Acc>::kSize;
  const MatmulEngine& eng = *a.engine;
  const int64_t BM = a.block_m, KB = a.block_n;
  const int64_t E = a.E, Ev = a.Ev, S = a.S;
  const int64_t Ep = round_up(E, eng.k_align);
  const int64_t ldo = round_up(Ev, 16);
  const int64_t n_qtiles = ceil_div(a.L, BM);
  const int64_t group = a.Hq / a.Hk;
  const int64_t n_blocks = ceil_div(S, KB);
  const int64_t ldk = panel_width(eng, KB), ldv = panel_width(eng, Ev);
  const int64_t kt_block = round_up(KB, ldk) * Ep;   // K^T of KB keys: Ep x KB in panels
  const int64_t v_block = round_up(Ev, ldv) * KB;    // V of KB keys: KB x Ev in panels
  const bool lse_only = a.log_sum != nullptr;
  const bool dropout = a.dropout_p > 0.0 && !lse_only;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const Acc keep_scale = static_cast<Acc>(1.0 / (1.0 - a.dropout_p));
  const Acc scale = static_cast<Acc>(a.scale);
  const Acc q_scale = is_power_of_two(a.scale) ? scale : Acc(1), s_scale = scale / q_scale;
  const int64_t s_chunk = score_chunk<Acc>(eng);  // S's sums: see kSumChunk
  const int64_t* ms = a.mask_strides;
  const Acc* mask_add = static_cast<const Acc*>(a.mask_add);
  const In* q_all = static_cast<const In*>(a.q);
  const In* k_all = static_cast<const In*>(a.k);
  const In* v_all = static_cast<const In*>(a.v);

  // the packed K^T and V of the (batch, kv head) pair last used, blocks [0, packed_blocks)
  Buffer<Op> kt_buf(n_blocks * kt_block);
  Buffer<Op> v_buf(lse_only ? 1 : n_blocks * v_block);
  Buffer<Op> staging(std::max(Ep * ldk, KB * ldv));
  Buffer<Op> q_buf(BM * Ep);    // the query tile (load_q), A of S = Q K^T
  Buffer<Acc> s_buf(BM * KB);   // scores
  Buffer<Op> p_buf(BM * KB);    // probabilities, A of P V
  Buffer<Acc> o_buf(BM * ldo);  // unnormalised output
  // per row: running max m, sum l, and the block's row max, rescale and exp shift (max, or 0)
  const int64_t BMv = round_up(BM, W);
  Buffer<Acc> m_buf(BMv), l_buf(BMv), row_max_buf(BMv), alpha_buf(BMv), shift_buf(BMv);
  Buffer<uint32_t> col_hash(KB);  // dropout: the block's keys' hashes C_j
  Op* kt = kt_buf.get();
  Op* vp = v_buf.get();
  Op* qb = q_buf.get();
  Acc* s = s_buf.get();
  Op* p = p_buf.get();
  Acc* o = o_buf.get();
  Acc* m = m_buf.get();
  Acc* l = l_buf.get();
  Acc* row_max = row_max_buf.get();
  Acc* alpha = alpha_buf.get();
  Acc* shift = shift_buf.get();
  const vec_t<Acc> neg_inf = vbroadcast(kNegInf<Acc>);
  std::fill(row_max, row_max + BMv, kNegInf<Acc>);  // lanes past a tile's rows: -inf, never NaN
  int64_t packed_pair = -1, packed_blocks = 0;

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / n_qtiles;
    const int64_t b = bh / a.Hq, h = bh % a.Hq, hk = h / group;
    const int64_t pair = b * a.Hk + hk;
    const int64_t i0 = zigzag(task % n_qtiles, n_qtiles) * BM;
    const int64_t im = std::min(BM, a.L - i0);
    // causal: query i sees keys j <= i, so this tile needs keys j < i0 + im only
    const int64_t j_end = a.is_causal ? std::min(S, i0 + im) : S;

    if (pair != packed_pair) {
      packed_pair = pair;
      packed_blocks = 0;
    }
    for (; packed_blocks < ceil_div(j_end, KB); ++packed_blocks) {
      const int64_t j0 = packed_blocks * KB, jn = std::min(KB, S - j0);
      const In* kb = k_all + b * a.k_strides[0] + hk * a.k_strides[1] + j0 * a.k_strides[2];
      pack_b(eng, E, jn, kb, 1, a.k_strides[2], Ep, ldk, kt + packed_blocks * kt_block, staging.get());
      if (!lse_only) {
        const In* vb = v_all + b * a.v_strides[0] + hk * a.v_strides[1] + j0 * a.v_strides[2];
        pack_b(eng, jn, Ev, vb, a.v_strides[2], 1, KB, ldv, vp + packed_blocks * v_block, staging.get());
      }
    }

    load_q(qb, q_all + b * a.q_strides[0] + h * a.q_strides[1] + i0 * a.q_strides[2], a.q_strides[2], im, E, Ep,
           q_scale);
    std::fill(m, m + BMv, kNegInf<Acc>);
    std::fill(l, l + im, Acc(0));
    const DropoutKeys keys = dropout_keys(a.seed, a.dropout_bh_offset + bh);
    const int64_t mask_row = b * ms[0] + h * ms[1] + i0 * ms[2];

    for (int64_t j0 = 0; j0 < j_end; j0 += KB) {
      const int64_t jn = std::min(KB, j_end - j0);
      const int64_t jv = round_up(jn, W);                          // the score lanes of whole vectors
      const int64_t kpv = std::min(KB, round_up(jn, kKeyAlign));   // K of P V
      mm<Op, Acc>(eng, im, jn, E, qb, Ep, kt + (j0 / KB) * kt_block, ldk, Ep * ldk, s, KB, false, s_chunk);
      if (dropout) {
        for (int64_t j = 0; j < jn; ++j) col_hash.get()[j] = dropout_col_hash<uint32_t>(keys, uint32_t(j0 + j));
      }
      // the rows' maxes, then, 16 rows to a vector, the new running max and the rescale alpha
      for (int64_t i = 0; i < im; ++i) {
        const int64_t limit = a.is_causal ? std::min(jn, i0 + i - j0 + 1) : jn;
        row_max[i] = score_row<Acc>(s + i * KB, jv, limit, s_scale, a.mask_keep, mask_add,
                                    mask_row + i * ms[2] + j0 * ms[3], ms[3]);
      }
      for (int64_t c = 0; c < im; c += W) {
        const vec_t<Acc> m_old = vload(m + c);
        const vec_t<Acc> m_new = vmax<Acc>(m_old, vload(row_max + c));
        // a row that has seen only -inf keeps m = -inf; subtracting 0 instead gives p = 0, not NaN
        const vec_t<Acc> m_safe = m_new == neg_inf ? vec_t<Acc>{} : m_new;
        vstore(alpha + c, vexp_nonpositive<6>(m_old - m_safe));
        vstore(m + c, m_new);
        vstore(shift + c, m_safe);
      }
      for (int64_t i = 0; i < im; ++i) {
        const Acc* sr = s + i * KB;
        const vec_t<Acc> mv = vbroadcast(shift[i]);
        vec_t<Acc> sum{};
        Op* pr = p + i * KB;
        if (dropout) {  // l sums P; P V sees P * M / (1 - p)
          const dropout_bits_t<Acc> row = broadcast_bits<Acc>(dropout_row_hash<uint32_t>(keys, uint32_t(i0 + i)));
          for (int64_t c = 0; c < jv; c += W) {
            const vec_t<Acc> e = vexp_nonpositive<kExpDegree<Op>>(vload(sr + c) - mv);
            sum += e;
            const dropout_bits_t<Acc> bits = dropout_bits<dropout_bits_t<Acc>>(row, load_bits<Acc>(col_hash.get() + c));
            store_lanes<Op, Acc>(pr + c, apply_dropout<Acc>(e, bits, threshold, keep_scale));
          }
        } else {
          for (int64_t c = 0; c < jv; c += W) {
            const vec_t<Acc> e = vexp_nonpositive<kExpDegree<Op>>(vload(sr + c) - mv);
            sum += e;
            store_lanes<Op, Acc>(pr + c, e);
          }
        }
        for (int64_t c = jv; c < kpv; ++c) pr[c] = convert<Op>(Acc(0));
        l[i] = l[i] * alpha[i] + vhsum(sum);
        if (!lse_only && j0 > 0 && alpha[i] != Acc(1)) {
          Acc* orow = o + i * ldo;
          const vec_t<Acc> av = vbroadcast(alpha[i]);
          for (int64_t e = 0; e < ldo; e += W) vstore(orow + e, vload(orow + e) * av);
        }
      }
      if (!lse_only) {
        mm<Op, Acc>(eng, im, Ev, kpv, p, KB, vp + (j0 / KB) * v_block, ldv, KB * ldv, o, ldo, j0 > 0, 0);
      }
    }

    Acc* lse = static_cast<Acc*>(a.lse) + bh * a.L + i0;
    if (lse_only) {
      Acc* log_sum = static_cast<Acc*>(a.log_sum) + bh * a.L + i0;
      for (int64_t i = 0; i < im; ++i) {
        lse[i] = l[i] > Acc(0) ? m[i] : std::numeric_limits<Acc>::infinity();
        log_sum[i] = l[i] > Acc(0) ? std::log(l[i]) : Acc(0);
      }
      continue;
    }
    const int64_t os = a.out_strides[2];
    In* out = static_cast<In*>(a.out) + (bh / a.Hq) * a.out_strides[0] + (bh % a.Hq) * a.out_strides[1] + i0 * os;
    for (int64_t i = 0; i < im; ++i) {
      lse[i] = l[i] > Acc(0) ? m[i] + std::log(l[i]) : std::numeric_limits<Acc>::infinity();
      // a row with no key to attend to outputs 0 (its O row is 0)
      const Acc li = l[i] > Acc(0) ? l[i] : Acc(1);
      const vec_t<Acc> lv = vbroadcast(li);
      int64_t e = 0;
      for (; e + W <= Ev; e += W) store_lanes<In, Acc>(out + i * os + e, vload(o + i * ldo + e) / lv);
      for (; e < Ev; ++e) out[i * os + e] = Elem<In>::store(o[i * ldo + e] / li);
    }
  }
  if (eng.release != nullptr) eng.release();
}

// ---- decode: few query rows against many keys ---------------------------------------------------

// The keys query i of sequence b may see: [0, end).
inline int64_t decode_key_end(int causal, int64_t n_b, int64_t L, int64_t i) {
  if (causal == 1) return std::min(n_b, i + 1);
  if (causal == 2) return std::min(n_b, n_b - L + i + 1);
  return n_b;
}

// The decode kernel's products read K and V where they lie, in their own dtype (bf16 and fp16 widened
// in registers, exactly), once each: few query rows against many keys are bound by those reads, and a
// packed panel of 64 keys or a GEMM engine's tiles would add traffic and per-call work for one to
// sixteen rows.

// Software prefetch kDecodeAhead keys ahead, where it measured faster (Intel Xeon, 2 threads, B=4, H=12,
// E=64): float32 K, whose W x W blocks are read across W rows at a time, which the hardware's stream
// prefetchers follow poorly; bf16 and fp16 V (1.03x -> 1.13x torch at S=4096). Not float32 V, read row by
// row in order (neutral to slower there).
constexpr int64_t kDecodeAhead = 64;

template <typename T>
inline void prefetch_rows(const T* p, int64_t rows, int64_t ld, int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// W vectors in, one out whose lane t is the sum of a[t]'s lanes: a transposing tree of adds, log2(W)
// levels of two-source shuffles (W - 1 adds for W sums).
#if FF_CPU_CAPABILITY_INDEX == 1
inline vf vtranspose_sum(vf (&a)[8]) {
  vf w[4], x[2];
  for (int i = 0; i < 4; ++i) {
    w[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#else
inline vf vtranspose_sum(vf (&a)[16]) {
  vf u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i) {
    u[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    w[i] = __builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#endif

// s[r * lds + t] = sum_e qs[r * ldq + e] k[t * ldk + e] for r < rm and nk <= W keys t (lanes past nk 0):
// each key's products summed lane-wise (E / W terms a lane), then the W keys' lanes by vtranspose_sum.
template <typename In>
inline void lanewise_scores(int64_t rm, int64_t nk, int64_t E, const float* qs, int64_t ldq, const In* kb,
                            int64_t ldk, float* s, int64_t lds) {
  constexpr int64_t W = Vec<float>::kSize;
  const int64_t Ef = E / W * W;
  for (int64_t r = 0; r < rm; ++r) {
    const float* qr = qs + r * ldq;
    vf acc[W];
    for (int64_t t = 0; t < W; ++t) {
      acc[t] = vf{};
      if (t >= nk) continue;
      const In* kr = kb + t * ldk;
      int64_t e = 0;
      for (; e < Ef; e += W) acc[t] += vload(qr + e) * load_lanes<In, float>(kr + e);
      if (e < E) acc[t] += vload(qr + e) * load_lanes_partial<In, float>(kr + e, E - e);
    }
    vstore(s + r * lds, vtranspose_sum(acc));
  }
}

// s[r * lds + j] = sum_e qs[r * ldq + e] k[j * ldk + e], r < rm, j < jn (lanes up to round_up(jn, W)
// written, 0 past jn); qs holds ldq >= round_up(E, W) columns, zero past E. W keys at a time, two ways:
// - float32 and float64 K: their W x E block transposed (in registers for float, element by element
//   for double) into kt (E x W, in L1), then the micro-kernel's sums over it in chunks of s_chunk terms
//   (0: one chain), those of the engine the backward will recompute S on (score_chunk; always chunked
//   for double), so that it gets these very scores (a row with one key: P = exp(s - lse) = 1 there).
// - bf16 and fp16 K: each key's products summed lane-wise (E / W terms a lane), then the W keys'
//   lanes by vtranspose_sum, a pairwise tree that rounds no worse than the chunked sums, with no
//   transposes: half the bytes per key leave less time to hide them in. The backward's S comes from
//   the GEMM engine there, in another order whatever the forward does, and the 16-bit rounding of the
//   inputs is far larger than either order's.
// - float32 K when `lanewise` (an inference call: no backward recomputes these scores): as bf16 and
//   fp16, lane-wise sums and vtranspose_sum, no transposes.
template <typename In, typename Acc>
void decode_scores(int64_t rm, int64_t jn, int64_t E, const Acc* qs, int64_t ldq, const In* k, int64_t ldk,
                   Acc* s, int64_t lds, Acc* kt, bool lanewise, int64_t s_chunk) {
  constexpr int64_t W = Vec<Acc>::kSize;
  if constexpr (std::is_same_v<In, Acc> && std::is_same_v<Acc, float>) {
    if (lanewise) {
      for (int64_t j0 = 0; j0 < jn; j0 += W) {
        const int64_t nk = std::min(W, jn - j0);
        const float* kb = k + j0 * ldk;
        prefetch_rows(kb + kDecodeAhead * ldk, nk, ldk, E);
        lanewise_scores<float>(rm, nk, E, qs, ldq, kb, ldk, s + j0, lds);
      }
      return;
    }
    // all jn <= kPanel keys transposed into kt (E x kPanel), then one micro-kernel pass: its blocks of
    // 2 vectors give each chunk two independent chains
    for (int64_t j0 = 0; j0 < jn; j0 += W) {
      const int64_t nk = std::min<int64_t>(W, jn - j0);
      const float* kb = k + j0 * ldk;
      prefetch_rows(kb + kDecodeAhead * ldk, nk, ldk, E);
      vf r[W];
      const int64_t E16 = nk == W ? E / W * W : 0;  // whole blocks: no lane or row checks
      for (int64_t e0 = 0; e0 < E16; e0 += W) {
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) r[t] = vload(kb + t * ldk + e0);
        transpose_w(r);
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) vstore(kt + (e0 + i) * kPanel + j0, r[i]);
      }
      for (int64_t e0 = E16; e0 < E; e0 += W) {
        const int64_t ne = std::min<int64_t>(W, E - e0);
        for (int64_t t = 0; t < W; ++t) {
          r[t] = t >= nk ? vf{} : ne == W ? vload(kb + t * ldk + e0) : vload_partial(kb + t * ldk + e0, ne);
        }
        transpose_w(r);
        for (int64_t i = 0; i < ne; ++i) vstore(kt + (e0 + i) * kPanel + j0, r[i]);
      }
    }
    native_gemm<Acc>(rm, ceil_div(jn, W), E, qs, ldq, kt, kPanel, s, lds, false, s_chunk);
    return;
  }
  for (int64_t j0 = 0; j0 < jn; j0 += W) {
    const int64_t nk = std::min(W, jn - j0);
    const In* kb = k + j0 * ldk;
    if constexpr (!std::is_same_v<In, Acc>) {
      lanewise_scores<In>(rm, nk, E, qs, ldq, kb, ldk, s + j0, lds);
    } else {  // double: element by element
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t t = 0; t < W; ++t) kt[e * W + t] = t < nk ? kb[t * ldk + e] : Acc(0);
      }
      native_gemm<Acc>(rm, 1, E, qs, ldq, kt, W, s + j0, lds, false, kSumChunk);
    }
  }
}

// nr rows (template NR) of o[., e0 : e0 + NV W] += p[., :jn] V[:jn, e0 : e0 + NV W], in registers;
// Tail: the last vector holds ev - (NV - 1) W < W columns (partial loads, zero past them).
template <typename In, typename Acc, int NR, int NV, bool Tail, bool Prefetch>
inline void decode_pv_tile(int64_t jn, const Acc* p, int64_t ldp, const In* v, int64_t ldv, int64_t ev, Acc* o,
                           int64_t ldo) {
  constexpr int64_t W = Vec<Acc>::kSize;
  vec_t<Acc> acc[NR][NV];
  for (int r = 0; r < NR; ++r) {
    for (int c = 0; c < NV; ++c) acc[r][c] = vec_t<Acc>{};
  }
  for (int64_t j = 0; j < jn; ++j) {
    const In* vr = v + j * ldv;
    if (Prefetch) prefetch_rows(vr + kDecodeAhead * ldv, 1, ldv, ev);
    vec_t<Acc> vv[NV];
    for (int c = 0; c < NV; ++c) {
      vv[c] = Tail && c == NV - 1 ? load_lanes_partial<In, Acc>(vr + c * W, ev - c * W) : load_lanes<In, Acc>(vr + c * W);
    }
    for (int r = 0; r < NR; ++r) {
      const vec_t<Acc> pr = vbroadcast(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int c = 0; c < NV; ++c) vstore(o + r * ldo + c * W, vload(o + r * ldo + c * W) + acc[r][c]);
  }
}

template <typename In, typename Acc, int NR, bool Prefetch>
void decode_pv_rows(int64_t jn, int64_t Ev, const Acc* p, int64_t ldp, const In* v, int64_t ldv, Acc* o,
                    int64_t ldo) {
  constexpr int64_t W = Vec<Acc>::kSize;
  int64_t e = 0;
  for (; e + 4 * W <= Ev; e += 4 * W) decode_pv_tile<In, Acc, NR, 4, false, Prefetch>(jn, p, ldp, v + e, ldv, 4 * W, o + e, ldo);
  const int64_t left = Ev - e, full = left / W;
  if (left == 0) return;
  if (left % W == 0) {
    if (full == 1) decode_pv_tile<In, Acc, NR, 1, false, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
    if (full == 2) decode_pv_tile<In, Acc, NR, 2, false, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
    if (full == 3) decode_pv_tile<In, Acc, NR, 3, false, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
  } else {
    if (full == 0) decode_pv_tile<In, Acc, NR, 1, true, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
    if (full == 1) decode_pv_tile<In, Acc, NR, 2, true, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
    if (full == 2) decode_pv_tile<In, Acc, NR, 3, true, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
    if (full == 3) decode_pv_tile<In, Acc, NR, 4, true, Prefetch>(jn, p, ldp, v + e, ldv, left, o + e, ldo);
  }
}

// Rows [0, n < 4) of decode_pv.
template <typename In, typename Acc, bool Prefetch>
void decode_pv_few(int64_t n, int64_t jn, int64_t Ev, const Acc* p, int64_t ldp, const In* v, int64_t ldv, Acc* o,
                   int64_t ldo) {
  switch (n) {
    case 3: return decode_pv_rows<In, Acc, 3, Prefetch>(jn, Ev, p, ldp, v, ldv, o, ldo);
    case 2: return decode_pv_rows<In, Acc, 2, Prefetch>(jn, Ev, p, ldp, v, ldv, o, ldo);
    case 1: return decode_pv_rows<In, Acc, 1, Prefetch>(jn, Ev, p, ldp, v, ldv, o, ldo);
    default: return;
  }
}

// o[r * ldo + e] += sum_j p[r * ldp + j] v[j * ldv + e], r < rm, e < Ev (o's rows hold round_up(Ev, W)):
// up to 4 rows x 4 vectors of accumulators in registers, V's rows read once per 4 query rows. The first
// pass over V prefetches ahead (16-bit V, see kDecodeAhead); later row blocks find the rows in L1.
template <typename In, typename Acc>
void decode_pv(int64_t rm, int64_t jn, int64_t Ev, const Acc* p, int64_t ldp, const In* v, int64_t ldv, Acc* o,
               int64_t ldo) {
  constexpr bool kPrefetch = !std::is_same_v<In, Acc>;
  int64_t r = 0;
  for (; r + 4 <= rm; r += 4) {
    if (r == 0) decode_pv_rows<In, Acc, 4, kPrefetch>(jn, Ev, p, ldp, v, ldv, o, ldo);
    else decode_pv_rows<In, Acc, 4, false>(jn, Ev, p + r * ldp, ldp, v, ldv, o + r * ldo, ldo);
  }
  if (r == 0) decode_pv_few<In, Acc, kPrefetch>(rm, jn, Ev, p, ldp, v, ldv, o, ldo);
  else decode_pv_few<In, Acc, false>(rm - r, jn, Ev, p + r * ldp, ldp, v, ldv, o + r * ldo, ldo);
}

template <typename In>
void attention_decode_impl(const AttentionDecodeArgs& a, int64_t task_begin, int64_t task_end) {
  using Acc = acc_t<In>;
  constexpr int64_t W = Vec<Acc>::kSize;
  constexpr int64_t KB = kPanel;  // keys per step of the online softmax
  const int64_t E = a.E, Ev = a.Ev, L = a.L, G = a.Hq / a.Hk, M = G * L, BM = a.block_m;
  const int64_t n_rblocks = ceil_div(M, BM);
  const int64_t ldo = round_up(Ev, 16);
  const Acc scale = static_cast<Acc>(a.scale);
  const Acc q_scale = is_power_of_two(a.scale) ? scale : Acc(1), s_scale = scale / q_scale;
  const int64_t* ms = a.mask_strides;
  const Acc* mask_add = static_cast<const Acc*>(a.mask_add);
  const In* q_all = static_cast<const In*>(a.q);
  const In* k_all = static_cast<const In*>(a.k);
  const In* v_all = static_cast<const In*>(a.v);
  const int64_t Ep = round_up(E, W);

  const int64_t BMv = round_up(BM, W);
  Buffer<Acc> q_buf(BM * Ep), kt_buf(Ep * KB), s_buf(BM * KB), o_buf(BM * ldo);
  Acc* kt = kt_buf.get();
  Buffer<Acc> m_buf(BMv), l_buf(BMv), row_max_buf(BMv), alpha_buf(BMv), shift_buf(BMv);
  Buffer<int64_t> end_buf(BM), mask_row_buf(BM);
  Acc* qb = q_buf.get();
  Acc* s = s_buf.get();
  Acc* o = o_buf.get();
  Acc* m = m_buf.get();
  Acc* l = l_buf.get();
  Acc* row_max = row_max_buf.get();
  Acc* alpha = alpha_buf.get();
  Acc* shift = shift_buf.get();
  int64_t* end = end_buf.get();
  int64_t* mask_row = mask_row_buf.get();
  const vec_t<Acc> neg_inf = vbroadcast(kNegInf<Acc>);
  std::fill(row_max, row_max + BMv, kNegInf<Acc>);

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t c = task % a.n_chunks, rb = (task / a.n_chunks) % n_rblocks, pair = task / (a.n_chunks * n_rblocks);
    const int64_t b = pair / a.Hk, hk = pair % a.Hk;
    const int64_t r0 = rb * BM, rm = std::min(BM, M - r0);
    const int64_t n_b = a.seq_lens != nullptr ? a.seq_lens[b] : a.S;
    // this task's rows: query i of head hk * G + g for r = g * L + i; and the keys they may see
    int64_t key_end = 0;
    for (int64_t r = 0; r < rm; ++r) {
      const int64_t g = (r0 + r) / L, i = (r0 + r) % L, h = hk * G + g;
      end[r] = decode_key_end(a.causal, n_b, L, i);
      key_end = std::max(key_end, end[r]);
      mask_row[r] = b * ms[0] + h * ms[1] + i * ms[2];
      load_q(qb + r * Ep, q_all + b * a.q_strides[0] + h * a.q_strides[1] + i * a.q_strides[2], 0, 1, E, Ep, q_scale);
    }
    const int64_t j_begin = c * a.chunk, j_end = std::min(key_end, j_begin + a.chunk);
    std::fill(m, m + BMv, kNegInf<Acc>);
    std::fill(l, l + BMv, Acc(0));
    std::fill(o, o + rm * ldo, Acc(0));
    const In* k = k_all + b * a.k_strides[0] + hk * a.k_strides[1];
    const In* v = v_all + b * a.v_strides[0] + hk * a.v_strides[1];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += KB) {
      const int64_t jn = std::min(KB, j_end - j0), jv = round_up(jn, W);
      decode_scores<In, Acc>(rm, jn, E, qb, Ep, k + j0 * a.k_strides[2], a.k_strides[2], s, KB, kt, a.inference,
                             a.chunked_scores ? kSumChunk : 0);
      for (int64_t r = 0; r < rm; ++r) {
        row_max[r] = score_row<Acc>(s + r * KB, jv, std::min(jn, end[r] - j0), s_scale, a.mask_keep, mask_add,
                                    mask_row[r] + j0 * ms[3], ms[3]);
      }
      for (int64_t r = 0; r < rm; r += W) {
        const vec_t<Acc> m_old = vload(m + r);
        const vec_t<Acc> m_new = vmax<Acc>(m_old, vload(row_max + r));
        const vec_t<Acc> m_safe = m_new == neg_inf ? vec_t<Acc>{} : m_new;
        vstore(alpha + r, vexp_nonpositive<6>(m_old - m_safe));
        vstore(m + r, m_new);
        vstore(shift + r, m_safe);
      }
      for (int64_t r = 0; r < rm; ++r) {
        Acc* sr = s + r * KB;
        const vec_t<Acc> mv = vbroadcast(shift[r]);
        vec_t<Acc> sum{};
        for (int64_t col = 0; col < jv; col += W) {
          const vec_t<Acc> e = vexp_nonpositive<6>(vload(sr + col) - mv);
          sum += e;
          vstore(sr + col, e);
        }
        l[r] = l[r] * alpha[r] + vhsum(sum);
        if (alpha[r] != Acc(1)) {
          const vec_t<Acc> av = vbroadcast(alpha[r]);
          for (int64_t e = 0; e < ldo; e += W) vstore(o + r * ldo + e, vload(o + r * ldo + e) * av);
        }
      }
      decode_pv<In, Acc>(rm, jn, Ev, s, KB, v + j0 * a.v_strides[2], a.v_strides[2], o, ldo);
    }
    const int64_t part = (pair * n_rblocks + rb) * a.n_chunks + c;
    Acc* po = static_cast<Acc*>(a.part_o) + part * BM * Ev;
    Acc* pml = static_cast<Acc*>(a.part_ml) + part * BM * 2;
    for (int64_t r = 0; r < rm; ++r) {
      std::memcpy(po + r * Ev, o + r * ldo, Ev * sizeof(Acc));
      pml[2 * r] = m[r];
      pml[2 * r + 1] = l[r];
    }
  }
}

template <typename In>
void attention_decode_merge_impl(const AttentionDecodeArgs& a, int64_t row_begin, int64_t row_end) {
  using Acc = acc_t<In>;
  const int64_t L = a.L, G = a.Hq / a.Hk, M = G * L, BM = a.block_m, Ev = a.Ev;
  const int64_t n_rblocks = ceil_div(M, BM);
  const Acc* part_o = static_cast<const Acc*>(a.part_o);
  const Acc* part_ml = static_cast<const Acc*>(a.part_ml);
  In* out = static_cast<In*>(a.out);
  Acc* lse = static_cast<Acc*>(a.lse);
  Buffer<Acc> acc_buf(Ev);
  Acc* acc = acc_buf.get();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t bh = row / L, i = row % L, b = bh / a.Hq, h = bh % a.Hq;
    const int64_t r = (h % G) * L + i, pair = b * a.Hk + h / G;
    const int64_t first = (pair * n_rblocks + r / BM) * a.n_chunks, rr = r % BM;
    Acc mx = kNegInf<Acc>;
    for (int64_t c = 0; c < a.n_chunks; ++c) mx = std::max(mx, part_ml[((first + c) * BM + rr) * 2]);
    In* o = out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
    if (mx == kNegInf<Acc>) {  // no key to attend to: 0, and an infinite logsumexp
      for (int64_t e = 0; e < Ev; ++e) o[e] = Elem<In>::store(Acc(0));
      lse[row] = std::numeric_limits<Acc>::infinity();
      continue;
    }
    Acc sum = 0;
    std::fill(acc, acc + Ev, Acc(0));
    for (int64_t c = 0; c < a.n_chunks; ++c) {
      const Acc* ml = part_ml + ((first + c) * BM + rr) * 2;
      if (ml[0] == kNegInf<Acc>) continue;
      const Acc f = std::exp(ml[0] - mx);
      sum += f * ml[1];
      const Acc* po = part_o + ((first + c) * BM + rr) * Ev;
      for (int64_t e = 0; e < Ev; ++e) acc[e] += f * po[e];
    }
    lse[row] = mx + std::log(sum);
    for (int64_t e = 0; e < Ev; ++e) o[e] = Elem<In>::store(acc[e] / sum);
  }
}

void attention_decode(const AttentionDecodeArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return attention_decode_impl<float>(a, task_begin, task_end);
    case Scalar::kFloat64: return attention_decode_impl<double>(a, task_begin, task_end);
    case Scalar::kBFloat16: return attention_decode_impl<bf16_t>(a, task_begin, task_end);
    case Scalar::kFloat16: return attention_decode_impl<fp16_t>(a, task_begin, task_end);
  }
}

void attention_decode_merge(const AttentionDecodeArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case Scalar::kFloat32: return attention_decode_merge_impl<float>(a, row_begin, row_end);
    case Scalar::kFloat64: return attention_decode_merge_impl<double>(a, row_begin, row_end);
    case Scalar::kBFloat16: return attention_decode_merge_impl<bf16_t>(a, row_begin, row_end);
    case Scalar::kFloat16: return attention_decode_merge_impl<fp16_t>(a, row_begin, row_end);
  }
}

// ---- backward -----------------------------------------------------------------------------------

// The chunk that runs task t of n split into `chunks` ranges [n c / chunks, n (c + 1) / chunks).
inline int64_t chunk_of(int64_t t, int64_t n, int64_t chunks) { return ((t + 1) * chunks - 1) / n; }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Waits until *ticket == turn (the later chunks sharing the tile are done with it).
inline void wait_turn(const int32_t* ticket, int32_t turn) {
  for (int64_t spins = 0; __atomic_load_n(ticket, __ATOMIC_ACQUIRE) != turn; ++spins) {
    if (spins < 4096) cpu_relax();
    else sched_yield();
  }
}

template <typename In, typename Op>
void attention_bwd_impl(const AttentionBwdArgs& a, int64_t chunk) {
  using Acc = acc_t<In>;
  constexpr int64_t W = Vec<Acc>::kSize;
  // float operands (float32 tensors, or half ones on float tiles): P and dS serve as B operands as
  // they are, row-major; packed engines (bf16/fp16 VNNI) get them converted and packed
  constexpr bool kDirect = std::is_same_v<Op, Acc>;
  const MatmulEngine& eng = *a.engine;
  const int64_t BM = a.block_m, BN = a.block_n;
  const int64_t E = a.E, Ev = a.Ev, S = a.S, L = a.L;
  const int64_t Ep = round_up(E, eng.k_align), Evp = round_up(Ev, eng.k_align);
  const int64_t ldq = round_up(E, 16);            // dQ tile rows
  const int64_t BMp = round_up(BM, kKeyAlign);    // K of dV^T += dO^T P and dK^T += Q^T dS
  const int64_t n_ktiles = ceil_div(S, BN), n_qtiles = ceil_div(L, BM);
  const int64_t group = a.Hq / a.Hk;
  const int64_t tasks = a.B * a.Hk * n_ktiles;
  const int64_t t_begin = tasks * chunk / a.chunks, t_end = tasks * (chunk + 1) / a.chunks;
  if (t_begin >= t_end) return;
  const int64_t max_tiles = std::min(t_end - t_begin, n_ktiles);  // key tiles of one pair in this chunk
  // panel widths and the B operands' sizes
  const int64_t pw_keys = panel_width(eng, BN);   // K^T, V^T, P and dS: columns are the tile's keys
  const int64_t pw_e = panel_width(eng, E), pw_q = panel_width(eng, BM);
  const int64_t kt_tile = Ep * round_up(BN, pw_keys);    // K^T (E x BN), B of S = Q K^T
  const int64_t vt_tile = Evp * round_up(BN, pw_keys);   // V^T (Ev x BN), B of dP = dO V^T
  // K (BN x E), B of dQ = dS K: read in place from float tensors where the product reads exactly its
  // columns (oneDNN) or whole vectors of them (E a multiple of W), else packed
  const bool k_in_place =
      kDirect && std::is_same_v<In, Op> && a.k_strides[2] >= E && (eng.mm != nullptr || E % W == 0);
  const int64_t kp_tile = k_in_place ? 0 : BN * round_up(E, pw_e);
  const Acc scale = static_cast<Acc>(a.scale);
  const Acc q_scale = is_power_of_two(a.scale) ? scale : Acc(1), s_scale = scale / q_scale;
  // S: the forward's sums (score_chunk); dP and delta: chunked sums on the micro-kernel, and in float32
  // whatever the engine (kSumChunk)
  const int64_t s_chunk = score_chunk<Acc>(eng);
  const int64_t native_chunk = eng.mm == nullptr || std::is_same_v<In, float> ? kSumChunk : 0;
  const bool dropout = a.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const Acc keep_scale = static_cast<Acc>(1.0 / (1.0 - a.dropout_p));
  const int64_t* ms = a.mask_strides;
  const Acc* mask_add = static_cast<const Acc*>(a.mask_add);
  const In* q_all = static_cast<const In*>(a.q);
  const In* k_all = static_cast<const In*>(a.k);
  const In* v_all = static_cast<const In*>(a.v);
  const In* go_all = static_cast<const In*>(a.grad_out);
  const In* out_all = static_cast<const In*>(a.out);
  const Acc* lse_all = static_cast<const Acc*>(a.lse);
  const Acc* log_sum_all = static_cast<const Acc*>(a.log_sum);
  Acc* grad_q = static_cast<Acc*>(a.grad_q);
  Acc* row_sum = static_cast<Acc*>(a.row_sum);

  // per key tile of the chunk's range of one pair: the B operands, and dK^T, dV^T
  Buffer<Op> kt_buf(max_tiles * kt_tile), vt_buf(max_tiles * vt_tile), kp_buf(max_tiles * kp_tile);
  Buffer<Acc> dkt_buf(max_tiles * E * BN), dvt_buf(max_tiles * Ev * BN);
  Buffer<uint32_t> col_hash(max_tiles * BN);
  // per query tile: Q (load_q) and dO as A of S and of dP; Q^T and dO^T as A of dK^T and dV^T
  Buffer<Op> staging(std::max({Ep * pw_keys, Evp * pw_keys, BN * pw_e, Evp * pw_q}));
  Buffer<Op> qa_buf(BM * Ep), doa_buf(BM * Evp), qt_buf(E * BMp), dot_buf(Ev * BMp);
  Buffer<Op> ot_buf(Evp * round_up(BM, pw_q));  // O^T, B of delta = diag(dO O^T)
  // per (query tile, key tile): S then P, dP then dS, in Acc (rows past the tile: finite leftovers,
  // which meet zero columns of Q^T and dO^T); in Op and packed where the engine needs that
  Buffer<Acc> s_buf(BMp * BN), dp_buf(BMp * BN);
  Buffer<Op> p_op_buf(kDirect ? 1 : BMp * BN), ds_op_buf(kDirect ? 1 : BMp * BN);
  Buffer<Op> pp_buf(kDirect ? 1 : BMp * round_up(BN, pw_keys)), dsp_buf(kDirect ? 1 : BMp * round_up(BN, pw_keys));
  Buffer<Acc> dq_buf(BM * ldq), rs_buf(BM), delta_buf(BM);
  Op* kt = kt_buf.get();
  Op* vt = vt_buf.get();
  Op* kp = kp_buf.get();
  Acc* dkt = dkt_buf.get();
  Acc* dvt = dvt_buf.get();
  Op* qa = qa_buf.get();
  Op* doa = doa_buf.get();
  Op* qt = qt_buf.get();
  Op* dot = dot_buf.get();
  Acc* sp = s_buf.get();
  Acc* dp = dp_buf.get();
  Acc* dq = dq_buf.get();
  Acc* rs = rs_buf.get();
  Acc* delta = delta_buf.get();
  const Op op_zero = convert<Op>(Acc(0));
  std::fill(sp, sp + BMp * BN, Acc(0));
  std::fill(dp, dp + BMp * BN, Acc(0));
  if constexpr (!kDirect) {
    std::fill(p_op_buf.get(), p_op_buf.get() + BMp * BN, op_zero);
    std::fill(ds_op_buf.get(), ds_op_buf.get() + BMp * BN, op_zero);
  }
  // The B operand of dV^T += dO^T P (dK^T += Q^T dS): the Acc tile itself, row-major with ldb = BN, or
  // its Op copy packed in panels.
  auto b_operand = [&](const Acc* tile, Op* op_tile, Op* packed, int64_t kq, int64_t jn, int64_t& ldb,
                       int64_t& stride) -> const Op* {
    if constexpr (kDirect) {
      ldb = BN;
      stride = 0;
      (void)op_tile;
      (void)packed;
      (void)kq;
      (void)jn;
      return tile;
    } else {
      (void)tile;
      ldb = pw_keys;
      stride = kq * pw_keys;
      for (int64_t n0 = 0; n0 < jn; n0 += pw_keys) {
        eng.pack(kq, pw_keys, op_tile + n0, BN, packed + (n0 / pw_keys) * stride, pw_keys);
      }
      return packed;
    }
  };

  for (int64_t pair = t_begin / n_ktiles; pair * n_ktiles < t_end; ++pair) {
    const int64_t first = pair * n_ktiles;
    const int64_t u0 = std::max(t_begin, first) - first;
    const int64_t n_tiles = std::min(t_end, first + n_ktiles) - first - u0;
    // the chunks sharing this pair add into its dQ from the last chunk down: this one's turn
    const int32_t turn = static_cast<int32_t>(chunk_of(first + n_ktiles - 1, tasks, a.chunks) - chunk);
    const int64_t b = pair / a.Hk, hk = pair % a.Hk;
    const In* k = k_all + b * a.k_strides[0] + hk * a.k_strides[1];
    const In* v = v_all + b * a.v_strides[0] + hk * a.v_strides[1];
    // local tile t is key tile zigzag(u0 + t) of the pair: keys [tile_j0(t), tile_j0(t) + BN)
    auto tile_j0 = [&](int64_t t) { return zigzag(u0 + t, n_ktiles) * BN; };
    int64_t first_key = S;
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t j0 = tile_j0(t), jn = std::min(BN, S - j0);
      first_key = std::min(first_key, j0);
      pack_b(eng, E, jn, k + j0 * a.k_strides[2], 1, a.k_strides[2], Ep, pw_keys, kt + t * kt_tile, staging.get());
      pack_b(eng, Ev, jn, v + j0 * a.v_strides[2], 1, a.v_strides[2], Evp, pw_keys, vt + t * vt_tile, staging.get());
      if (!k_in_place) {
        pack_b(eng, jn, E, k + j0 * a.k_strides[2], a.k_strides[2], 1, BN, pw_e, kp + t * kp_tile, staging.get());
      }
    }
    std::fill(dkt, dkt + n_tiles * E * BN, Acc(0));
    std::fill(dvt, dvt + n_tiles * Ev * BN, Acc(0));

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t bh = b * a.Hq + h;
      const In* q = q_all + b * a.q_strides[0] + h * a.q_strides[1];
      const In* go = go_all + b * a.grad_out_strides[0] + h * a.grad_out_strides[1];
      const In* o = out_all + b * a.out_strides[0] + h * a.out_strides[1];
      const int64_t qs = a.q_strides[2], gos = a.grad_out_strides[2], os = a.out_strides[2];
      const DropoutKeys keys = dropout_keys(a.seed, a.dropout_bh_offset + bh);
      if (dropout) {
        for (int64_t t = 0; t < n_tiles; ++t) {
          const int64_t j0 = tile_j0(t), jn = std::min(BN, S - j0);
          for (int64_t j = 0; j < jn; ++j) col_hash.get()[t * BN + j] = dropout_col_hash<uint32_t>(keys, uint32_t(j0 + j));
        }
      }
      for (int64_t qt_i = 0; qt_i < n_qtiles; ++qt_i) {
        const int64_t i0 = qt_i * BM, im = std::min(BM, L - i0);
        const int64_t kq = round_up(im, kKeyAlign);
        // causal: query i sees keys j <= i; this tile's last query may see none of the chunk's keys
        const bool contributes = !a.is_causal || i0 + im - 1 >= first_key;
        if (contributes) {
          load_q(qa, q + i0 * qs, qs, im, E, Ep, q_scale);
          for (int64_t i = 0; i < im; ++i) {
            convert_row(doa + i * Evp, go + (i0 + i) * gos, Ev);
            for (int64_t e = Ev; e < Evp; ++e) doa[i * Evp + e] = op_zero;
          }
          // Q^T and dO^T (E x kq, Ev x kq), zero past the tile's queries
          for (int64_t e = 0; e < E; ++e) {
            for (int64_t i = 0; i < im; ++i) qt[e * BMp + i] = convert<Op>(q[(i0 + i) * qs + e]);
            for (int64_t i = im; i < kq; ++i) qt[e * BMp + i] = op_zero;
          }
          for (int64_t e = 0; e < Ev; ++e) {
            for (int64_t i = 0; i < im; ++i) dot[e * BMp + i] = convert<Op>(go[(i0 + i) * gos + e]);
            for (int64_t i = im; i < kq; ++i) dot[e * BMp + i] = op_zero;
          }
          // delta_i = dO_i . O_i, as the diagonal of dO O^T: summed in the order and with the rounding
          // of dP = dO V^T, so that a row with a single key (the first row of causal attention), where
          // O = V exactly, gets dP - delta, hence a gradient, of exactly 0, not a rounding residue.
          pack_b(eng, Ev, im, o + i0 * os, 1, os, Evp, pw_q, ot_buf.get(), staging.get());
          mm<Op, Acc>(eng, im, im, Ev, doa, Evp, ot_buf.get(), pw_q, Evp * pw_q, dp, BN, false, native_chunk);
          for (int64_t i = 0; i < im; ++i) delta[i] = dp[i * BN + i];
          std::fill(dq, dq + im * ldq, Acc(0));
          std::fill(rs, rs + im, Acc(0));
          const Acc* lse = lse_all + bh * L + i0;
          const Acc* log_sum = log_sum_all != nullptr ? log_sum_all + bh * L + i0 : nullptr;
          for (int64_t t = 0; t < n_tiles; ++t) {
            const int64_t j0 = tile_j0(t), jn = std::min(BN, S - j0);
            if (a.is_causal && j0 > i0 + im - 1) continue;
            const int64_t jv = round_up(jn, W), kjn = std::min(BN, round_up(jn, kKeyAlign));
            // P = exp(x - lse), or exp((x - m) - log l), x the scores as the forward had them
            mm<Op, Acc>(eng, im, jn, E, qa, Ep, kt + t * kt_tile, pw_keys, Ep * pw_keys, sp, BN, false, s_chunk);
            for (int64_t i = 0; i < im; ++i) {
              Acc* sr = sp + i * BN;
              const int64_t limit = a.is_causal ? std::min(jn, i0 + i - j0 + 1) : jn;
              score_row<Acc>(sr, jv, limit, s_scale, a.mask_keep, mask_add,
                             b * ms[0] + h * ms[1] + (i0 + i) * ms[2] + j0 * ms[3], ms[3]);
              const vec_t<Acc> shift = vbroadcast(lse[i]);
              const vec_t<Acc> shift2 = vbroadcast(log_sum != nullptr ? log_sum[i] : Acc(0));
              vec_t<Acc> p_sum{};
              for (int64_t c = 0; c < jv; c += W) {
                const vec_t<Acc> pv = vexp_nonpositive<kExpDegree<Op>>((vload(sr + c) - shift) - shift2);
                vstore(sr + c, pv);
                p_sum += pv;
              }
              rs[i] += vhsum(p_sum);
            }
            // dS = scale * P * (dO V^T - delta); with dropout, dS = scale * P * (dO V^T * D - delta) and
            // P becomes P * D for dV. Lanes past the tile's keys have P = 0, hence dS = 0: dp's lanes
            // there hold finite leftovers (the buffer starts zeroed), never NaN.
            mm<Op, Acc>(eng, im, jn, Ev, doa, Evp, vt + t * vt_tile, pw_keys, Evp * pw_keys, dp, BN, false, native_chunk);
            Op* p_op = p_op_buf.get();
            Op* ds_op = ds_op_buf.get();
            for (int64_t i = 0; i < im; ++i) {
              Acc* dr = dp + i * BN;
              Acc* pr = sp + i * BN;
              const vec_t<Acc> d = vbroadcast(delta[i]);
              if (dropout) {
                const dropout_bits_t<Acc> row =
                    broadcast_bits<Acc>(dropout_row_hash<uint32_t>(keys, uint32_t(i0 + i)));
                for (int64_t c = 0; c < jv; c += W) {
                  const dropout_bits_t<Acc> bits =
                      dropout_bits<dropout_bits_t<Acc>>(row, load_bits<Acc>(col_hash.get() + t * BN + c));
                  const vec_t<Acc> pv = vload(pr + c);
                  vstore(dr + c, pv * (apply_dropout<Acc>(vload(dr + c), bits, threshold, keep_scale) - d) * scale);
                  vstore(pr + c, apply_dropout<Acc>(pv, bits, threshold, keep_scale));
                }
              } else {
                for (int64_t c = 0; c < jv; c += W) vstore(dr + c, vload(pr + c) * (vload(dr + c) - d) * scale);
              }
              if constexpr (!kDirect) {
                for (int64_t c = 0; c < jv; c += W) {
                  store_lanes<Op, Acc>(p_op + i * BN + c, vload(pr + c));
                  store_lanes<Op, Acc>(ds_op + i * BN + c, vload(dr + c));
                }
                for (int64_t c = jv; c < kjn; ++c) p_op[i * BN + c] = ds_op[i * BN + c] = op_zero;
              }
            }
            int64_t ldb_p, stride_p, ldb_ds, stride_ds;
            const Op* pb = b_operand(sp, p_op, pp_buf.get(), kq, jn, ldb_p, stride_p);
            const Op* dsb = b_operand(dp, ds_op, dsp_buf.get(), kq, jn, ldb_ds, stride_ds);
            mm<Op, Acc>(eng, Ev, jn, kq, dot, BMp, pb, ldb_p, stride_p, dvt + t * Ev * BN, BN, true, 0);   // dV^T += dO^T P
            mm<Op, Acc>(eng, E, jn, kq, qt, BMp, dsb, ldb_ds, stride_ds, dkt + t * E * BN, BN, true, 0);  // dK^T += Q^T dS
            const Op* ds_a = kDirect ? reinterpret_cast<const Op*>(dp) : ds_op;
            if (k_in_place) {  // K = jn: the rows past the tile's keys may lie past the tensor
              const Op* kr = reinterpret_cast<const Op*>(k + j0 * a.k_strides[2]);
              mm<Op, Acc>(eng, im, E, jn, ds_a, BN, kr, a.k_strides[2], 0, dq, ldq, true, 0);  // dQ += dS K
            } else {
              mm<Op, Acc>(eng, im, E, kjn, ds_a, BN, kp + t * kp_tile, pw_e, BN * pw_e, dq, ldq, true, 0);
            }
          }
        }
        // this chunk's share of the tile's dQ rows and row sums, in turn
        int32_t* ticket = a.tickets + bh * n_qtiles + qt_i;
        wait_turn(ticket, turn);
        Acc* gq = grad_q + (bh * L + i0) * E;
        Acc* rsum = row_sum + bh * L + i0;
        if (turn == 0) {
          for (int64_t i = 0; i < im; ++i) {
            if (contributes) std::memcpy(gq + i * E, dq + i * ldq, E * sizeof(Acc));
            else std::fill(gq + i * E, gq + (i + 1) * E, Acc(0));
            rsum[i] = contributes ? rs[i] : Acc(0);
          }
        } else if (contributes) {
          for (int64_t i = 0; i < im; ++i) {
            for (int64_t e = 0; e < E; ++e) gq[i * E + e] += dq[i * ldq + e];
            rsum[i] += rs[i];
          }
        }
        __atomic_store_n(ticket, turn + 1, __ATOMIC_RELEASE);
      }
    }

    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t j0 = tile_j0(t), jn = std::min(BN, S - j0);
      In* gk = static_cast<In*>(a.grad_k) + (pair * S + j0) * E;
      In* gv = static_cast<In*>(a.grad_v) + (pair * S + j0) * Ev;
      const Acc* dk_t = dkt + t * E * BN;
      const Acc* dv_t = dvt + t * Ev * BN;
      for (int64_t j = 0; j < jn; ++j) {
        for (int64_t e = 0; e < E; ++e) gk[j * E + e] = Elem<In>::store(dk_t[e * BN + j]);
        for (int64_t e = 0; e < Ev; ++e) gv[j * Ev + e] = Elem<In>::store(dv_t[e * BN + j]);
      }
    }
  }
  if (eng.release != nullptr) eng.release();
}

// ---- dispatch on the tensors' dtype and the engine's operand type -------------------------------

void attention_fwd(const AttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const bool in_dtype = a.engine->operand != Scalar::kFloat32;
  switch (a.dtype) {
    case Scalar::kFloat32: return attention_fwd_impl<float, float>(a, task_begin, task_end);
    case Scalar::kFloat64: return attention_fwd_impl<double, double>(a, task_begin, task_end);
    case Scalar::kBFloat16:
      return in_dtype ? attention_fwd_impl<bf16_t, bf16_t>(a, task_begin, task_end)
                      : attention_fwd_impl<bf16_t, float>(a, task_begin, task_end);
    case Scalar::kFloat16:
      return in_dtype ? attention_fwd_impl<fp16_t, fp16_t>(a, task_begin, task_end)
                      : attention_fwd_impl<fp16_t, float>(a, task_begin, task_end);
  }
}

void attention_bwd(const AttentionBwdArgs& a, int64_t chunk) {
  const bool in_dtype = a.engine->operand != Scalar::kFloat32;
  switch (a.dtype) {
    case Scalar::kFloat32: return attention_bwd_impl<float, float>(a, chunk);
    case Scalar::kFloat64: return attention_bwd_impl<double, double>(a, chunk);
    case Scalar::kBFloat16:
      return in_dtype ? attention_bwd_impl<bf16_t, bf16_t>(a, chunk) : attention_bwd_impl<bf16_t, float>(a, chunk);
    case Scalar::kFloat16:
      return in_dtype ? attention_bwd_impl<fp16_t, fp16_t>(a, chunk) : attention_bwd_impl<fp16_t, float>(a, chunk);
  }
}

}  // namespace

FF_REGISTER_KERNEL(attention_fwd_stub, &attention_fwd);
FF_REGISTER_KERNEL(attention_decode_stub, &attention_decode);
FF_REGISTER_KERNEL(attention_decode_merge_stub, &attention_decode_merge);
FF_REGISTER_KERNEL(attention_bwd_stub, &attention_bwd);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
