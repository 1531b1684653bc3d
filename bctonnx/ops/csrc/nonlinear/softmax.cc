// IntSoftmax: integer softmax (ref_nonlinear.int_softmax); shared pieces in nonlinear.h.
#include "nonlinear.h"

#include "softmax.h"
#include "softmax_steps.h"

namespace bct {
namespace nl {
namespace {

#if BCT_X86
// One mask row of length d (d > 0), 16 values at a time: the flags and 16-bit lane bits of the
// scalar loop in build_mask (unmasked = not < -1000). Returns the index of the first value that
// is neither 0 nor < -1000 (NaN included), or -1.
BCT_AVX512 int64_t mask_row_avx512(const float* m, int64_t d, uint8_t* f, uint16_t* bits) {
  const __m512 thr = _mm512_set1_ps(-1000.0f), zero = _mm512_setzero_ps();
  const __m128i one = _mm_set1_epi8(1);
  for (int64_t i = 0; i < d; i += 16) {
    const int64_t n = std::min<int64_t>(16, d - i);
    const __mmask16 valid = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(valid, m + i);
    const __mmask16 masked = _mm512_mask_cmp_ps_mask(valid, v, thr, _CMP_LT_OQ);
    const __mmask16 nonzero = _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_NEQ_UQ);
    const __mmask16 bad = static_cast<__mmask16>(nonzero & ~masked);
    if (bad) return i + __builtin_ctz(bad);
    const __mmask16 keep = static_cast<__mmask16>(valid & ~masked);
    _mm_mask_storeu_epi8(f + i, valid, _mm_maskz_mov_epi8(keep, one));
    bits[i / 16] = keep;
  }
  return -1;
}
#endif

}  // namespace

// Fills `mr` (a thread's MaskRows, reused across calls: its vectors keep their memory, so a
// call allocates nothing once they are large enough).
void build_mask(const Blocking& bl, const Dims& xshape, const Dims* mshape, const float* md,
                MaskRows& mr) {
  mr.present = false;
  mr.row_of.clear();
  mr.padded = (bl.nb * bl.b + 31) / 32 * 32;
  mr.steps = (bl.d + 31) / 32;
  mr.valid32.resize(static_cast<size_t>(mr.steps));
  for (int64_t st = 0; st < mr.steps; ++st)
    mr.valid32[st] = uint32_t{lanes16(st * 32, bl.d)} | (uint32_t{lanes16(st * 32 + 16, bl.d)} << 16);
  if (mshape == nullptr) return;
  mr.present = true;
  const Dims& ms = *mshape;
  const size_t xr = xshape.size();
  if (ms.size() > xr) throw std::runtime_error("IntSoftmax: mask has a higher rank than x");
  Dims mfull;  // the mask's shape left-padded with 1s to x's rank
  mfull.n = xr;
  for (size_t i = 0; i < xr; ++i) mfull[i] = 1;
  for (size_t i = 0; i < ms.size(); ++i) mfull[xr - ms.size() + i] = ms[i];
  for (size_t i = 0; i < xr; ++i)
    if (mfull[i] != 1 && mfull[i] != xshape[i])
      throw std::runtime_error("IntSoftmax: mask shape " + shape_str(ms) + " does not broadcast to x");
  const int64_t mlast = mfull[xr - 1];
  int64_t mrows = 1;
  for (size_t i = 0; i + 1 < xr; ++i) mrows *= mfull[i];
  const int64_t padded = mr.padded;
  mr.flags.assign(static_cast<size_t>(mrows * padded), 0);
  mr.bits.assign(static_cast<size_t>(mrows * padded / 16), 0);
  mr.block_any.assign(static_cast<size_t>(mrows * bl.nb), 0);
  mr.row_any.assign(static_cast<size_t>(mrows), 0);
  const bool fast = mlast != 1 && cpu_avx512();
  for (int64_t r = 0; r < mrows; ++r) {
    uint8_t* f = mr.flags.data() + r * padded;
    uint16_t* bits = mr.bits.data() + r * padded / 16;
#if BCT_X86
    if (fast) {
      const int64_t bad = mask_row_avx512(md + r * mlast, bl.d, f, bits);
      if (bad >= 0)
        throw std::runtime_error(
            "IntSoftmax: mask values must be 0 or < -1000 (an additive attention mask), got " +
            std::to_string(md[r * mlast + bad]));
    }
#endif
    for (int64_t i = 0; i < (fast ? 0 : bl.d); ++i) {
      const float v = md[r * mlast + (mlast == 1 ? 0 : i)];
      const bool masked = v < -1000.0f;
      if (!masked && v != 0.0f)
        throw std::runtime_error(
            "IntSoftmax: mask values must be 0 or < -1000 (an additive attention mask), got " +
            std::to_string(v));
      f[i] = masked ? 0 : 1;
      if (!masked) bits[i / 16] |= static_cast<uint16_t>(1u << (i % 16));
    }
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int64_t n = std::min(bl.b, bl.d - b * bl.b);
      bool any = false;
      if (bl.b % 16 == 0) {  // whole 16-lane words (the bits past d are 0)
        for (int64_t w = 0; w < (n + 15) / 16; ++w) any |= bits[(b * bl.b) / 16 + w] != 0;
      } else {
        for (int64_t i = 0; i < n; ++i) any |= f[b * bl.b + i] != 0;
      }
      mr.block_any[r * bl.nb + b] = any;
      mr.row_any[r] |= any;
    }
  }
  mr.k32.resize(static_cast<size_t>(mrows * mr.steps));
  for (int64_t r = 0; r < mrows; ++r)
    for (int64_t st = 0; st < mr.steps; ++st)
      mr.k32[r * mr.steps + st] =
          mr.valid32[st] & (uint32_t{mr.bits[r * padded / 16 + 2 * st]} |
                            (uint32_t{mr.bits[r * padded / 16 + 2 * st + 1]} << 16));
  if (mrows == 1) return;  // every row reads mask row 0
  // x row -> mask row: walk the multi-index of x.shape[:-2] (no divisions); along the last
  // leading axis the mask row either stays (broadcast) or steps by one.
  mr.row_of.resize(static_cast<size_t>(bl.rows));
  const size_t lead = xr - 1;
  std::vector<int64_t> idx(lead, 0), mstride(lead, 0);
  int64_t st = 1;
  for (size_t i = lead; i-- > 0;) {
    mstride[i] = mfull[i] == 1 ? 0 : st;
    st *= mfull[i];
  }
  const int64_t inner = lead ? xshape[lead - 1] : 1, step = lead ? mstride[lead - 1] : 0;
  int64_t cur = 0;
  for (int64_t r0 = 0; r0 < bl.rows; r0 += inner) {
    int64_t* out = mr.row_of.data() + r0;
    for (int64_t i = 0; i < inner; ++i) out[i] = cur + i * step;
    for (size_t i = lead - 1; i-- > 0;) {
      ++idx[i];
      cur += mstride[i];
      if (idx[i] < xshape[i]) break;
      cur -= mstride[i] * idx[i];
      idx[i] = 0;
    }
  }
}

