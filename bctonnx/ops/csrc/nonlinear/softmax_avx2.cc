// IntSoftmax's row kernel for AVX2 (no AVX-512): steps 1-4 of ref_nonlinear.int_softmax, the
// same bits as the portable and AVX-512 kernels (softmax.cc). Block sizes: multiples of 16 (a
// 16-element chunk never straddles two blocks); other block sizes use the portable kernel.
//
// Per row, 32 elements per step: the block maxima (16-byte chunks), step 2's E with the two
// 16-bit tables looked up as bytes by vpshufb (A: 32 entries, two 16-byte halves chosen by
// bit 4 of j; B: 8 entries), multiplied by vpmulhrsw; step 4's output by vpmulhuw and a
// saturating pack. vpshufb looks up within each 128-bit lane, so the lower and upper 16
// elements of a step may belong to two blocks (block sizes 16, 48, ...) with their own tables.
// The per-block constants (steps 1, 3 and R0, R_b) are the scalar helpers of softmax_steps.h,
// a few per block. E is kept in the unpack order of vpunpck{l,h}bw (elements 0-7 and 16-23,
// then 8-15 and 24-31), which step 4's vpackuswb undoes.
#include "../reduce8.h"
#include "softmax.h"
#include "softmax_steps.h"

#if BCT_X86

