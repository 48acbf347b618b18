// Attention forward and backward, FlashAttention-2 style; compiled once per CPU capability.
//
// Forward, one task per (batch, head, query tile of block_m rows): stream key tiles of block_n keys
// with an online softmax (running max m, running sum l, accumulator rescaled by exp(m_old - m_new)),
// then write out = acc / l and lse = m + log l. Tiles are held transposed, queries in the vector
// lanes: S^T = K Q^T and O^T += V^T P^T are broadcast-FMA products that read K and V in place, and
// the softmax's row max and row sum are lane-wise, with no horizontal reduction.
//
// Backward, one task per (batch, kv head, key tile): keys in the lanes. It recomputes
// P = exp(scale * Q K^T + mask - lse) for every query tile of every query head of its group, and
//   dV^T += dO^T P,  dP = dO V^T,  dS = scale * P * (dP - delta),  dK^T += Q^T dS,  dQ += dS K,
// owning its rows of dK and dV; dQ rows are shared between the key tiles (see AttentionBwdFn).
//
// Dropout (kernels/dropout.h) acts on P after the softmax: the forward sums the un-dropped P into l
// (the logsumexp is the ordinary one) and multiplies P^T by D = M / (1 - p) before O^T += V^T P^T, so
// O = (P * D) V. The backward draws M again and, with dP~ = dO V^T the gradient of P * D,
//   dV^T += dO^T (P * D),  dP = dP~ * D,  dS = scale * P * (dP - delta),
// where delta = rowsum(P * dP) = rowsum((P * D) * dP~) = rowsum(dO * O), O being the dropped output:
// the delta pass is unchanged.
//
// P's rows hold exp(lse_true - lse) instead of 1 in total, where lse is the float32 logsumexp: off by
// up to half an ulp of lse, i.e. 2^-21 relative for |lse| in [8, 16), several times the rounding of the
// float32 reference's own softmax. That common factor of a row passes unchanged into dQ's row, so the
// tasks also sum P's rows and the caller divides dQ by them: dQ then uses exactly normalised rows.
// (dK and dV mix many rows, whose factors do not line up, and stay as they are.)
#include "cpu/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "cpu/kernels/dropout.h"
#include "cpu/kernels/vec.h"