MaskRows& mask_rows_buffer() {  // the calling thread's, reused by every IntSoftmax call on it
  thread_local MaskRows m;
  return m;
}

namespace {

struct SoftmaxRow {
  const int8_t* q = nullptr;
  const int16_t* e = nullptr;
  const uint8_t* flags = nullptr;  // nullptr: nothing masked
  const uint16_t* bits = nullptr;  // the flags as 16-lane masks
  const uint8_t* bany = nullptr;
  const uint32_t* k32 = nullptr;      // per 32-lane step: valid and unmasked lanes
  const uint32_t* valid32 = nullptr;  // per 32-lane step: valid lanes
  uint8_t* y = nullptr;
};

// Steps 1-4 of the reference for one row, literally (scalar). ebuf: D entries; fbuf: nb
// entries (each block's qmax, then its factor F_b).
BCT_CLONES void softmax_row_portable(const Blocking& bl, const SoftmaxRow& row, uint16_t* ebuf,
                                     int64_t* fbuf) {
  const bool masked = row.flags != nullptr;
  auto unmasked = [&](int64_t i) { return !masked || row.flags[i] != 0; };
  auto block_any = [&](int64_t b) { return !masked || row.bany[b] != 0; };
  const SoftmaxTables& tb = softmax_tables();
  int e_top = INT_MIN;
  for (int64_t b = 0; b < bl.nb; ++b)
    if (block_any(b)) e_top = std::max<int>(e_top, row.e[b]);
  if (e_top == INT_MIN) {  // fully masked row
    std::memset(row.y, 0, bl.d);
    return;
  }
  // 1. per block qmax (into fbuf) and L; max(L)
  int64_t lmax = INT64_MIN;
  for (int64_t b = 0; b < bl.nb; ++b) {
    if (!block_any(b)) continue;
    int qmax = -128;
    for (int64_t i = b * bl.b; i < std::min(bl.d, (b + 1) * bl.b); ++i)
      if (unmasked(i)) qmax = std::max<int>(qmax, row.q[i]);
    fbuf[b] = qmax;
    lmax = std::max<int64_t>(lmax, qmax * int64_t{log2e_coef(e_top - row.e[b])});
  }
  const int sh = 4 - e_top;
  uint64_t s = 0;
  for (int64_t b = 0; b < bl.nb; ++b) {
    const int64_t end = std::min(bl.d, (b + 1) * bl.b);
    if (!block_any(b)) {
      for (int64_t i = b * bl.b; i < end; ++i) ebuf[i] = 0;
      fbuf[b] = 0;
      continue;
    }
    const int qmax = static_cast<int>(fbuf[b]);
    // 2. E per element, the block's sum
    const int ti = softmax_table_index(row.e[b]);
    int64_t sb = 0;
    for (int64_t i = b * bl.b; i < end; ++i) {
      if (!unmasked(i)) {
        ebuf[i] = 0;
        continue;
      }
      const int d = qmax - row.q[i];  // 0..255
      ebuf[i] = static_cast<uint16_t>((uint32_t{tb.a[ti][d & 31]} * tb.b[ti][d >> 5] + (1u << 14)) >> 15);
      sb += ebuf[i];
    }
    // 3. the block factor (into fbuf), the sum
    fbuf[b] = softmax_factor(softmax_t(lmax - qmax * int64_t{log2e_coef(e_top - row.e[b])}, sh));
    s += static_cast<uint64_t>((fbuf[b] * sb) >> 14);
  }
  // 4. normalization
  const uint64_t r0 = (uint64_t{1} << 62) / s;
  for (int64_t b = 0; b < bl.nb; ++b) {
    const uint32_t rb = softmax_rb(fbuf[b], r0);  // 0 for blocks without an unmasked element
    for (int64_t i = b * bl.b; i < std::min(bl.d, (b + 1) * bl.b); ++i)
      row.y[i] = softmax_out((uint32_t{ebuf[i]} * rb) >> 16);
  }
}

#if BCT_X86
struct SoftmaxBuffers {
  std::vector<uint16_t> wbuf;  // E of the tile's rows, steps * 32 words each
  std::vector<int32_t> bsum;   // [block][row of tile][16 lanes]: partial sums of E
  std::vector<int8_t> qmax16;  // [block][row][16 bytes]: per-lane maxima
  std::vector<int32_t> eb, qm, fq30;  // [block][row]: exponent, qmax, F_b (Q30)
  std::vector<int32_t> toff;   // [block][row]: offset of the block's table row (32 per index)
  std::vector<uint16_t> rb;    // [block][row]: R_b
  std::vector<uint16_t> bany;  // per block: bit i = the tile's row i has an unmasked element there
  std::vector<uint16_t> ebuf;  // the portable row's E
  std::vector<int64_t> fbuf;   // and its per-block qmax / F_b
};
SoftmaxBuffers& softmax_buffers() {
  thread_local SoftmaxBuffers b;
  return b;
}

constexpr int64_t kSmTile = 16;  // rows per tile: the per-block constants run with rows in lanes

// Bits 0, 2, ..., 14 of m as bits 0..7.
inline __mmask8 even_bits(uint32_t m) {
  m &= 0x5555u;
  m = (m | (m >> 1)) & 0x3333u;
  m = (m | (m >> 2)) & 0x0F0Fu;
  return static_cast<__mmask8>((m | (m >> 4)) & 0xFFu);
}

// floor(2^62 / S) per 64-bit lane (S in [2^30, 2^53), lanes outside k: 0): the double quotient
// (S is exact in a double; the rounded quotient < 2^32 is within 2^-20 of the exact one), then
// exact integer corrections of +-1.
BCT_AVX512 __attribute__((always_inline)) inline __m512i softmax_r0(__m512i s, __mmask8 k) {
  s = _mm512_mask_mov_epi64(_mm512_set1_epi64(1), k, s);
  const __m512i two62 = _mm512_set1_epi64(int64_t{1} << 62);
  __m512i q = _mm512_cvttpd_epu64(_mm512_div_pd(_mm512_set1_pd(4611686018427387904.0), _mm512_cvtepu64_pd(s)));
  q = _mm512_mask_sub_epi64(q, _mm512_cmpgt_epu64_mask(_mm512_mullo_epi64(q, s), two62), q, _mm512_set1_epi64(1));
  const __m512i q1 = _mm512_add_epi64(q, _mm512_set1_epi64(1));
  q = _mm512_mask_mov_epi64(q, _mm512_cmple_epu64_mask(_mm512_mullo_epi64(q1, s), two62), q1);
  return _mm512_maskz_mov_epi64(k, q);
}

// F = 2^-t in Q30 per int32 lane (ref step 3), t >= 0.
BCT_AVX512 __attribute__((always_inline)) inline __m512i softmax_factor16(__m512i t) {
  const __m512i f = _mm512_and_si512(t, _mm512_set1_epi32(0xFFFF));
  __m512i a = _mm512_sub_epi32(_mm512_set1_epi32(kC3), _mm512_srli_epi32(_mm512_mullo_epi32(f, _mm512_set1_epi32(kC4)), 16));
  a = _mm512_sub_epi32(_mm512_set1_epi32(kC2), _mm512_srli_epi32(_mm512_mullo_epi32(f, a), 16));
  a = _mm512_sub_epi32(_mm512_set1_epi32(kC1), _mm512_srli_epi32(_mm512_mullo_epi32(f, a), 16));
  const __m512i g = _mm512_sub_epi32(_mm512_set1_epi32(kC0), _mm512_srli_epi32(_mm512_mullo_epi32(f, a), 16));
  const __m512i n = _mm512_srli_epi32(t, 16);
  const __m512i c14 = _mm512_set1_epi32(14), one = _mm512_set1_epi32(1);
  const __m512i up = _mm512_sllv_epi32(g, _mm512_max_epi32(_mm512_sub_epi32(c14, n), _mm512_setzero_si512()));
  // n > 14: round_half_even(g / 2^(n - 14)); g < 2^16, so from n - 14 = 17 on the result is 0
  const __m512i k = _mm512_min_epi32(_mm512_sub_epi32(n, c14), _mm512_set1_epi32(17));
  const __m512i odd = _mm512_and_si512(_mm512_srlv_epi32(g, k), one);
  const __m512i bias = _mm512_sub_epi32(_mm512_sllv_epi32(one, _mm512_sub_epi32(k, one)), one);
  const __m512i down = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_add_epi32(g, bias), odd), k);
  return _mm512_mask_blend_epi32(_mm512_cmple_epi32_mask(n, c14), down, up);
}

