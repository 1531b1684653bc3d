// IntGelu's row kernel for AVX2 (no AVX-512 VBMI): ref_nonlinear.int_gelu, the same bits as the
// portable and AVX-512 kernels (gelu.cc). Block sizes: multiples of 16 (a 16-element chunk never
// straddles two blocks); other block sizes use the portable kernel.
//
// Per row: each block's largest code and whether it has a negative one (16-byte chunks), then
// its max |T|, table row and the groups' exponents by the scalar steps of gelu_steps.h; then
// the codes, 32 per step, from each block's 256-entry byte table by vpshufb. vpshufb looks up
// 16 entries per 128-bit lane and gives 0 where the index byte is negative, so each half of a
// table (codes 0..127, and -128..-1) is 8 chunks of 16 entries, stored as XOR differences
// (GeluTables::diffs: the XOR of a half's chunks 0..i is its chunk i). For a code x >= 0 the
// index v_i = x - 16 i (saturating) is >= 0 exactly for the chunks i <= x >> 4, with x's low
// four bits: the XOR of those 8 lookups is x's entry, and every lookup of a negative x is 0.
// The negative half is the same with x ^ 0x80 (x + 128 for x < 0, negative for x >= 0). That is
// 16 vpshufb, 16 vpsubsb and 16 vpxor per 32 codes, every code's bits exact; no gathers (slow
// on many AVX2 CPUs). The two 16-byte lanes of a step may belong to two blocks (block sizes
// 16, 48, ...), each with its own table.
#include "../reduce8.h"
#include "gelu_steps.h"

#if BCT_X86

namespace bct {
namespace nl {
namespace {

alignas(64) constexpr int8_t kZeroDiffs[256] = {};  // the table of a block whose codes are all 0

struct GeluAvx2Buffers {
  std::vector<int8_t> q;            // a row whose length is not a multiple of 32, zero padded
  std::vector<const int8_t*> rows;  // per block: its diffs row
};

// Chunk `off / 16` of the diffs rows t0 (lanes 0-15) and t1 (lanes 16-31; kSame: t1 == t0).
template <bool kSame>
BCT_AVX2 __attribute__((always_inline)) inline __m256i gelu_chunk(const int8_t* t0,
                                                                  const int8_t* t1, int off) {
  if constexpr (kSame) return _mm256_broadcastsi128_si256(load16(t0 + off));
  return halves(load16(t0 + off), load16(t1 + off));
}

// 32 codes of x from the diffs rows t0 (lanes 0-15) and t1 (lanes 16-31; kSame: t1 == t0).
template <bool kSame>
BCT_AVX2 __attribute__((always_inline)) inline __m256i gelu_lookup32(const int8_t* t0,
                                                                     const int8_t* t1, __m256i x) {
  const __m256i c16 = _mm256_set1_epi8(16);
  __m256i vp = x, vn = _mm256_xor_si256(x, _mm256_set1_epi8(-128));
  __m256i acc = _mm256_xor_si256(_mm256_shuffle_epi8(gelu_chunk<kSame>(t0, t1, 128), vp),
                                 _mm256_shuffle_epi8(gelu_chunk<kSame>(t0, t1, 0), vn));
  for (int i = 1; i < 8; ++i) {
    vp = _mm256_subs_epi8(vp, c16);
    vn = _mm256_subs_epi8(vn, c16);
    acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8(gelu_chunk<kSame>(t0, t1, 128 + 16 * i), vp));
    acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8(gelu_chunk<kSame>(t0, t1, 16 * i), vn));
  }
  return acc;
}

// One row: codes q (d, readable and 0 up to a multiple of 32), block exponents e, codes y (d),
// group scales ys; gbs, rows: nb entries of scratch.
BCT_AVX2 void gelu_row_avx2(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                            const int8_t* q, const int16_t* e, int8_t* y, float* ys,
                            GeluBlock* gbs, const int8_t** rows) {
  const int64_t d = bl.d, nb = bl.nb, cpb = bl.b / 16, chunks = (d + 15) / 16;
  const __m128i lowest = _mm_set1_epi8(-128);
  for (int64_t b = 0; b < nb; ++b) {
    __m128i mx = lowest, any = _mm_setzero_si128();
    for (int64_t c = b * cpb; c < std::min((b + 1) * cpb, chunks); ++c) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16));
      mx = _mm_max_epi8(mx, v);
      any = _mm_or_si128(any, v);
    }
    const int n = static_cast<int>(std::min(bl.b, d - b * bl.b));
    gbs[b] = gelu_block(tb, q + b * bl.b, n, e[b], hmax16_epi8(mx), _mm_movemask_epi8(any) != 0);
  }
  gelu_group_exponents(bl, gr, gbs, ys);
  for (int64_t b = 0; b < nb; ++b) {
    const int ki = gelu_shift_index(gbs[b], gbs[b].eo);
    rows[b] = ki < 0 ? kZeroDiffs : tb.diffs[gbs[b].ei][ki];
  }
  for (int64_t st = 0; st * 32 < d; ++st) {
    const int8_t* t0 = rows[(2 * st) / cpb];
    const int8_t* t1 = rows[std::min(nb - 1, (2 * st + 1) / cpb)];
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + st * 32));
    const __m256i r = t0 == t1 ? gelu_lookup32<true>(t0, t0, x) : gelu_lookup32<false>(t0, t1, x);
    if (st * 32 + 32 <= d) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + st * 32), r);
    } else {
      alignas(32) int8_t tail[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), r);
      std::memcpy(y + st * 32, tail, static_cast<size_t>(d - st * 32));
    }
  }
}

}  // namespace

void gelu_rows_avx2(const GeluTables& tb, const Blocking& bl, GeluGrouping gr, const int8_t* x,
                    const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1,
                    GeluBlock* gbs) {
  thread_local GeluAvx2Buffers buf;
  const int64_t d = bl.d, padded = (d + 31) / 32 * 32;
  const int8_t** rows = grow(buf.rows, bl.nb);
  int8_t* qpad = grow(buf.q, padded);
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = x + r * d;
    if (d != padded) {  // the row's last step reads 32 bytes: a padded copy
      std::memcpy(qpad, q, d);
      std::memset(qpad + d, 0, padded - d);
      q = qpad;
    }
    gelu_row_avx2(tb, bl, gr, q, ex + r * bl.nb, y + r * d, ys + r * gr.ngrp, gbs, rows);
  }
}

}  // namespace nl
}  // namespace bct

#endif  // BCT_X86