namespace fusedformer {
namespace cpu {
namespace FF_CPU_CAPABILITY {
namespace {

// Register blocking of the micro-kernel, kRows broadcast rows x kVecs vectors of accumulators, sized
// to the register file: a 64-byte Vec is one zmm with AVX-512 (32 registers), two ymm with AVX2 (16)
// and four xmm in the baseline build (16).
#if FF_CPU_CAPABILITY_INDEX == 2
constexpr int kRows = 4;
constexpr int kVecs = 4;
#elif FF_CPU_CAPABILITY_INDEX == 1
constexpr int kRows = 2;
constexpr int kVecs = 2;
#else
constexpr int kRows = 2;
constexpr int kVecs = 1;
#endif

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

// 0, n-1, 1, n-2, ...: consecutive tasks pair a long causal tile with a short one, so that the
// contiguous task ranges of the threads get about equal work.
inline int64_t zigzag(int64_t u, int64_t n) { return u % 2 == 0 ? u / 2 : n - 1 - u / 2; }

template <typename T>
inline vec_t<T> viota() {
  vec_t<T> v;
  for (int i = 0; i < Vec<T>::kSize; ++i) v[i] = T(i);
  return v;
}

// C[r, :] = (C[r, :] * col_scale if accumulate) + sum_k A[r, k] * B[k, :] for R rows and NV vectors
// of columns, where A[r, k] = a[r * a_rs + k * a_ks] is broadcast and row k of B is b + k * ldb.
// col_scale (or nullptr) is the online softmax's rescale of the accumulator, fused in.
// The sum runs in chunks of k_chunk terms, each from zero and then added to C: summed tile by tile,
// long accumulations (over S keys in the forward, L queries in the backward) round about as a blocked
// GEMM does, and short chunks make the dot products below (see kSumChunk) as exact as the reference's.
template <typename T, int R, int NV>
void micro_kernel(int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb, T* c,
                  int64_t ldc, bool accumulate, const T* col_scale, int64_t k_chunk) {
  constexpr int W = Vec<T>::kSize;
  int64_t k0 = 0;
  do {  // at least once: K = 0 still stores C
    const int64_t k1 = std::min(K, k0 + k_chunk);
    vec_t<T> acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vec_t<T>{};
    }
    for (int64_t k = k0; k < k1; ++k) {
      vec_t<T> bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vec_t<T> av = vbroadcast(a[r * a_rs + k * a_ks]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
    }
    if (accumulate || k0 > 0) {
      const bool scaled = k0 == 0 && col_scale != nullptr;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const vec_t<T> s = scaled ? vload(col_scale + v * W) : vbroadcast(T(1));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][v] += vload(c + r * ldc + v * W) * s;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * W, acc[r][v]);
    }
    k0 = k1;
  } while (k0 < K);
}

template <typename T>
using MicroKernel = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool,
                             const T*, int64_t);

// The micro-kernel for a block of r <= R rows and nv <= NV vectors.
template <typename T, int R, int NV>
MicroKernel<T> micro_kernel_for(int64_t r, int64_t nv) {
  if constexpr (R > 1) {
    if (r < R) return micro_kernel_for<T, R - 1, NV>(r, nv);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return micro_kernel_for<T, R, NV - 1>(r, nv);
  }
  return &micro_kernel<T, R, NV>;
}

// C (M rows x nvec vectors, row stride ldc) = [C * col_scale +] A (M x K) B (K x nvec vectors), with A
// and B addressed as in micro_kernel. B's panel of kVecs vectors stays in L1 across the row blocks.
template <typename T>
void gemm(int64_t M, int64_t nvec, int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b,
          int64_t ldb, T* c, int64_t ldc, bool accumulate, const T* col_scale = nullptr,
          int64_t k_chunk = 0) {
  constexpr int64_t W = Vec<T>::kSize;
  if (k_chunk <= 0) k_chunk = std::max<int64_t>(K, 1);
  for (int64_t v0 = 0; v0 < nvec; v0 += kVecs) {
    const int64_t nv = std::min<int64_t>(kVecs, nvec - v0);
    const T* cs = col_scale != nullptr ? col_scale + v0 * W : nullptr;
    const MicroKernel<T> full = micro_kernel_for<T, kRows, kVecs>(kRows, nv);
    int64_t r0 = 0;
    for (; r0 + kRows <= M; r0 += kRows) {
      full(K, a + r0 * a_rs, a_rs, a_ks, b + v0 * W, ldb, c + r0 * ldc + v0 * W, ldc, accumulate, cs,
           k_chunk);
    }
    if (r0 < M) {
      micro_kernel_for<T, kRows, kVecs>(M - r0, nv)(K, a + r0 * a_rs, a_rs, a_ks, b + v0 * W, ldb,
                                                    c + r0 * ldc + v0 * W, ldc, accumulate, cs, k_chunk);
    }
  }
}

// The products whose result goes through a softmax or a cancellation, S = Q K^T (K = E) and
// dP = dO V^T (K = Ev; dP - delta cancels to the small dS where a row has few keys), are summed in
// chunks of kSumChunk terms. One chain of E fused multiply-adds rounds measurably worse than the
// float32 reference's GEMMs and dot products (up to 2-3x on single rows), and these products' rounding
// goes straight to the output and the gradients.
constexpr int64_t kSumChunk = 8;

// The mask's contribution to W lanes of scores: lane l reads element off + l * lane_stride of the
// mask (0 or -inf for a bool mask). Lanes >= n are never read; their value is unspecified.
template <typename T>
inline vec_t<T> mask_bias(const bool* keep, const T* add, int64_t off, int64_t lane_stride, int64_t n) {
  constexpr int64_t W = Vec<T>::kSize;
  if (lane_stride == 0) return vbroadcast(keep != nullptr ? (keep[off] ? T(0) : kNegInf<T>) : add[off]);
  if (add != nullptr && lane_stride == 1 && n == W) return vload(add + off);
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
  typedef uint32_t bits __attribute__((vector_size(64)));
  typedef int32_t mask __attribute__((vector_size(64)));
};
template <>
struct DropoutLanes<double> {
  typedef uint32_t bits __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(64)));
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