// Step 4 for one row, 32 lanes per step: y = min(255, (((E R_b) >> 16) + 64) >> 7), two steps
// per store (the saturating pack gives the min). rb: the row's per-block factors, `stride` apart;
// cpb: 16-lane chunks per block.
BCT_AVX512 __attribute__((always_inline)) inline __m512i softmax_out16(__m512i e, __m512i vr) {
  return _mm512_srli_epi16(_mm512_add_epi16(_mm512_mulhi_epu16(e, vr), _mm512_set1_epi16(64)), 7);
}
// The R_b of each step's lanes, steps in order: whole steps per block (kCpb even), or per
// 16-lane chunk.
template <int kCpb>
struct SoftmaxStepR {
  const uint16_t* rb;
  int64_t stride, nb, cpb;
  int64_t b = 0, left = cpb;
  BCT_AVX512 __attribute__((always_inline)) __m512i operator()(int64_t st) {
    if (kCpb) return _mm512_set1_epi16(static_cast<int16_t>(rb[(st / (kCpb / 2)) * stride]));
    const int64_t b0 = b;
    if (--left == 0) b += 1, left = cpb;
    const int64_t b1 = std::min(nb - 1, b);  // past the row: no lanes
    if (--left == 0) b += 1, left = cpb;
    return _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(static_cast<int16_t>(rb[b0 * stride])),
                                   _mm512_set1_epi16(static_cast<int16_t>(rb[b1 * stride])));
  }
};
template <int kCpb>
BCT_AVX512 __attribute__((always_inline)) inline void softmax_normalize_avx512(
    const uint16_t* w, const uint16_t* rb, int64_t stride, int64_t nb, int64_t cpb,
    const uint32_t* valid32, int64_t steps, uint8_t* y) {
  SoftmaxStepR<kCpb> step_r{rb, stride, nb, cpb};
  const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);  // undo packus' lane interleave
  int64_t st = 0;
  for (; st + 2 <= steps; st += 2) {
    const __m512i p0 = softmax_out16(_mm512_loadu_si512(w + st * 32), step_r(st));
    const __m512i p1 = softmax_out16(_mm512_loadu_si512(w + st * 32 + 32), step_r(st + 1));
    const __mmask64 k = valid32[st] | (static_cast<__mmask64>(valid32[st + 1]) << 32);
    _mm512_mask_storeu_epi8(y + st * 32, k, _mm512_permutexvar_epi64(order, _mm512_packus_epi16(p0, p1)));
  }
  if (st < steps)
    _mm256_mask_storeu_epi8(y + st * 32, valid32[st],
                            _mm512_cvtusepi16_epi8(softmax_out16(_mm512_loadu_si512(w + st * 32), step_r(st))));
}

