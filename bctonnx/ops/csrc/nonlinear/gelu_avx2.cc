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
// on many AVX2 CPUs). Block sizes 32, 64, ...: block by block, one table per step; 16, 48, ...:
// the two 16-byte lanes of a step may belong to two blocks, each with its own table.
#include "../reduce8.h"
#include "gelu_steps.h"

#if BCT_X86

namespace bct {
namespace nl {
namespace {

alignas(64) constexpr int8_t kZeroDiffs[256] = {};  // the table of a block whose codes are all 0

struct GeluAvx2Buffers {
  std::vector<int8_t> q;            // a row whose length is not a multiple of 32, zero padded
  std::vector<const int8_t*> rows;  // per 16-code chunk: its block's diffs row
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

// A block's diffs row, at the output exponent gelu_group_exponents gave it.
inline const int8_t* gelu_diffs_row(const GeluTables& tb, const GeluBlock& gb) {
  const int ki = gelu_shift_index(gb, gb.eo);
  return ki < 0 ? kZeroDiffs : tb.diffs[gb.ei][ki];
}

// One row: codes q (d, readable and 0 up to a multiple of 32), block exponents e, codes y (d),
// group scales ys; gbs: nb entries of scratch, rows (block sizes 16, 48, ...): one per 16
// codes, and one more.
BCT_AVX2 void gelu_row_avx2(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                            const int8_t* q, const int16_t* e, int8_t* y, float* ys,
                            GeluBlock* gbs, const int8_t** rows) {
  const int64_t d = bl.d, nb = bl.nb, steps = (d + 31) / 32;
  // per block: the largest code and whether any is negative (the padding's zeros change
  // neither decision), in steps of 32 codes (block sizes 32, 64, ...) or 16; then its max |T|
  // and exponent
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * bl.b, i1 = std::min(i0 + bl.b, d);
    __m128i m, any;
    if (bl.b % 32 == 0) {
      __m256i mx = _mm256_set1_epi8(-128), ay = _mm256_setzero_si256();
      for (int64_t i = i0; i < i1; i += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
        mx = _mm256_max_epi8(mx, v);
        ay = _mm256_or_si256(ay, v);
      }
      m = _mm_max_epi8(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
      any = _mm_or_si128(_mm256_castsi256_si128(ay), _mm256_extracti128_si256(ay, 1));
    } else {
      m = _mm_set1_epi8(-128);
      any = _mm_setzero_si128();
      for (int64_t i = i0; i < i1; i += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
        m = _mm_max_epi8(m, v);
        any = _mm_or_si128(any, v);
      }
    }
    const int n = static_cast<int>(i1 - i0);
    gbs[b] = gelu_block(tb, q + i0, n, e[b], hmax16_epi8(m), _mm_movemask_epi8(any) != 0);
  }
  gelu_group_exponents(bl, gr, gbs, ys);
  if (bl.b % 32 == 0) {  // whole steps per block: one table per step
    const int64_t spb = bl.b / 32;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* t = gelu_diffs_row(tb, gbs[b]);
      for (int64_t st = b * spb; st < std::min((b + 1) * spb, steps); ++st) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + st * 32));
        store_step32(y, st, d, gelu_lookup32<true>(t, t, x));
      }
    }
    return;
  }
  const int64_t cpb = bl.b / 16, chunks = (d + 15) / 16;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* row = gelu_diffs_row(tb, gbs[b]);
    for (int64_t c = b * cpb; c < std::min((b + 1) * cpb, chunks); ++c) rows[c] = row;
  }
  rows[chunks] = rows[chunks - 1];  // the upper half of a last step past the row
  for (int64_t st = 0; st < steps; ++st) {
    const int8_t* t0 = rows[2 * st];
    const int8_t* t1 = rows[2 * st + 1];
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + st * 32));
    store_step32(y, st, d,
                 t0 == t1 ? gelu_lookup32<true>(t0, t0, x) : gelu_lookup32<false>(t0, t1, x));
  }
}

}  // namespace

void gelu_rows_avx2(const GeluTables& tb, const Blocking& bl, GeluGrouping gr, const int8_t* x,
                    const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1,
                    GeluBlock* gbs) {
  thread_local GeluAvx2Buffers buf;
  const int64_t d = bl.d, padded = (d + 31) / 32 * 32;
  const int8_t** rows = grow(buf.rows, padded / 16 + 1);
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