namespace bct {
namespace nl {
namespace {

// The step-2 tables of one clamped exponent as bytes for vpshufb: A's low and high bytes for
// j < 16 and j >= 16, B's low and high bytes (k < 8; entries 8..15 unused).
struct SoftmaxByteTable {
  alignas(16) uint8_t alo[2][16], ahi[2][16], blo[16], bhi[16];
};
struct SoftmaxByteTables {
  SoftmaxByteTable t[kSmTables];
};
const SoftmaxByteTables& softmax_byte_tables() {
  static const SoftmaxByteTables t = [] {
    const SoftmaxTables& w = softmax_tables();
    SoftmaxByteTables s{};
    for (int i = 0; i < kSmTables; ++i) {
      for (int j = 0; j < 32; ++j) {
        s.t[i].alo[j / 16][j % 16] = static_cast<uint8_t>(w.a[i][j] & 0xFF);
        s.t[i].ahi[j / 16][j % 16] = static_cast<uint8_t>(w.a[i][j] >> 8);
      }
      for (int k = 0; k < 16; ++k) {
        s.t[i].blo[k] = static_cast<uint8_t>(w.b[i][k] & 0xFF);
        s.t[i].bhi[k] = static_cast<uint8_t>(w.b[i][k] >> 8);
      }
    }
    return s;
  }();
  return t;
}

struct SoftmaxAvx2Buffers {
  std::vector<uint16_t> w;     // the row's E, steps * 32 words (unpack order)
  std::vector<int8_t> q;       // a row whose length is not a multiple of 32, padded with -128
  std::vector<uint8_t> ones;   // flags of an unmasked row: 1 inside the row, 0 after it
  std::vector<int32_t> qm;     // per block: qmax
  std::vector<int64_t> sb, f;  // per block: the sum of E, F_b
  std::vector<uint16_t> rb;    // per block: R_b
};

// One row: codes q (d, readable up to steps * 32 bytes), block exponents e, flags (1 =
// unmasked, readable and 0 up to steps * 32), bany (per block: any unmasked element; null:
// all), probabilities y (d).
BCT_AVX2 void softmax_row_avx2(const Blocking& bl, const int8_t* q, const int16_t* e,
                               const uint8_t* flags, const uint8_t* bany, uint8_t* y,
                               SoftmaxAvx2Buffers& buf) {
  const int64_t d = bl.d, nb = bl.nb, cpb = bl.b / 16, steps = (d + 31) / 32, chunks = 2 * steps;
  auto block_any = [&](int64_t b) { return bany == nullptr || bany[b] != 0; };
  int e_top = INT_MIN;
  for (int64_t b = 0; b < nb; ++b)
    if (block_any(b)) e_top = std::max<int>(e_top, e[b]);
  if (e_top == INT_MIN) {  // fully masked row
    std::memset(y, 0, d);
    return;
  }
  int32_t* qm = buf.qm.data();
  int64_t* sb = buf.sb.data();
  int64_t* f = buf.f.data();
  uint16_t* rb = buf.rb.data();
  uint16_t* w = buf.w.data();
  // 1. per block qmax (masked elements count as -128); L; max(L)
  const __m128i neg = _mm_set1_epi8(-128), zero = _mm_setzero_si128();
  int64_t lmax = INT64_MIN;
  for (int64_t b = 0; b < nb; ++b) {
    sb[b] = 0;
    qm[b] = -128;  // (read by step 2's table setup, its elements all masked)
    if (!block_any(b)) continue;
    __m128i m = neg;
    for (int64_t c = b * cpb; c < std::min((b + 1) * cpb, chunks); ++c) {
      const __m128i keep = _mm_sub_epi8(zero, _mm_loadu_si128(reinterpret_cast<const __m128i*>(flags + c * 16)));
      m = _mm_max_epi8(m, _mm_blendv_epi8(neg, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16)), keep));
    }
    qm[b] = hmax16_epi8(m);
    lmax = std::max<int64_t>(lmax, qm[b] * int64_t{log2e_coef(e_top - e[b])});
  }
  // 2. E per element, the blocks' sums
  const SoftmaxByteTables& tabs = softmax_byte_tables();
  const __m256i lo5 = _mm256_set1_epi8(31), lo3 = _mm256_set1_epi8(7), ones16 = _mm256_set1_epi16(1);
  const __m256i zero256 = _mm256_setzero_si256();
  __m256i talo0 = zero256, talo1 = zero256, tahi0 = zero256, tahi1 = zero256, tblo = zero256,
          tbhi = zero256, qv = zero256, acc = zero256;
  int64_t pb0 = -1, pb1 = -1, cur = 0;
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t b0 = (2 * st) / cpb, b1 = std::min(nb - 1, (2 * st + 1) / cpb);
    if (b0 != pb0 || b1 != pb1) {  // the two halves' tables and qmax
      const SoftmaxByteTable& t0 = tabs.t[softmax_table_index(e[b0])];
      const SoftmaxByteTable& t1 = tabs.t[softmax_table_index(e[b1])];
      talo0 = halves(load16(t0.alo[0]), load16(t1.alo[0]));
      talo1 = halves(load16(t0.alo[1]), load16(t1.alo[1]));
      tahi0 = halves(load16(t0.ahi[0]), load16(t1.ahi[0]));
      tahi1 = halves(load16(t0.ahi[1]), load16(t1.ahi[1]));
      tblo = halves(load16(t0.blo), load16(t1.blo));
      tbhi = halves(load16(t0.bhi), load16(t1.bhi));
      qv = halves(_mm_set1_epi8(static_cast<char>(qm[b0])), _mm_set1_epi8(static_cast<char>(qm[b1])));
      pb0 = b0;
      pb1 = b1;
    }
    const __m256i keep =
        _mm256_sub_epi8(zero256, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(flags + st * 32)));
    const __m256i dq = _mm256_sub_epi8(qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + st * 32)));
    const __m256i j = _mm256_and_si256(dq, lo5);                         // d & 31
    const __m256i k = _mm256_and_si256(_mm256_srli_epi16(dq, 5), lo3);  // d >> 5
    const __m256i upper = _mm256_slli_epi16(j, 3);                       // bit 4 of j -> bit 7
    const __m256i alo = _mm256_blendv_epi8(_mm256_shuffle_epi8(talo0, j), _mm256_shuffle_epi8(talo1, j), upper);
    const __m256i ahi = _mm256_blendv_epi8(_mm256_shuffle_epi8(tahi0, j), _mm256_shuffle_epi8(tahi1, j), upper);
    const __m256i blo = _mm256_shuffle_epi8(tblo, k), bhi = _mm256_shuffle_epi8(tbhi, k);
    const __m256i e0 = _mm256_and_si256(
        _mm256_mulhrs_epi16(_mm256_unpacklo_epi8(alo, ahi), _mm256_unpacklo_epi8(blo, bhi)),
        _mm256_unpacklo_epi8(keep, keep));
    const __m256i e1 = _mm256_and_si256(
        _mm256_mulhrs_epi16(_mm256_unpackhi_epi8(alo, ahi), _mm256_unpackhi_epi8(blo, bhi)),
        _mm256_unpackhi_epi8(keep, keep));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + st * 32), e0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + st * 32 + 16), e1);
    // dwords 0-3: the lower 16 elements (block b0), 4-7: the upper 16 (block b1)
    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(e0, ones16), _mm256_madd_epi16(e1, ones16));
    if (b0 == b1) {
      if (b0 != cur) {
        sb[cur] += hsum8_epi32(acc);
        acc = zero256;
        cur = b0;
      }
      acc = _mm256_add_epi32(acc, s);
    } else {  // a block boundary in the middle of the step
      sb[cur] += hsum8_epi32(acc);
      sb[b0] += hsum8_epi32(_mm256_blend_epi32(s, zero256, 0xF0));
      acc = _mm256_blend_epi32(s, zero256, 0x0F);
      cur = b1;
    }
  }
  sb[cur] += hsum8_epi32(acc);
  // 3. the block factors, S; 4. R0 = 2^62 // S, R_b
  const int sh = 4 - e_top;
  uint64_t s = 0;
  for (int64_t b = 0; b < nb; ++b) {
    f[b] = 0;
    if (!block_any(b)) continue;
    f[b] = softmax_factor(softmax_t(lmax - qm[b] * int64_t{log2e_coef(e_top - e[b])}, sh));
    s += static_cast<uint64_t>((f[b] * sb[b]) >> 14);
  }
  const uint64_t r0 = (uint64_t{1} << 62) / s;
  for (int64_t b = 0; b < nb; ++b) rb[b] = static_cast<uint16_t>(softmax_rb(f[b], r0));
  // 4. y = min(255, (((E R_b) >> 16) + 64) >> 7)
  const __m256i c64 = _mm256_set1_epi16(64);
  __m256i vr = zero256;
  pb0 = pb1 = -1;
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t b0 = (2 * st) / cpb, b1 = std::min(nb - 1, (2 * st + 1) / cpb);
    if (b0 != pb0 || b1 != pb1) {
      vr = halves(_mm_set1_epi16(static_cast<int16_t>(rb[b0])), _mm_set1_epi16(static_cast<int16_t>(rb[b1])));
      pb0 = b0;
      pb1 = b1;
    }
    const __m256i h0 = _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + st * 32)), vr);
    const __m256i h1 = _mm256_mulhi_epu16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + st * 32 + 16)), vr);
    const __m256i p = _mm256_packus_epi16(_mm256_srli_epi16(_mm256_add_epi16(h0, c64), 7),
                                          _mm256_srli_epi16(_mm256_add_epi16(h1, c64), 7));
    store_step32(y, st, d, p);
  }
}

}  // namespace

