// Horizontal reductions of one AVX2 vector (8 dwords, or 16 bytes), shared by the AVX2 row
// kernels (IntSoftmax, IntLayerNorm); reduce16.h has the AVX-512 ones, 16 vectors at once.
#pragma once

#include <cstdint>

#include "simd.h"

#define BCT_R8_TARGET __attribute__((target("avx2")))

namespace bct {

// Sum of the 8 int32 lanes (wrapping like the lanes).
BCT_R8_TARGET __attribute__((always_inline)) inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_srli_si128(s, 8));
  s = _mm_add_epi32(s, _mm_srli_si128(s, 4));
  return _mm_cvtsi128_si32(s);
}

// Largest of the 8 uint32 lanes.
BCT_R8_TARGET __attribute__((always_inline)) inline uint32_t hmax8_epu32(__m256i v) {
  __m128i s = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_max_epu32(s, _mm_srli_si128(s, 8));
  s = _mm_max_epu32(s, _mm_srli_si128(s, 4));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

// Largest of the 16 int8 lanes.
BCT_R8_TARGET __attribute__((always_inline)) inline int hmax16_epi8(__m128i m) {
  m = _mm_max_epi8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epi8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epi8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epi8(m, _mm_srli_si128(m, 1));
  return static_cast<int8_t>(_mm_cvtsi128_si32(m) & 0xFF);
}

}  // namespace bct