// Step 2 of one row whose blocks are whole 32-lane steps: E per element into w, the partial
// sums of each block into bsum (16 lanes, [block][row of tile]). toff and qm point at the row's
// column of the tile's [block][row] arrays. Not inlined: alone, its loop keeps every pointer
// in a register (inside the tile function the compiler spilled them, one reload per block).
template <int kCpb>
BCT_AVX512 __attribute__((noinline)) void softmax_step2_row(const SoftmaxRow& row, const SoftmaxTables& tabs,
                                                            const int32_t* toff, const int32_t* qm, int64_t nb,
                                                            int64_t spb, int64_t steps, uint16_t* w,
                                                            int32_t* bsum) {
  const __m512i ones16 = _mm512_set1_epi16(1);
  const uint16_t* ta0 = &tabs.a[0][0];
  const uint16_t* tb0 = &tabs.b[0][0];
  const uint32_t* k32 = row.k32;
  const int8_t* q8 = row.q;
  for (int64_t b = 0, st = 0; b < nb; ++b) {
    const int32_t to = toff[b * kSmTile];  // softmax_table_index(row.e[b]) * 32
    const __m512i ta = _mm512_load_si512(ta0 + to), tb = _mm512_load_si512(tb0 + to);
    const __m512i qv = _mm512_set1_epi16(static_cast<int16_t>(qm[b * kSmTile]));
    __m512i acc = _mm512_setzero_si512();
    for (int64_t j = 0; j < (kCpb ? kCpb / 2 : spb) && st < steps; ++j, ++st) {
      const __mmask32 k = k32[st];
      const __m512i q = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, q8 + st * 32));
      const __m512i dq = _mm512_sub_epi16(qv, q);
      const __m512i a = _mm512_permutexvar_epi16(dq, ta);
      const __m512i bb = _mm512_permutexvar_epi16(_mm512_srli_epi16(dq, 5), tb);
      const __m512i e = _mm512_maskz_mulhrs_epi16(k, a, bb);
      _mm512_storeu_si512(w + st * 32, e);
      acc = _mm512_add_epi32(acc, _mm512_madd_epi16(e, ones16));
    }
    _mm512_storeu_si512(bsum + b * kSmTile * 16, acc);
  }
}

// Steps 1-4 with AVX-512 for block sizes that are multiples of 16 (a 16-lane chunk never
// straddles two blocks), in tiles of 16 rows: per row the block maxima and the per-element
// step 2 (32 elements per step: two table lookups and vpmulhrsw); per tile the per-block
// constants (exponents, L, t, F, the sums, R_b) with the tile's rows in the 16 lanes, so the
// long scalar-like chains of one row overlap with those of 15 others; then per row step 4.
// kCpb: the block's 16-lane chunks, 2, 4 or 8 (compile-time: the short per-block loops unroll);
// 0: any multiple of 16.
template <int kCpb>
BCT_AVX512 void softmax_rows_avx512(const Blocking& bl, const int8_t* x, const int16_t* ex,
                                    const MaskRows& mr, uint8_t* y, int64_t r0, int64_t r1) {
  const int64_t d = bl.d, nb = bl.nb, steps = mr.steps, cpb = kCpb ? kCpb : bl.b / 16;
  const int64_t nbq = (nb + 3) / 4 * 4;  // qmax16 rows are reduced 4 at a time
  SoftmaxBuffers& buf = softmax_buffers();  // one thread-local lookup per call
  uint16_t* wbuf = grow(buf.wbuf, kSmTile * steps * 32);
  int32_t* bsum = grow(buf.bsum, nb * kSmTile * 16);
  int8_t* qmax16 = grow(buf.qmax16, nbq * kSmTile * 16);
  int32_t* eb = grow(buf.eb, nb * kSmTile);
  int32_t* toff = grow(buf.toff, nb * kSmTile);
  int32_t* qm = grow(buf.qm, nbq * kSmTile);
  int32_t* fq30 = grow(buf.fq30, nb * kSmTile);
  uint16_t* rbuf = grow(buf.rb, nb * kSmTile);
  uint16_t* ebuf = grow(buf.ebuf, d);
  int64_t* fbuf = grow(buf.fbuf, nb);
  const SoftmaxTables& tabs = softmax_tables();
  const __m512i inv = _mm512_load_si512(tree_inverse().inv);
  const __m512i ones16 = _mm512_set1_epi16(1);
  const __m512i lane_hi = _mm512_maskz_set1_epi16(0xFFFF0000u, 32);  // upper 16 lanes: 2nd table
  const __m128i neg128 = _mm_set1_epi8(-128);
  const bool pair = cpb % 2 != 0;  // 32-lane steps that span two blocks
  const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(2 * nb)));
  uint16_t* bany = grow(buf.bany, nb);
  SoftmaxRow rows[kSmTile];
  // a row's mask fields (mask row m); with one mask row for all (BERT's [1, 1, 1, S], or none)
  // they are set once here and a tile only sets each row's data pointers
  const auto set_mask = [&](SoftmaxRow& row, int64_t m) {
    row.valid32 = mr.valid32.data();
    row.k32 = mr.valid32.data();
    row.flags = nullptr;
    row.bits = nullptr;
    row.bany = nullptr;
    if (mr.present) {
      row.flags = mr.flags.data() + m * mr.padded;
      row.bits = mr.bits.data() + m * mr.padded / 16;
      row.bany = mr.block_any.data() + m * nb;
      row.k32 = mr.k32.data() + m * steps;
    }
  };
  const bool one_mask = mr.row_of.empty();
  const bool all_masked = one_mask && mr.present && !mr.row_any[0];
  if (one_mask)
    for (SoftmaxRow& row : rows) set_mask(row, 0);
  for (int64_t t0 = r0; t0 < r1; t0 += kSmTile) {
    const int64_t nt = std::min(kSmTile, r1 - t0);
    uint32_t live = 0;  // rows with an unmasked element
    for (int64_t i = 0; i < nt; ++i) {
      SoftmaxRow& row = rows[i];
      const int64_t r = t0 + i;
      row.q = x + r * d;
      row.e = ex + r * nb;
      row.y = y + r * d;
      const int64_t m = one_mask ? 0 : mr.row_of[r];
      if (all_masked || (!one_mask && !mr.row_any[m])) {  // fully masked row
        std::memset(row.y, 0, d);
        continue;
      }
      if (!one_mask) set_mask(row, m);
      live |= 1u << i;
    }
    // the tile's exponents per block, rows in lanes (dword gathers of the int16 exponents:
    // the buffer has 16 spare entries after the last row)
    const int16_t* et = ex + t0 * nb;
    const __mmask16 tile_rows = static_cast<__mmask16>((1u << nt) - 1u);
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), tile_rows, gidx, et + b, 1);
      const __m512i e = _mm512_srai_epi32(_mm512_slli_epi32(g, 16), 16);
      _mm512_storeu_si512(eb + b * kSmTile, e);
      // softmax_table_index(e) * 32, rows in lanes (the step-2 loop then reads no exponent)
      const __m512i ti = _mm512_sub_epi32(
          _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(kSmELo)), _mm512_set1_epi32(kSmEHi)),
          _mm512_set1_epi32(kSmELo));
      _mm512_storeu_si512(toff + b * kSmTile, _mm512_slli_epi32(ti, 5));
    }
    bool shared = true;  // every live row reads the same mask row (BERT: the heads and queries)
    const uint8_t* bany0 = live ? rows[__builtin_ctz(live)].bany : nullptr;
    for (int64_t i = 0; i < nt; ++i) shared = shared && (!(live >> i & 1u) || rows[i].bany == bany0);
    for (int64_t b = 0; b < nb; ++b) {
      uint32_t m = 0;
      if (shared) {
        m = !bany0 || bany0[b] ? live : 0;
      } else {
        for (int64_t i = 0; i < nt; ++i)
          m |= static_cast<uint32_t>((live >> i & 1u) && (!rows[i].bany || rows[i].bany[b])) << i;
      }
      bany[b] = static_cast<uint16_t>(m);
    }
    // 1. qmax per (block, row): per-lane maxima of the block's chunks, then 4 at a time
    for (int64_t i = 0; i < nt; ++i) {
      if (!(live >> i & 1u)) continue;
      const SoftmaxRow& row = rows[i];
      if (kCpb == 2) {  // two blocks per 64-byte load: pair the 16-byte lanes, store lanes 0 and 2
        const __m512i neg = _mm512_set1_epi8(-128);
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
          const __mmask64 k = row.k32[b] | (static_cast<__mmask64>(row.k32[b + 1]) << 32);
          __m512i m = _mm512_mask_loadu_epi8(neg, k, row.q + b * 32);
          m = _mm512_max_epi8(m, _mm512_shuffle_i64x2(m, m, 0xB1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qmax16 + (b * kSmTile + i) * 16), _mm512_castsi512_si128(m));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qmax16 + ((b + 1) * kSmTile + i) * 16),
                           _mm512_extracti32x4_epi32(m, 2));
        }
        if (b < nb) {
          const __m256i m = _mm256_mask_loadu_epi8(_mm256_set1_epi8(-128), row.k32[b], row.q + b * 32);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qmax16 + (b * kSmTile + i) * 16),
                           _mm_max_epi8(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1)));
        }
        continue;
      }
      if (kCpb) {  // whole 32-lane steps per block
        const __m256i neg = _mm256_set1_epi8(-128);
        for (int64_t b = 0; b < nb; ++b) {
          __m256i m = neg;
          for (int64_t j = 0; j < kCpb / 2; ++j) {
            const int64_t st = b * (kCpb / 2) + j;
            if (st >= steps) break;  // the last block may be partial
            m = _mm256_max_epi8(m, _mm256_mask_loadu_epi8(neg, row.k32[st], row.q + st * 32));
          }
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qmax16 + (b * kSmTile + i) * 16),
                           _mm_max_epi8(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1)));
        }
        continue;
      }
      const uint16_t* bits = row.bits;
      for (int64_t b = 0, c = 0; b < nb; ++b) {
        __m128i m = neg128;
        for (int64_t j = 0; j < cpb; ++j, ++c) {
          const __mmask16 k = static_cast<__mmask16>(bits ? (bits[c] & lanes16(c * 16, d)) : lanes16(c * 16, d));
          m = _mm_max_epi8(m, _mm_mask_loadu_epi8(neg128, k, row.q + c * 16));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qmax16 + (b * kSmTile + i) * 16), m);
      }
    }
    for (int64_t j = 0; j < nb * kSmTile; j += 4) {
      __m512i v = _mm512_loadu_si512(qmax16 + j * 16);
      v = _mm512_max_epi8(v, _mm512_bsrli_epi128(v, 8));
      v = _mm512_max_epi8(v, _mm512_bsrli_epi128(v, 4));
      v = _mm512_max_epi8(v, _mm512_bsrli_epi128(v, 2));
      v = _mm512_max_epi8(v, _mm512_bsrli_epi128(v, 1));
      const __m128i sel = _mm512_castsi512_si128(_mm512_maskz_compress_epi32(0x1111, v));  // bytes 0, 16, 32, 48
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + j), _mm_srai_epi32(_mm_slli_epi32(sel, 24), 24));
    }
    // 1. e_top, L_b = qmax_b c_b, max L, t_b; 3. F_b (rows in lanes)
    __m512i vtop = _mm512_set1_epi32(INT_MIN);
    for (int64_t b = 0; b < nb; ++b)
      vtop = _mm512_mask_max_epi32(vtop, bany[b], vtop, _mm512_loadu_si512(eb + b * kSmTile));
    const __m512i vsh = _mm512_sub_epi32(_mm512_set1_epi32(4), vtop);
    // rows with huge scores (> 2^12, sh < 0): the portable row, rare
    const uint32_t huge = _mm512_mask_cmplt_epi32_mask(static_cast<__mmask16>(live), vsh, _mm512_setzero_si512());
    const uint32_t vec = live & ~huge;
    __m512i vl = _mm512_set1_epi32(INT_MIN);
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i delta = _mm512_min_epu32(_mm512_sub_epi32(vtop, _mm512_loadu_si512(eb + b * kSmTile)), _mm512_set1_epi32(31));
      const __m512i c = _mm512_permutex2var_epi32(_mm512_load_si512(kLog2eCoef.c), delta, _mm512_load_si512(kLog2eCoef.c + 16));
      const __m512i l = _mm512_mullo_epi32(_mm512_loadu_si512(qm + b * kSmTile), c);
      vl = _mm512_mask_max_epi32(vl, bany[b], vl, l);
      _mm512_storeu_si512(fq30 + b * kSmTile, l);  // L for now
    }
    const __m512i vshc = _mm512_min_epi32(_mm512_max_epi32(vsh, _mm512_setzero_si512()), _mm512_set1_epi32(31));
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i t = _mm512_srav_epi32(_mm512_sub_epi32(vl, _mm512_loadu_si512(fq30 + b * kSmTile)), vshc);
      _mm512_storeu_si512(fq30 + b * kSmTile, _mm512_maskz_mov_epi32(bany[b] & vec, softmax_factor16(t)));
    }
    // 2. E per element, per (block, row) partial sums (rows without: zeros)
    for (int64_t i = 0; i < kSmTile; ++i) {
      if (pair || !(vec >> i & 1u))
        for (int64_t b = 0; b < nb; ++b) std::memset(bsum + (b * kSmTile + i) * 16, 0, 64);
      if (!(vec >> i & 1u)) continue;
      const SoftmaxRow& row = rows[i];
      uint16_t* w = wbuf + i * steps * 32;
      if (!pair) {
        softmax_step2_row<kCpb>(row, tabs, toff + i, qm + i, nb, cpb / 2, steps, w,
                                bsum + i * 16);
      } else {  // blocks of 16, 48, ...: a step's lower and upper 16 lanes may be two blocks
        for (int64_t st = 0; st < steps; ++st) {
          const int64_t b0 = (2 * st) / cpb, b1 = std::min(nb - 1, (2 * st + 1) / cpb);
          const int t0i = softmax_table_index(row.e[b0]), t1i = softmax_table_index(row.e[b1]);
          const __mmask32 k = row.k32[st];
          const __m512i qv = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(static_cast<int16_t>(qm[b0 * kSmTile + i])),
                                                     _mm512_set1_epi16(static_cast<int16_t>(qm[b1 * kSmTile + i])));
          const __m512i q = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, row.q + st * 32));
          const __m512i dq = _mm512_sub_epi16(qv, q);
          // indices into the pair of tables: + 32 in the upper 16 lanes (the second block's)
          const __m512i ja = _mm512_or_si512(_mm512_and_si512(dq, _mm512_set1_epi16(31)), lane_hi);
          const __m512i jb = _mm512_or_si512(_mm512_srli_epi16(dq, 5), lane_hi);
          const __m512i a = _mm512_permutex2var_epi16(_mm512_load_si512(tabs.a[t0i]), ja, _mm512_load_si512(tabs.a[t1i]));
          const __m512i bb = _mm512_permutex2var_epi16(_mm512_load_si512(tabs.b[t0i]), jb, _mm512_load_si512(tabs.b[t1i]));
          const __m512i e = _mm512_maskz_mulhrs_epi16(k, a, bb);
          _mm512_storeu_si512(w + st * 32, e);
          const __m512i s = _mm512_madd_epi16(e, ones16);  // dwords 0-7: chunk 0, 8-15: chunk 1
          int32_t* s0 = bsum + (b0 * kSmTile + i) * 16;
          int32_t* s1 = bsum + (b1 * kSmTile + i) * 16;
          _mm512_storeu_si512(s0, _mm512_mask_add_epi32(_mm512_loadu_si512(s0), 0x00FF, _mm512_loadu_si512(s0), s));
          _mm512_storeu_si512(s1, _mm512_mask_add_epi32(_mm512_loadu_si512(s1), 0xFF00, _mm512_loadu_si512(s1), s));
        }
      }
    }
    // 3. S = sum_b (F_b s_b) >> 14 per row (even and odd rows in 64-bit lanes)
    __m512i se = _mm512_setzero_si512(), so = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i sb = _mm512_permutexvar_epi32(inv, tree16(bsum + b * kSmTile * 16, AddI32{}));
      const __m512i f = _mm512_loadu_si512(fq30 + b * kSmTile);
      se = _mm512_add_epi64(se, _mm512_srli_epi64(_mm512_mul_epu32(f, sb), 14));
      so = _mm512_add_epi64(so, _mm512_srli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(f, 32), _mm512_srli_epi64(sb, 32)), 14));
    }
    // 4. R0 = 2^62 // S (< 2^32), R_b = min((F_b R0) >> 45, 65535)
    const __m512i qe = softmax_r0(se, even_bits(vec));
    const __m512i qo = softmax_r0(so, even_bits(vec >> 1));
    const __m512i cap = _mm512_set1_epi64(0xFFFF);
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i f = _mm512_loadu_si512(fq30 + b * kSmTile);
      const __m512i lo = _mm512_min_epu64(_mm512_srli_epi64(_mm512_mul_epu32(f, qe), 45), cap);
      const __m512i hi = _mm512_min_epu64(_mm512_srli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(f, 32), qo), 45), cap);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rbuf + b * kSmTile),
                          _mm512_cvtepi32_epi16(_mm512_or_si512(lo, _mm512_slli_epi64(hi, 32))));
    }
    for (int64_t i = 0; i < nt; ++i) {
      if (vec >> i & 1u)
        softmax_normalize_avx512<kCpb>(wbuf + i * steps * 32, rbuf + i, kSmTile, nb, cpb, mr.valid32.data(),
                                       steps, rows[i].y);
      else if (huge >> i & 1u)
        softmax_row_portable(bl, rows[i], ebuf, fbuf);
    }
  }
}
#endif

}  // namespace