void softmax_rows_avx2(const Blocking& bl, const int8_t* x, const int16_t* ex, const MaskRows& mr,
                       uint8_t* y, int64_t r0, int64_t r1) {
  thread_local SoftmaxAvx2Buffers buf;
  const int64_t d = bl.d, nb = bl.nb, padded = (d + 31) / 32 * 32;
  grow(buf.w, padded);
  grow(buf.qm, nb);
  grow(buf.sb, nb);
  grow(buf.f, nb);
  grow(buf.rb, nb);
  int8_t* qpad = grow(buf.q, padded);
  const uint8_t* ones = nullptr;
  if (!mr.present) {
    uint8_t* o = grow(buf.ones, padded);
    std::memset(o, 1, d);
    std::memset(o + d, 0, padded - d);
    ones = o;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = x + r * d;
    if (d != padded) {  // the row's last step reads 32 bytes: a padded copy
      std::memcpy(qpad, q, d);
      std::memset(qpad + d, -128, padded - d);
      q = qpad;
    }
    const uint8_t* flags = ones;
    const uint8_t* bany = nullptr;
    if (mr.present) {
      const int64_t m = mr.row_of.empty() ? 0 : mr.row_of[r];
      flags = mr.flags.data() + m * mr.padded;  // padded to 32 with zeros
      bany = mr.block_any.data() + m * nb;
    }
    softmax_row_avx2(bl, q, ex + r * nb, flags, bany, y + r * d, buf);
  }
}

}  // namespace nl
}  // namespace bct

#endif  // BCT_X86