template <typename T>
void attention_fwd(const AttentionFwdArgs<T>& a, int64_t task_begin, int64_t task_end) {
  constexpr int64_t W = Vec<T>::kSize;
  const int64_t BM = a.block_m, BN = a.block_n;
  const int64_t E = a.E, Ev = a.Ev;
  const int64_t n_qtiles = ceil_div(a.L, BM);
  const int64_t group = a.Hq / a.Hk;
  const bool has_mask = a.mask_keep != nullptr || a.mask_add != nullptr;
  const bool lse_only = a.log_sum != nullptr;
  const int64_t* ms = a.mask_strides;
  const T scale = static_cast<T>(a.scale);
  const vec_t<T> iota = viota<T>();
  const vec_t<T> neg_inf = vbroadcast(kNegInf<T>);
  const vec_t<T> zero = vbroadcast(T(0));
  const bool dropout = a.dropout_p > 0.0 && !lse_only;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const T keep_scale = static_cast<T>(1.0 / (1.0 - a.dropout_p));

  Buffer<T> qt_buf(E * BM);    // Q^T tile (E, BM), zero-padded lanes
  Buffer<uint32_t> row_hash_buf(BM);  // dropout: the tile's queries' row hashes A_i, by lane
  uint32_t* row_hash = row_hash_buf.get();
  Buffer<T> st_buf(BN * BM);   // S^T then P^T tile (BN, BM)
  Buffer<T> ot_buf(Ev * BM);   // unnormalised O^T (Ev, BM)
  Buffer<T> m_buf(BM), l_buf(BM), alpha_buf(BM);
  T* qt = qt_buf.get();
  T* st = st_buf.get();
  T* ot = ot_buf.get();
  T* m = m_buf.get();
  T* l = l_buf.get();
  T* alpha = alpha_buf.get();

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / n_qtiles;
    const int64_t b = bh / a.Hq, h = bh % a.Hq, hk = h / group;
    const int64_t i0 = zigzag(task % n_qtiles, n_qtiles) * BM;
    const int64_t im = std::min(BM, a.L - i0);
    const int64_t nvq = ceil_div(im, W);  // lane vectors holding real queries
    const T* q = a.q + b * a.q_strides[0] + h * a.q_strides[1] + i0 * a.q_strides[2];
    const T* k = a.k + b * a.k_strides[0] + hk * a.k_strides[1];
    const T* v = a.v + b * a.v_strides[0] + hk * a.v_strides[1];
    const int64_t mask_off = b * ms[0] + h * ms[1] + i0 * ms[2];

    for (int64_t i = 0; i < nvq * W; ++i) {
      for (int64_t e = 0; e < E; ++e) qt[e * BM + i] = i < im ? q[i * a.q_strides[2] + e] : T(0);
    }
    std::fill(m, m + BM, kNegInf<T>);
    std::fill(l, l + BM, T(0));
    if (!lse_only) std::fill(ot, ot + Ev * BM, T(0));
    const DropoutKeys keys = dropout_keys(a.seed, bh);
    if (dropout) {
      for (int64_t i = 0; i < nvq * W; ++i) row_hash[i] = dropout_row_hash<uint32_t>(keys, uint32_t(i0 + i));
    }

    // causal: query i sees keys j <= i, so this tile needs keys j < i0 + im only
    const int64_t j_end = a.is_causal ? std::min(a.S, i0 + im) : a.S;
    for (int64_t j0 = 0; j0 < j_end; j0 += BN) {
      const int64_t jn = std::min(BN, j_end - j0);
      gemm<T>(jn, nvq, E, k + j0 * a.k_strides[2], a.k_strides[2], 1, qt, BM, st, BM, false, nullptr,
              kSumChunk);
      // only tiles crossing the diagonal have a key j > query i
      const bool diagonal = a.is_causal && j0 + jn - 1 > i0;
      for (int64_t c = 0; c < nvq; ++c) {
        vec_t<T> tile_max = neg_inf;
        for (int64_t j = 0; j < jn; ++j) {
          T* p = st + j * BM + c * W;
          vec_t<T> x = vload(p) * scale;
          if (has_mask) {
            x += mask_bias<T>(a.mask_keep, a.mask_add, mask_off + c * W * ms[2] + (j0 + j) * ms[3], ms[2],
                              std::min(W, im - c * W));
          }
          if (diagonal) {  // lane l is query i0 + cW + l: masked when it precedes key j0 + j
            x = iota < T(std::clamp<int64_t>(j0 + j - i0 - c * W, 0, W)) ? neg_inf : x;
          }
          vstore(p, x);
          tile_max = vmax<T>(tile_max, x);
        }
        const vec_t<T> m_old = vload(m + c * W);
        const vec_t<T> m_new = vmax<T>(m_old, tile_max);
        // a row that has seen only -inf keeps m = -inf; subtracting 0 instead gives p = 0, not NaN
        const vec_t<T> m_safe = m_new == neg_inf ? zero : m_new;
        const vec_t<T> rescale = vexp(m_old - m_safe);
        vec_t<T> sum = zero;
        if (dropout) {  // l sums P; P^T V sees P * M / (1 - p)
          const dropout_bits_t<T> row = load_bits<T>(row_hash + c * W);
          for (int64_t j = 0; j < jn; ++j) {
            T* p = st + j * BM + c * W;
            const vec_t<T> e = vexp(vload(p) - m_safe);
            sum += e;
            const uint32_t col = dropout_col_hash<uint32_t>(keys, uint32_t(j0 + j));
            vstore(p, apply_dropout<T>(e, dropout_bits<dropout_bits_t<T>>(row, broadcast_bits<T>(col)),
                                       threshold, keep_scale));
          }
        } else {
          for (int64_t j = 0; j < jn; ++j) {
            T* p = st + j * BM + c * W;
            const vec_t<T> e = vexp(vload(p) - m_safe);
            vstore(p, e);
            sum += e;
          }
        }
        vstore(l + c * W, vload(l + c * W) * rescale + sum);
        vstore(m + c * W, m_new);
        vstore(alpha + c * W, rescale);
      }
      if (!lse_only) {
        gemm<T>(Ev, nvq, jn, v + j0 * a.v_strides[2], 1, a.v_strides[2], st, BM, ot, BM, true, alpha);
      }
    }

    T* lse = a.lse + bh * a.L + i0;
    if (lse_only) {
      for (int64_t i = 0; i < im; ++i) {
        lse[i] = l[i] > T(0) ? m[i] : std::numeric_limits<T>::infinity();
        a.log_sum[bh * a.L + i0 + i] = l[i] > T(0) ? std::log(l[i]) : T(0);
      }
      continue;
    }
    T* out = a.out + (bh * a.L + i0) * Ev;
    for (int64_t i = 0; i < im; ++i) {
      lse[i] = l[i] > T(0) ? m[i] + std::log(l[i]) : std::numeric_limits<T>::infinity();
      // a row with no key to attend to outputs 0
      const T li = l[i] > T(0) ? l[i] : T(1);
      for (int64_t e = 0; e < Ev; ++e) out[i * Ev + e] = ot[e * BM + i] / li;
    }
  }
}

// a * b + c, rounded as micro_kernel's vector multiply-add is: the compiler fuses that one wherever
// the build has FMA instructions, and has none to fuse with in the baseline build.
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// delta_i = sum_e dO[i, e] O[i, e], summed in the order and with the rounding of a lane of
// dP = dO V^T in micro_kernel: a row with a single key (the first row of causal attention) has O = V
// exactly, so dP - delta, hence its gradient, comes out exactly 0, not a rounding residue.
template <typename T>
void attention_bwd_delta(const AttentionBwdArgs<T>& a, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t bh = r / a.L, i = r % a.L, b = bh / a.Hq, h = bh % a.Hq;
    const int64_t* gs = a.grad_out_strides;
    const T* go = a.grad_out + b * gs[0] + h * gs[1] + i * gs[2];
    const T* o = a.out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
    T d = 0;
    for (int64_t e0 = 0; e0 < a.Ev; e0 += kSumChunk) {
      T part = 0;
      for (int64_t e = e0; e < std::min(a.Ev, e0 + kSumChunk); ++e) part = mul_add(go[e], o[e], part);
      d = e0 == 0 ? part : part + d;
    }
    a.delta[r] = d;
  }
}

template <typename T>
void attention_bwd(const AttentionBwdArgs<T>& a, int64_t task_begin, int64_t task_end, T* shared_grad_q,
                   T* shared_row_sum) {
  constexpr int64_t W = Vec<T>::kSize;
  const int64_t BM = a.block_m, BN = a.block_n;
  const int64_t E = a.E, Ev = a.Ev;
  const int64_t Ep = ceil_div(E, W) * W;
  const int64_t n_ktiles = ceil_div(a.S, BN);
  const int64_t group = a.Hq / a.Hk;
  const bool has_mask = a.mask_keep != nullptr || a.mask_add != nullptr;
  const int64_t* ms = a.mask_strides;
  const int64_t qs = a.q_strides[2], dos = a.grad_out_strides[2];
  const T scale = static_cast<T>(a.scale);
  const vec_t<T> iota = viota<T>();
  const vec_t<T> neg_inf = vbroadcast(kNegInf<T>);
  const bool dropout = a.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const T keep_scale = static_cast<T>(1.0 / (1.0 - a.dropout_p));

  Buffer<T> kt_buf(E * BN);    // K^T tile (E, BN), zero-padded lanes
  Buffer<uint32_t> col_hash_buf(BN);  // dropout: the tile's keys' hashes C_j, by lane
  uint32_t* col_hash = col_hash_buf.get();
  Buffer<T> vt_buf(Ev * BN);   // V^T tile (Ev, BN)
  Buffer<T> kp_buf(BN * Ep);   // K tile (BN, Ep), zero-padded columns
  Buffer<T> dkt_buf(E * BN);   // dK^T accumulator (E, BN)
  Buffer<T> dvt_buf(Ev * BN);  // dV^T accumulator (Ev, BN)
  Buffer<T> p_buf(BM * BN);    // P tile (BM, BN)
  Buffer<T> ds_buf(BM * BN);   // dP then dS tile (BM, BN)
  Buffer<T> dq_buf(BM * Ep);   // this tile's dQ (BM, Ep)
  T* kt = kt_buf.get();
  T* vt = vt_buf.get();
  T* kp = kp_buf.get();
  T* dkt = dkt_buf.get();
  T* dvt = dvt_buf.get();
  T* p = p_buf.get();
  T* ds = ds_buf.get();
  T* dq = dq_buf.get();

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bhk = task / n_ktiles;
    const int64_t b = bhk / a.Hk, hk = bhk % a.Hk;
    // this pair's rows of grad_q and row_sum, for its group of query heads (see AttentionBwdFn)
    const bool shared = bhk == task_begin / n_ktiles && task_begin % n_ktiles != 0;
    T* gq_pair = shared ? shared_grad_q : a.grad_q + bhk * group * a.L * E;
    T* row_sum_pair = shared ? shared_row_sum : a.row_sum + bhk * group * a.L;
    if (task == task_begin || task % n_ktiles == 0) {  // the call's first task of this pair
      std::fill(gq_pair, gq_pair + group * a.L * E, T(0));
      std::fill(row_sum_pair, row_sum_pair + group * a.L, T(0));
    }
    const int64_t j0 = zigzag(task % n_ktiles, n_ktiles) * BN;
    const int64_t jn = std::min(BN, a.S - j0);
    const int64_t nvk = ceil_div(jn, W);  // lane vectors holding real keys
    const int64_t lanes = nvk * W;
    const T* k = a.k + b * a.k_strides[0] + hk * a.k_strides[1] + j0 * a.k_strides[2];
    const T* v = a.v + b * a.v_strides[0] + hk * a.v_strides[1] + j0 * a.v_strides[2];

    for (int64_t j = 0; j < lanes; ++j) {
      const T* kr = k + j * a.k_strides[2];
      const T* vr = v + j * a.v_strides[2];
      for (int64_t e = 0; e < E; ++e) kt[e * BN + j] = j < jn ? kr[e] : T(0);
      for (int64_t e = 0; e < Ev; ++e) vt[e * BN + j] = j < jn ? vr[e] : T(0);
      for (int64_t e = 0; e < Ep; ++e) kp[j * Ep + e] = j < jn && e < E ? kr[e] : T(0);
    }
    std::fill(dkt, dkt + E * BN, T(0));
    std::fill(dvt, dvt + Ev * BN, T(0));

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t bh = b * a.Hq + h;
      const T* q = a.q + b * a.q_strides[0] + h * a.q_strides[1];
      const T* go = a.grad_out + b * a.grad_out_strides[0] + h * a.grad_out_strides[1];
      const T* lse = a.lse + bh * a.L;
      const T* log_sum = a.log_sum != nullptr ? a.log_sum + bh * a.L : nullptr;
      const T* delta = a.delta + bh * a.L;
      T* gq = gq_pair + (h - hk * group) * a.L * E;
      T* row_sum = row_sum_pair + (h - hk * group) * a.L;
      const int64_t mask_off = b * ms[0] + h * ms[1] + j0 * ms[3];
      const DropoutKeys keys = dropout_keys(a.seed, bh);
      if (dropout) {
        for (int64_t j = 0; j < lanes; ++j) col_hash[j] = dropout_col_hash<uint32_t>(keys, uint32_t(j0 + j));
      }
      // causal: queries i < j0 see none of these keys
      const int64_t i_begin = a.is_causal ? j0 / BM * BM : 0;
      for (int64_t i0 = i_begin; i0 < a.L; i0 += BM) {
        const int64_t im = std::min(BM, a.L - i0);
        const T* qi = q + i0 * qs;
        const T* goi = go + i0 * dos;
        // P = exp(scale * Q K^T + mask - lse), or exp((... - m) - log l)
        gemm<T>(im, nvk, E, qi, qs, 1, kt, BN, p, BN, false, nullptr, kSumChunk);
        for (int64_t i = 0; i < im; ++i) {
          const T lse_i = lse[i0 + i];
          const T log_sum_i = log_sum != nullptr ? log_sum[i0 + i] : T(0);
          vec_t<T> p_sum{};
          for (int64_t c = 0; c < nvk; ++c) {
            T* pr = p + i * BN + c * W;
            // lanes >= limit are masked: past the tile's keys or, causal, after query i0 + i
            int64_t limit = jn - c * W;
            if (a.is_causal) limit = std::min(limit, i0 + i - j0 - c * W + 1);
            vec_t<T> x = vload(pr) * scale;
            if (has_mask && limit > 0) {
              x += mask_bias<T>(a.mask_keep, a.mask_add, mask_off + (i0 + i) * ms[2] + c * W * ms[3], ms[3],
                                std::min(W, limit));
            }
            if (limit < W) x = iota < T(std::max<int64_t>(limit, 0)) ? x : neg_inf;
            const vec_t<T> pv = vexp((x - lse_i) - log_sum_i);
            vstore(pr, pv);
            p_sum += pv;
          }
          row_sum[i0 + i] += vsum<T>(p_sum);
        }
        // dS = scale * P * (dO V^T - delta); with dropout, dS = scale * P * (dO V^T * D - delta) and
        // P becomes P * D for dV
        gemm<T>(im, nvk, Ev, goi, dos, 1, vt, BN, ds, BN, false, nullptr, kSumChunk);
        for (int64_t i = 0; i < im; ++i) {
          const T d = delta[i0 + i];
          if (dropout) {
            const dropout_bits_t<T> row =
                broadcast_bits<T>(dropout_row_hash<uint32_t>(keys, uint32_t(i0 + i)));
            for (int64_t c = 0; c < nvk; ++c) {
              T* dr = ds + i * BN + c * W;
              T* pr = p + i * BN + c * W;
              const dropout_bits_t<T> bits = dropout_bits<dropout_bits_t<T>>(row, load_bits<T>(col_hash + c * W));
              const vec_t<T> pv = vload(pr);
              vstore(dr, pv * (apply_dropout<T>(vload(dr), bits, threshold, keep_scale) - d) * scale);
              vstore(pr, apply_dropout<T>(pv, bits, threshold, keep_scale));
            }
          } else {
            for (int64_t c = 0; c < nvk; ++c) {
              T* dr = ds + i * BN + c * W;
              vstore(dr, vload(p + i * BN + c * W) * (vload(dr) - d) * scale);
            }
          }
        }
        gemm<T>(Ev, nvk, im, goi, 1, dos, p, BN, dvt, BN, true);  // dV^T += dO^T P (P * D with dropout)
        gemm<T>(E, nvk, im, qi, 1, qs, ds, BN, dkt, BN, true);    // dK^T += Q^T dS
        gemm<T>(im, Ep / W, jn, ds, BN, 1, kp, Ep, dq, Ep, false);  // dQ = dS K
        for (int64_t i = 0; i < im; ++i) {
          T* g = gq + (i0 + i) * E;
          const T* t = dq + i * Ep;
          for (int64_t e = 0; e < E; ++e) g[e] += t[e];
        }
      }
    }

    T* gk = a.grad_k + (bhk * a.S + j0) * E;
    T* gv = a.grad_v + (bhk * a.S + j0) * Ev;
    for (int64_t j = 0; j < jn; ++j) {
      for (int64_t e = 0; e < E; ++e) gk[j * E + e] = dkt[e * BN + j];
      for (int64_t e = 0; e < Ev; ++e) gv[j * Ev + e] = dvt[e * BN + j];
    }
  }
}

}  // namespace

FF_REGISTER_KERNEL(attention_fwd_f32_stub, &attention_fwd<float>);
FF_REGISTER_KERNEL(attention_fwd_f64_stub, &attention_fwd<double>);
FF_REGISTER_KERNEL(attention_bwd_delta_f32_stub, &attention_bwd_delta<float>);
FF_REGISTER_KERNEL(attention_bwd_delta_f64_stub, &attention_bwd_delta<double>);
FF_REGISTER_KERNEL(attention_bwd_f32_stub, &attention_bwd<float>);
FF_REGISTER_KERNEL(attention_bwd_f64_stub, &attention_bwd<double>);

}  // namespace FF_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedformer
