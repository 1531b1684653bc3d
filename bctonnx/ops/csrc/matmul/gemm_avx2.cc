// Block GEMM, AVX2 + FMA: vpmaddubsw (u8 x s8 -> s16 pairs, saturating) + vpmaddwd (-> s32).
// vpmaddubsw saturates int16, so 8-bit weights use the sign trick: |x| (u8, <= 128) times
// sign(w, x) (s8, |w| <= 127): pairs <= 2 * 128 * 127 < 2^15. int4 weights are small enough as
// they are (nibbles u in 0..15: pairs <= 2 * 15 * 128), with the zero-point correction per block
// as on AVX-512. A panel is two ymm halves (columns 0-7, 8-15); tiles of 2 rows x 1 panel.
#include <algorithm>

#include "../simd.h"
#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

#define BCT_AVX2 __attribute__((target("avx2,fma")))

BCT_AVX2 inline __m256 Rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}


// Rows r0, r0 + 1 of row tile t, panel p, all of K, into yt[2][16].
template <bool INT4>
BCT_AVX2 void Tile(const Operands& op, int64_t t, int r0, int64_t p, float* yt) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const int64_t sb = w.seg_bytes();
  const uint8_t* wp = w.data.data() + p * w.panel_bytes();
  const int8_t* xa = x.a + t * x.tile_bytes;
  const int32_t* sh = x.shift + t * w.nseg * kRowTile;
  const int32_t* corr = x.corr + t * w.nblk * kRowTile;
  const float* bs = x.bscale + t * w.nblk * kRowTile;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 yacc[2][2];
  for (int r = 0; r < 2; ++r) yacc[r][0] = yacc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nblk; ++b) {
    __m256i blk[2][2];
    for (int64_t jj = 0; jj < w.spb; ++jj) {
      const int64_t j = b * w.spb + jj;
      const uint8_t* wj = wp + j * sb;
      const int64_t s0 = j * w.gp / 4;
      __m256i acc[2][2];
      for (int r = 0; r < 2; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int64_t c = 0; c < w.chunks; ++c) {
        const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * 64));
        const __m256i raw1 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * 64 + 32));
        if (!INT4) {
          // d itself: the signed weights (u8 - 128), no correction needed
          const __m256i ws[2] = {_mm256_xor_si256(raw0, flip), _mm256_xor_si256(raw1, flip)};
          for (int r = 0; r < 2; ++r) {
            const __m256i xb = _mm256_set1_epi32(ActDword(xa, s0 + c, r0 + r));
            const __m256i ax = _mm256_abs_epi8(xb);
            for (int h = 0; h < 2; ++h) {
              const __m256i prod = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(ws[h], xb));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(prod, ones16));
            }
          }
        } else {
          const __m256i lo[2] = {_mm256_and_si256(raw0, low4), _mm256_and_si256(raw1, low4)};
          const __m256i hi[2] = {_mm256_and_si256(_mm256_srli_epi16(raw0, 4), low4),
                                 _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low4)};
          for (int r = 0; r < 2; ++r) {
            const __m256i xb0 = _mm256_set1_epi32(ActDword(xa, s0 + 2 * c, r0 + r));
            const __m256i xb1 = _mm256_set1_epi32(ActDword(xa, s0 + 2 * c + 1, r0 + r));
            for (int h = 0; h < 2; ++h) {
              const __m256i prod = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xb0),
                                                    _mm256_maddubs_epi16(hi[h], xb1));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(prod, ones16));
            }
          }
        }
      }
      for (int r = 0; r < 2; ++r) {
        const __m256i s = _mm256_set1_epi32(sh[j * kRowTile + r0 + r]);
        for (int h = 0; h < 2; ++h) {
          const __m256i shifted = _mm256_sllv_epi32(acc[r][h], s);
          blk[r][h] = jj == 0 ? shifted : _mm256_add_epi32(blk[r][h], shifted);
        }
      }
    }
    const float* swb = w.sw.data() + b * w.npad + p * kPanel;
    for (int r = 0; r < 2; ++r) {
      const __m256i cr = _mm256_set1_epi32(corr[b * kRowTile + r0 + r]);
      const __m256 e = _mm256_set1_ps(bs[b * kRowTile + r0 + r]);
      for (int h = 0; h < 2; ++h) {
        __m256i a = blk[r][h];
        if (INT4) {
          const __m256i zp = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(w.zpi.data() + b * w.npad + p * kPanel + 8 * h));
          a = _mm256_sub_epi32(a, _mm256_mullo_epi32(zp, cr));
        }
        const __m256 u = Rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(swb + 8 * h)));
        yacc[r][h] = _mm256_fmadd_ps(u, e, yacc[r][h]);
      }
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(yt + r * kPanel + 8 * h, yacc[r][h]);
}

}  // namespace

BCT_AVX2 void GemmAvx2(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  alignas(32) float yt[2 * kPanel];
  const int64_t last = std::min(m1, op.rows);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col0 = p * kPanel, valid = std::min<int64_t>(kPanel, w.n - col0);
    if (valid <= 0) break;
    for (int64_t m = m0 / 2 * 2; m < last; m += 2) {
      const int64_t t = m / kRowTile;
      if (w.int4)
        Tile<true>(op, t, static_cast<int>(m % kRowTile), p, yt);
      else
        Tile<false>(op, t, static_cast<int>(m % kRowTile), p, yt);
      for (int r = 0; r < 2; ++r) {
        if (m + r < m0 || m + r >= last) continue;
        float* yr = op.y + (m + r) * op.ldy + col0;
        for (int64_t c = 0; c < valid; ++c) {
          float v = yt[r * kPanel + c];
          if (op.bias) v = v + op.bias[col0 + c];
          if (op.ymul) v = v * *op.ymul;
          yr[c] = v;
        }
      }
    }
  }
}

}  // namespace gemm
}  // namespace bct
