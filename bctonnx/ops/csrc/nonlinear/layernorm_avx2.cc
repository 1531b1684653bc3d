// IntLayerNorm's row kernel for AVX2 (no AVX-512): steps 1-5 of ref_nonlinear.int_layernorm,
// the same bits as the portable and AVX-512 kernels (layernorm.cc). Block sizes: multiples of
// 16; other block sizes use the portable kernel, and so does a row with a block more than 16
// exponents below its largest (its codes are rounded onto the grid: rare, scalar).
//
// Per row: the sums of step 2 by vpmaddwd (16 codes per instruction, per block, shifted onto
// the common grid in int64); the row constants (scalar helpers of layernorm_steps.h); steps 4-5
// 8 int32 lanes at a time (vpmulld for q alpha and z gamma) into a row buffer with each block's
// max |v|; per block its exponent (scalar, as requantize_block) and the codes (v + 2^(k-1)) >> k
// by vpsravd and saturating packs, or the scalar rounding where the shift is outside 1..24 or
// the exponent is clamped.
#include "../reduce8.h"
#include "layernorm_steps.h"

#if BCT_X86

namespace bct {
namespace nl {
namespace {

struct LnAvx2Buffers {
  std::vector<int8_t> q;   // a row whose length is not a whole number of blocks, zero padded
  std::vector<int32_t> v;  // the row's v (step 5), nb * B
};

// round_half_even(v / 2^k) per int32 lane, 1 <= k <= 30, |v| + 2^(k-1) < 2^31.
BCT_AVX2 __attribute__((always_inline)) inline __m256i rne_epi32(__m256i v, int k) {
  const __m128i kk = _mm_cvtsi32_si128(k);
  const __m256i odd = _mm256_and_si256(_mm256_sra_epi32(v, kk), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_set1_epi32((1 << (k - 1)) - 1);
  return _mm256_sra_epi32(_mm256_add_epi32(_mm256_add_epi32(v, bias), odd), kk);
}

// One row; q: the row's codes readable up to nb * B (zeros after H).
BCT_AVX2 void layernorm_row_avx2(const Blocking& bl, const LnParams& pp, const int8_t* q,
                                 const int16_t* er, int8_t* y, float* ys, int32_t* vbuf) {
  const int64_t h = bl.d, bsz = bl.b, nb = bl.nb;
  int e_max = er[0], e_min = er[0];
  for (int64_t b = 1; b < nb; ++b) {
    e_max = std::max<int>(e_max, er[b]);
    e_min = std::min<int>(e_min, er[b]);
  }
  const int e_c = std::max(e_min, e_max - kLnWindow);  // 1. (every block has s = e_b - e_c >= 0)
  // 2. S1 = sum (sum q) << s, S2 = sum (sum q^2) << 2s (per block: |sum q| <= 2^19, sum q^2 <= 2^26)
  const __m256i ones16 = _mm256_set1_epi16(1);
  int64_t s1 = 0, s2 = 0;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a = _mm256_setzero_si256(), q2 = _mm256_setzero_si256();
    for (int64_t i = b * bsz; i < (b + 1) * bsz; i += 16) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
      a = _mm256_add_epi32(a, _mm256_madd_epi16(w, ones16));
      q2 = _mm256_add_epi32(q2, _mm256_madd_epi16(w, w));
    }
    const int s = er[b] - e_c;
    s1 += static_cast<int64_t>(static_cast<uint64_t>(hsum8_epi32(a)) << s);
    s2 += int64_t{hsum8_epi32(q2)} << (2 * s);
  }
  LnRow lr;
  ln_row_constants(bl, pp, e_c, s1, s2, &lr);  // 3.
  // 4.-5. z = (q alpha - beta + 128) >> 8 (mod 2^32: the exact value is in int32 range),
  // v = round(z gamma, a1) + bterm
  const __m256i vc = _mm256_set1_epi32(static_cast<int32_t>((1u << (kWBits - 1)) - lr.beta32));
  const int32_t* gamma = pp.gamma.data();
  const int32_t* bterm = pp.bterm.data();
  for (int64_t b = 0; b < nb; ++b) {
    const int n = static_cast<int>(std::min(bsz, h - b * bsz));
    const __m256i va = _mm256_set1_epi32(static_cast<int32_t>(ln_alpha(lr, er[b] - e_c)));
    const int a1 = pp.a1[b];
    __m256i vm = _mm256_setzero_si256();
    for (int64_t i = b * bsz; i < (b + 1) * bsz; i += 8) {
      const __m256i x = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
      const __m256i z = _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(x, va), vc), kWBits);
      __m256i zg = _mm256_mullo_epi32(z, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gamma + i)));
      if (a1 > 30) {
        zg = _mm256_setzero_si256();  // |z gamma| < 2^30
      } else if (a1 > 0) {
        zg = rne_epi32(zg, a1);
      }
      // lanes after H: gamma = bterm = 0, so v = 0 (no effect on the max)
      const __m256i v = _mm256_add_epi32(zg, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bterm + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vbuf + i), v);
      vm = _mm256_max_epu32(vm, _mm256_abs_epi32(v));
    }
    // the block's codes (ref: reblock, half up; as requantize_block<true>)
    const uint32_t m = hmax8_epu32(vm);
    const int e = reblock_exponent(m, pp.g[b]);
    ys[b] = pow2_float(e);
    const int k = e - pp.g[b];
    int8_t* yb = y + b * bsz;
    const int32_t* vb = vbuf + b * bsz;
    if (m == 0) {
      std::memset(yb, 0, static_cast<size_t>(n));
    } else if (k >= 1 && k <= 24 && e != 127) {  // |code| <= 127: the saturating packs are exact
      const __m128i kk = _mm_cvtsi32_si128(k);
      const __m256i half = _mm256_set1_epi32(1 << (k - 1));
      for (int i = 0; i < n; i += 16) {
        const __m256i c0 = _mm256_sra_epi32(
            _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + i)), half), kk);
        const __m256i c1 = _mm256_sra_epi32(
            _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + i + 8)), half), kk);
        const __m128i p0 = _mm_packs_epi32(_mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1));
        const __m128i p1 = _mm_packs_epi32(_mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1));
        const __m128i p = _mm_packs_epi16(p0, p1);
        if (i + 16 <= n) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(yb + i), p);
        } else {
          alignas(16) int8_t tail[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(tail), p);
          std::memcpy(yb + i, tail, static_cast<size_t>(n - i));
        }
      }
    } else {
      for (int i = 0; i < n; ++i)
        yb[i] = static_cast<int8_t>(std::clamp<int64_t>(shift_round_half_up(vb[i], k), -127, 127));
    }
  }
}

}  // namespace

void layernorm_rows_avx2(const Blocking& bl, const LnParams& pp, const int8_t* x,
                         const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1) {
  thread_local LnAvx2Buffers buf;
  const int64_t h = bl.d, nb = bl.nb, padded = nb * bl.b;
  int8_t* qpad = grow(buf.q, padded);
  int32_t* vbuf = grow(buf.v, padded);
  for (int64_t r = r0; r < r1; ++r) {
    const int16_t* er = ex + r * nb;
    const auto [lo, hi] = std::minmax_element(er, er + nb);
    if (*hi - *lo > kLnWindow) {  // a block below the grid window: the portable row (rare)
      layernorm_rows_portable(bl, pp, x, ex, y, ys, r, r + 1);
      continue;
    }
    const int8_t* q = x + r * h;
    if (h != padded) {  // the last block reads whole 16-byte chunks: a padded copy
      std::memcpy(qpad, q, static_cast<size_t>(h));
      std::memset(qpad + h, 0, static_cast<size_t>(padded - h));
      q = qpad;
    }
    layernorm_row_avx2(bl, pp, q, er, y + r * h, ys + r * nb, vbuf);
  }
}

}  // namespace nl
}  // namespace bct

#endif  // BCT_X86
