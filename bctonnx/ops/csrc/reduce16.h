// Horizontal reductions of 16 AVX-512 vectors at once, shared by the row kernels (activation
// quantization, IntSoftmax, IntLayerNorm).
#pragma once

#include <array>
#include <cstdint>

#include "simd.h"

#define BCT_R16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace bct {

// Horizontal reductions of 16 vectors of 16 dwords at once (a transposed tree: 45 shuffles /
// ops instead of 16 separate reductions); lane j of the result reduces v[order[j]] (order:
// tree_inverse). `op` is an associative, commutative lane-wise operation (max, add).
template <class Op>
BCT_R16_TARGET __attribute__((always_inline)) inline __m512i tree16(const int32_t* p, Op op) {
  __m512i v[16], x[8], y[4], z[2];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(p + 16 * i);
  for (int i = 0; i < 8; ++i)
    x[i] = op(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0x44),
              _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = op(_mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], 0x88),
              _mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = op(_mm512_unpacklo_epi64(y[2 * i], y[2 * i + 1]), _mm512_unpackhi_epi64(y[2 * i], y[2 * i + 1]));
  const __m512 a = _mm512_castsi512_ps(z[0]), b = _mm512_castsi512_ps(z[1]);
  return op(_mm512_castps_si512(_mm512_shuffle_ps(a, b, 0x88)), _mm512_castps_si512(_mm512_shuffle_ps(a, b, 0xDD)));
}
struct MaxU32 {
  BCT_R16_TARGET __m512i operator()(__m512i a, __m512i b) const { return _mm512_max_epu32(a, b); }
};
struct AddI32 {
  BCT_R16_TARGET __m512i operator()(__m512i a, __m512i b) const { return _mm512_add_epi32(a, b); }
};

// Lane permutation putting tree16's result in vector order (lane j reduces v[j]); found once by
// running the tree on constant vectors.
struct TreeInverse {
  alignas(64) int32_t inv[16];
};
BCT_R16_TARGET inline TreeInverse make_tree_inverse() {
  std::array<int32_t, 256> v;
  for (int i = 0; i < 256; ++i) v[i] = i / 16;
  alignas(64) int32_t order[16];
  _mm512_store_si512(order, tree16(v.data(), MaxU32{}));
  TreeInverse t{};
  for (int j = 0; j < 16; ++j) t.inv[order[j]] = j;
  return t;
}
inline const TreeInverse& tree_inverse() {
  static const TreeInverse t = make_tree_inverse();
  return t;
}

}  // namespace bct