SoftmaxPath softmax_path(Isa isa, int64_t b) {
  if (!BCT_X86 || b % 16 != 0) return SoftmaxPath::kPortable;
  if (isa >= kAvx512 && cpu_avx512()) return SoftmaxPath::kAvx512;
  return isa >= kAvx2 ? SoftmaxPath::kAvx2 : SoftmaxPath::kPortable;
}

void softmax_rows(const Blocking& bl, const int8_t* x, const int16_t* ex, const MaskRows& mr,
                  SoftmaxPath path, uint8_t* y, int64_t r0, int64_t r1) {
#if BCT_X86
  if (path == SoftmaxPath::kAvx2) return softmax_rows_avx2(bl, x, ex, mr, y, r0, r1);
  if (path == SoftmaxPath::kAvx512) {
    switch (bl.b) {  // the preset block sizes with the per-block loops unrolled
      case 32: return softmax_rows_avx512<2>(bl, x, ex, mr, y, r0, r1);
      case 64: return softmax_rows_avx512<4>(bl, x, ex, mr, y, r0, r1);
      case 128: return softmax_rows_avx512<8>(bl, x, ex, mr, y, r0, r1);
      default: return softmax_rows_avx512<0>(bl, x, ex, mr, y, r0, r1);
    }
  }
#endif
  (void)path;
  std::vector<uint16_t> ebuf(static_cast<size_t>(bl.d));
  std::vector<int64_t> fbuf(static_cast<size_t>(bl.nb));
  for (int64_t r = r0; r < r1; ++r) {
    SoftmaxRow row;
    row.q = x + r * bl.d;
    row.e = ex + r * bl.nb;
    row.y = y + r * bl.d;
    if (mr.present) {
      const int64_t m = mr.row_of.empty() ? 0 : mr.row_of[r];
      row.flags = mr.flags.data() + m * mr.padded;
      row.bany = mr.block_any.data() + m * bl.nb;
    }
    softmax_row_portable(bl, row, ebuf.data(), fbuf.data());
  }
}

namespace {

struct IntSoftmaxKernel {
  int64_t block_size = 0;
  Isa isa = kScalar;
  static constexpr const char* kName = "IntSoftmax";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};  // x, x_scale, mask
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
  static constexpr size_t kRequiredInputs = 2;
  IntSoftmaxKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    block_size = attrs.Int("block_size", 1, kMaxNonlinearBlock);
    isa = read_isa(attrs);
  }
  void Compute(OrtKernelContext* ctx) {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const OrtValue* mask = args.input(2);
    const Dims xshape = KernelArgs::shape(x);
    const Blocking bl = check_blocked(xshape, KernelArgs::shape(x_scale), block_size, "IntSoftmax");
    uint8_t* yo = args.output<uint8_t>(0, xshape);
    if (bl.rows == 0 || bl.d == 0) return;
    const int16_t* ex = input_exponents(KernelArgs::data<float>(x_scale), bl.rows * bl.nb);
    MaskRows& mr = mask_rows_buffer();
    if (mask != nullptr) {
      const Dims ms = KernelArgs::shape(mask);
      build_mask(bl, xshape, &ms, KernelArgs::data<float>(mask), mr);
    } else {
      build_mask(bl, xshape, nullptr, nullptr, mr);
    }
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    const SoftmaxPath path = softmax_path(isa, bl.b);
    parallel_rows(ctx, bl.rows, bl.d * 4, [&](int64_t r0, int64_t r1) {
      softmax_rows(bl, xi, ex, mr, path, yo, r0, r1);
    });
  }
};

}  // namespace
}  // namespace nl

void AddIntSoftmaxOp(Ort::CustomOpDomain& domain) {
  static KernelOp<nl::IntSoftmaxKernel> op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
