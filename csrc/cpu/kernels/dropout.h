// Attention dropout's counter-based random mask: keep(seed, bh, i, j), for query row i and key j of
// (batch, query head) pair bh = b * Hq + h, is a pure function of its arguments. The forward draws it
// tile by tile, the backward draws it again instead of storing it, and fusedformer::attention_dropout_mask
// (the tests' dense copy) draws it element by element, all with the functions below.
//
//   (row_key, col_key) = the two 32-bit halves of splitmix64(seed + golden * (bh + 1))     per pair
//   A_i = fmix32(row_key + i),  C_j = fmix32(col_key + j)                                   per row / key
//   u   = fmix32(A_i ^ C_j),    keep = u >= threshold = round(p * 2^32)                     per element
//
// fmix32 is MurmurHash3's finaliser, a bijection of uint32 with full avalanche. A_i and C_j are
// bijections of i and j, so no two keys of one row (or rows of one key) share an input, and each tile
// precomputes the vector of its lanes' A_i (forward: queries in the lanes) or C_j (backward: keys in the
// lanes) once: per element the cost is one xor, one fmix32 (two 32-bit multiplies, three shift-xors),
// one compare. The same templates take a uint32_t or a GCC vector of uint32 lanes.
//
// The residual add + norm ops (fusedformer::add_layer_norm_fwd, add_rms_norm_fwd) drop their input with
// the same hash, the (rows, cols) input taking the place of one (L, S) score matrix per 2^32 rows:
// keep(seed, r, c) = keep(keys of pair r >> 32, row r mod 2^32, column c) (add_norm_dropout_keep).
//
// Everything here has internal linkage (the unnamed namespace): the kernel sources are compiled once
// per CPU capability and the glue once more, and a shared inline instantiation on vector types would
// let the linker pick, say, the AVX-512 one for every build.
#pragma once

#include <cstdint>

namespace fusedformer {
namespace cpu {
namespace {

struct DropoutKeys {
  uint32_t row_key;
  uint32_t col_key;
};

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline DropoutKeys dropout_keys(int64_t seed, int64_t bh) {
  const uint64_t z = splitmix64(static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(bh + 1));
  return {static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
}

template <typename U>
inline U fmix32(U x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Elements with u >= threshold are kept: a fraction 1 - p of them (to within 2^-32).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

template <typename U>
inline U dropout_row_hash(const DropoutKeys& k, U i) {
  return fmix32<U>(i + k.row_key);
}

template <typename U>
inline U dropout_col_hash(const DropoutKeys& k, U j) {
  return fmix32<U>(j + k.col_key);
}

// u for row hash a and key hash c; the element is kept when u >= dropout_threshold(p).
template <typename U>
inline U dropout_bits(U a, U c) {
  return fmix32<U>(a ^ c);
}

inline bool dropout_keep(const DropoutKeys& k, uint32_t threshold, int64_t i, int64_t j) {
  return dropout_bits<uint32_t>(dropout_row_hash<uint32_t>(k, static_cast<uint32_t>(i)),
                                dropout_col_hash<uint32_t>(k, static_cast<uint32_t>(j))) >= threshold;
}

// Whether element (r, c) of an add + norm's input is kept, for row r's keys dropout_keys(seed, r >> 32)
// and row hash a = dropout_row_hash(keys, uint32(r)).
inline bool add_norm_dropout_keep(const DropoutKeys& k, uint32_t a, uint32_t threshold, int64_t c) {
  return dropout_bits<uint32_t>(a, dropout_col_hash<uint32_t>(k, static_cast<uint32_t>(c))) >= threshold;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedformer
