// IntLayerNorm: integer LayerNorm (ref_nonlinear.int_layernorm); shared pieces in nonlinear.h
// and layernorm_steps.h.
#include "nonlinear.h"

#include "layernorm_steps.h"

namespace bct {
namespace nl {

BCT_CLONES void layernorm_rows_portable(const Blocking& bl, const LnParams& pp, const int8_t* x,
                             const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1) {
  const int64_t h = bl.d;
  std::vector<int32_t> xp(static_cast<size_t>(bl.b)), v(static_cast<size_t>(bl.b));
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* xr = x + r * h;
    const int16_t* er = ex + r * bl.nb;
    int e_max = er[0], e_min = er[0];
    for (int64_t b = 1; b < bl.nb; ++b) {
      e_max = std::max<int>(e_max, er[b]);
      e_min = std::min<int>(e_min, er[b]);
    }
    const int e_c = std::max(e_min, e_max - kLnWindow);  // 1.
    int64_t s1 = 0, s2 = 0;                              // 2.
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int s = er[b] - e_c;
      for (int64_t i = b * bl.b; i < std::min(h, (b + 1) * bl.b); ++i) {
        const int64_t xv = shift_round_even(xr[i], -s);  // s >= 0: an exact left shift
        s1 += xv;
        s2 += xv * xv;
      }
    }
    LnRow lr;
    ln_row_constants(bl, pp, e_c, s1, s2, &lr);  // 3.
    for (int64_t b = 0; b < bl.nb; ++b) {                    // 4.-5.
      const int n = static_cast<int>(std::min(bl.b, h - b * bl.b));
      const int s = er[b] - e_c;
      const uint32_t alpha = ln_alpha(lr, s);
      for (int i = 0; i < n; ++i) {
        const int8_t q = xr[b * bl.b + i];
        const int32_t xq = s >= 0 ? q : static_cast<int32_t>(shift_round_even(q, -s));
        // exact value in (-2^31, 2^31): computed modulo 2^32
        const int32_t p = static_cast<int32_t>(static_cast<uint32_t>(xq) * alpha - lr.beta32);
        const int64_t z = (int64_t{p} + (1 << (kWBits - 1))) >> kWBits;  // round half up
        const int64_t zg = z * pp.gamma[b * bl.b + i];
        v[i] = static_cast<int32_t>(shift_round_even(zg, pp.a1[b]) + pp.bterm[b * bl.b + i]);
      }
      requantize_block<true>(v.data(), n, pp.g[b], y + r * h + b * bl.b, ys + r * bl.nb + b);
    }
  }
}

}  // namespace nl

namespace {
using namespace nl;

#if BCT_X86
// round_half_even(v / 2^k) per int32 lane, 1 <= k <= 30, |v| + 2^(k-1) < 2^31.
BCT_AVX512 inline __m512i rne_epi32(__m512i v, int k) {
  const __m512i kk = _mm512_set1_epi32(k);
  const __m512i odd = _mm512_and_si512(_mm512_srav_epi32(v, kk), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_set1_epi32((1 << (k - 1)) - 1);
  return _mm512_srav_epi32(_mm512_add_epi32(_mm512_add_epi32(v, bias), odd), kk);
}

// Step 5's re-blocking for 16 blocks at once: exponent e = clamp(g + k, -128, 127) with k the
// smallest shift with m <= 127 * 2^k (m = 0: e = -128), returned with the float32 scales 2^e.
BCT_AVX512CD __attribute__((always_inline)) inline __m512i reblock_exponents16(__m512i m, __m512i g,
                                                                             __m512* scale) {
  const __m512i bl = _mm512_sub_epi32(_mm512_set1_epi32(32), _mm512_lzcnt_epi32(m));
  const __m512i k = _mm512_sub_epi32(bl, _mm512_set1_epi32(7));
  const __m512i zero = _mm512_setzero_si512();
  const __m512i c127 = _mm512_set1_epi32(127);
  const __mmask16 kpos = _mm512_cmpge_epi32_mask(k, zero);
  const __m512i lim = _mm512_sllv_epi32(c127, _mm512_max_epi32(k, zero));  // k <= 24
  const __m512i up = _mm512_sllv_epi32(m, _mm512_max_epi32(_mm512_sub_epi32(zero, k), zero));
  const __mmask16 fits = (kpos & _mm512_cmple_epu32_mask(m, lim)) |
                         (static_cast<__mmask16>(~kpos) & _mm512_cmple_epu32_mask(up, c127));
  const __m512i kf = _mm512_mask_add_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(1)), fits, k, zero);
  __m512i e = _mm512_add_epi32(g, kf);
  e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-128)), c127);
  e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(m, zero), _mm512_set1_epi32(-128));
  const __mmask16 normal = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(-126));
  const __m512i nbits = _mm512_slli_epi32(_mm512_add_epi32(e, c127), 23);
  const __m512i sbits = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_add_epi32(e, _mm512_set1_epi32(149)));
  *scale = _mm512_castsi512_ps(_mm512_mask_mov_epi32(sbits, normal, nbits));
  return e;
}

constexpr int64_t kLnTile = 64;  // rows per tile of layernorm_rows_avx512's three passes
constexpr int kLnFastSpan = 14;  // block exponents within 14 of each other: the vpmaddwd sums
// per s = 0..14: the int16 pair (2^s, 2^s) as one dword, and 4^s
constexpr std::array<int32_t, kLnFastSpan + 1> kLnPow2Pair = [] {
  std::array<int32_t, kLnFastSpan + 1> t{};
  for (int i = 0; i <= kLnFastSpan; ++i) t[i] = (1 << i) | (1 << (16 + i));
  return t;
}();
constexpr std::array<int64_t, kLnFastSpan + 1> kLnPow4 = [] {
  std::array<int64_t, kLnFastSpan + 1> t{};
  for (int i = 0; i <= kLnFastSpan; ++i) t[i] = int64_t{1} << (2 * i);
  return t;
}();

// Step 4's slopes of every block: ln_alpha(lr, e_b - e_c); 8 blocks at a time (64-bit lanes,
// round half even without branches) when 1 <= sh <= 62, which is every row in practice.
BCT_AVX512CD __attribute__((always_inline)) inline void ln_alphas(const LnRow& lr, const int16_t* er,
                                                                int e_c, int64_t nb, uint32_t* alpha) {
  if (lr.hm == 0 || lr.sh < 1 || lr.sh > 62) {
    for (int64_t b = 0; b < nb; ++b) alpha[b] = ln_alpha(lr, er[b] - e_c);
    return;
  }
  const __m512i hm = _mm512_set1_epi64(lr.hm), ec = _mm512_set1_epi64(e_c);
  const __m512i sh = _mm512_set1_epi64(lr.sh);
  const __m512i mask = _mm512_set1_epi64((int64_t{1} << lr.sh) - 1);
  const __m512i half = _mm512_set1_epi64(int64_t{1} << (lr.sh - 1));
  const __m512i one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; b += 8) {
    const __mmask8 k = static_cast<__mmask8>(nb - b >= 8 ? 0xFF : (1u << (nb - b)) - 1u);
    const __m512i e = _mm512_cvtepi16_epi64(_mm_maskz_loadu_epi16(k, er + b));
    const __m512i v = _mm512_sllv_epi64(hm, _mm512_max_epi64(_mm512_sub_epi64(e, ec), zero));
    const __m512i q = _mm512_srav_epi64(v, sh);
    const __m512i r = _mm512_and_si512(v, mask);
    const __mmask8 up = _mm512_cmpgt_epi64_mask(r, half) |
                        (_mm512_cmpeq_epi64_mask(r, half) & _mm512_test_epi64_mask(q, one));
    _mm256_mask_storeu_epi32(alpha + b, k, _mm512_cvtepi64_epi32(_mm512_mask_add_epi64(q, up, q, one)));
  }
}

// Steps 1-3 for one row: common grid, sums, row constants, per-block slopes; the codes to
// read in step 4 (xr itself, or a copy in xq with the blocks below the grid window rounded).
struct LnRowState {
  LnRow lr{};
  const int8_t* q = nullptr;
  int64_t s1 = 0, s2 = 0;
  int e_c = 0;
};

// The row layout layernorm_prologue_avx512 reads.
struct LnChunks {
  const uint16_t* valid;  // per 16-lane chunk: its lanes inside the row
  bool full;              // every chunk has 16 lanes (H a multiple of the block size)
};

BCT_AVX512CD __attribute__((always_inline)) inline void layernorm_prologue_avx512(
    const Blocking& bl, int64_t cpb, const int8_t* xr, const int16_t* er, const LnChunks& sc,
    int8_t* xq, LnRowState* st) {
  const int64_t h = bl.d, bsz = bl.b, nb = bl.nb;
  // scalar (the ports the vector code leaves idle)
  int e_max = er[0], e_min = er[0];
  for (int64_t b = 1; b < nb; ++b) {
    e_max = std::max<int>(e_max, er[b]);
    e_min = std::min<int>(e_min, er[b]);
  }
  int e_c = std::max(e_min, e_max - kLnWindow);  // 1.
  // kept in a general register: GCC otherwise holds it in an xmm and makes each block's
  // e_b - e_c two transfers and a vector subtract, on the vector ports this loop is bound by
  asm("" : "+r"(e_c));
  if (e_max - e_min <= kLnFastSpan) {
    // every block on the grid with s = e_b - e_c <= 14: S1 = sum q 2^s by vpmaddwd with the
    // weight 2^s (int32 lanes: |.| < 2^22 per 32 codes, < 2^29 over H <= 4096), S2 = sum of
    // the blocks' q^2 pair sums (< 2^21 per lane) times 4^s (vpmuludq, int64 lanes)
    __m512i acc1 = _mm512_setzero_si512(), acc2 = _mm512_setzero_si512();
    const int64_t pairs = cpb / 2;
    for (int64_t b = 0, c = 0; b < nb; ++b) {
      const int s = er[b] - e_c;
      const __m512i w2 = _mm512_set1_epi32(kLnPow2Pair[s]);  // memory broadcasts: no shuffle
      __m512i q2 = _mm512_setzero_si512();
      for (int64_t j = 0; j < pairs; ++j, c += 2) {
        const __mmask32 k = static_cast<__mmask32>(sc.valid[c]) | (static_cast<__mmask32>(sc.valid[c + 1]) << 16);
        const __m512i w = _mm512_cvtepi8_epi16(
            sc.full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + c * 16))
                    : _mm256_maskz_loadu_epi8(k, xr + c * 16));
        acc1 = _mm512_add_epi32(acc1, _mm512_madd_epi16(w, w2));
        q2 = _mm512_add_epi32(q2, _mm512_madd_epi16(w, w));
      }
      if (cpb & 1) {
        const __m512i w = _mm512_zextsi256_si512(
            _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(sc.valid[c], xr + c * 16)));
        acc1 = _mm512_add_epi32(acc1, _mm512_madd_epi16(w, w2));
        q2 = _mm512_add_epi32(q2, _mm512_madd_epi16(w, w));
        ++c;
      }
      const __m512i q2e = _mm512_add_epi32(q2, _mm512_srli_epi64(q2, 32));  // even lanes
      acc2 = _mm512_add_epi64(acc2, _mm512_mul_epu32(q2e, _mm512_set1_epi64(kLnPow4[s])));
    }
    const int64_t s1 = _mm512_reduce_add_epi64(_mm512_add_epi64(
        _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc1)),
        _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc1, 1))));
    const int64_t s2 = _mm512_reduce_add_epi64(acc2);
    // field by field: an aggregate copy here is a wide load of narrow stores (no forwarding)
    st->q = xr;
    st->s1 = s1;
    st->s2 = s2;
    st->e_c = e_c;
    return;
  }
  // 2. S1 = sum (sum q) << s, S2 = sum (sum q^2) << 2s: pair sums (vpmaddwd) per block,
  // widened to int64 lanes and shifted there (blocks below the window: below)
  const __m256i ones16 = _mm256_set1_epi16(1);
  const bool any_low = e_min < e_c;
  __m512i acc1 = _mm512_setzero_si512(), acc2 = _mm512_setzero_si512();
  for (int64_t b = 0, c = 0; b < nb; ++b) {
    const int s = er[b] - e_c;
    if (s < 0) {
      c += cpb;
      continue;
    }
    __m256i a = _mm256_setzero_si256(), q2 = _mm256_setzero_si256();
    for (int64_t j = 0; j < cpb; ++j, ++c) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(sc.valid[c], xr + c * 16));
      a = _mm256_add_epi32(a, _mm256_madd_epi16(w, ones16));
      q2 = _mm256_add_epi32(q2, _mm256_madd_epi16(w, w));
    }
    acc1 = _mm512_add_epi64(acc1, _mm512_sllv_epi64(_mm512_cvtepi32_epi64(a), _mm512_set1_epi64(s)));
    acc2 = _mm512_add_epi64(acc2, _mm512_sllv_epi64(_mm512_cvtepi32_epi64(q2), _mm512_set1_epi64(2 * s)));
  }
  int64_t s1 = _mm512_reduce_add_epi64(acc1), s2 = _mm512_reduce_add_epi64(acc2);
  st->q = xr;
  if (any_low) {  // blocks more than 16 exponents below the max: rounded codes, scalar (rare)
    std::memcpy(xq, xr, static_cast<size_t>(h));
    for (int64_t b = 0; b < nb; ++b) {
      const int s = er[b] - e_c;
      if (s >= 0) continue;
      const int64_t end = std::min(h, (b + 1) * bsz);
      for (int64_t i = b * bsz; i < end; ++i) {
        const int64_t xv = shift_round_even(xr[i], -s);
        xq[i] = static_cast<int8_t>(xv);
        s1 += xv;
        s2 += xv * xv;
      }
    }
    st->q = xq;
  }
  st->s1 = s1;
  st->s2 = s2;
  st->e_c = e_c;
}

// layernorm_rows_avx512's per-thread buffers (grown, never shrunk).
struct LnBuffers {
  std::vector<int32_t> vbuf, bmax, kk, khalf;
  std::vector<uint32_t> alpha;
  std::vector<int8_t> xq;
  std::vector<LnRowState> states;
};
LnBuffers& ln_buffers() {
  thread_local LnBuffers b;
  return b;
}

// Steps 4-5 of one row up to v: v = round(z gamma, a1) + bterm per chunk into vbuf, and per
// block 16 lanes of max |v| into bmax; z = (q alpha - beta + 128) >> 8 = (q alpha + vc) >> 8
// (mod 2^32, exact value in int32 range). kFull: every chunk has 16 lanes (no masks).
template <bool kFull, bool kA1>
BCT_AVX512CD __attribute__((always_inline)) inline void layernorm_steps45(
    int64_t nb, int64_t cpb, const LnParams& pp, const uint32_t* al, const int8_t* xq,
    const uint16_t* valid, __m512i vc, int32_t* vbuf, int32_t* bmax) {
  const __m512i zero = _mm512_setzero_si512();
  const int32_t* gamma = pp.gpair.data();  // locals: the stores below cannot make them reload
  const int32_t* bterm = pp.bterm.data();
  const int* a1s = pp.a1.data();
  // per dword: byte 1, zero (index with the high bit set), bytes 2 and 3
  const __m512i pair_bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(1, -128, 2, 3, 5, -128, 6, 7, 9, -128, 10, 11, 13, -128, 14, 15));
  for (int64_t b = 0, c = 0; b < nb; ++b) {
    __m512i vm = zero;
    const __m512i va = _mm512_set1_epi32(static_cast<int32_t>(al[b]));
    for (int64_t j = 0; j < cpb; ++j, ++c) {
      const __m128i q8 = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + c * 16))
                               : _mm_maskz_loadu_epi8(valid[c], xq + c * 16);
      const __m512i q = _mm512_cvtepi8_epi32(q8);
      const __m512i p = _mm512_add_epi32(_mm512_mullo_epi32(q, va), vc);
      // z = p >> 8 as the int16 pair (z & 0xFF, z >> 8) = (byte 1 of p, bytes 2-3 of p) (one
      // byte shuffle), times the pair (gamma, 256 gamma) by vpmaddwd: z gamma exactly
      const __m512i zp = _mm512_shuffle_epi8(p, pair_bytes);
      __m512i zg = _mm512_madd_epi16(zp, _mm512_loadu_si512(gamma + c * 16));
      if (kA1) {  // some block's beta grid is coarser than z gamma's (rare)
        const int a1 = a1s[b];
        if (a1 > 30) {
          zg = zero;  // |z gamma| < 2^30
        } else if (a1 > 0) {
          zg = rne_epi32(zg, a1);
        }
      }
      const __m512i bt = _mm512_loadu_si512(bterm + c * 16);
      const __m512i v = kFull ? _mm512_add_epi32(zg, bt) : _mm512_maskz_add_epi32(valid[c], zg, bt);
      _mm512_storeu_si512(vbuf + c * 16, v);
      const __m512i av = _mm512_abs_epi32(v);
      vm = j == 0 ? av : _mm512_max_epu32(vm, av);
    }
    _mm512_storeu_si512(bmax + b * 16, vm);  // the block's max |v| per lane
  }
}

// Steps 1-5 with AVX-512 for block sizes that are multiples of 16 (<= 1024), rows in tiles:
// every row's sums first, then every row's constants (independent rows, so their scalar
// latency chains, sqrt and divisions, overlap), then the vector steps row by row.
// kCpb: the block's 16-lane chunks, 2, 4 or 8 (compile-time: the short per-block loops unroll);
// 0: any multiple of 16.
template <int kCpb>
BCT_AVX512CD void layernorm_rows_avx512(const Blocking& bl, const LnParams& pp, const int8_t* x,
                                        const int16_t* ex, int8_t* y, float* ys, int64_t r0,
                                        int64_t r1) {
  const int64_t h = bl.d, bsz = bl.b, nb = bl.nb, cpb = kCpb ? kCpb : bsz / 16;
  const int64_t nch = nb * cpb;            // 16-lane chunks (the last ones may be partly empty)
  const int64_t ngroups = (nb + 15) / 16;  // 16 blocks per tree reduction
  // the thread's buffers: one thread-local lookup per call (in a shared library each is a call)
  LnBuffers& buf = ln_buffers();
  int32_t* vbuf = grow(buf.vbuf, nch * 16);
  const uint16_t* valid = pp.valid.data();
  const int32_t* grids = pp.g.data();  // per block, padded to whole groups of 16
  const int32_t* cblock = pp.cblock.data();  // chunk -> block
  const bool any_a1 = pp.any_a1;
  int32_t* bmax = grow(buf.bmax, ngroups * 256);  // per block 16 lanes
  int32_t* kk = grow(buf.kk, ngroups * 16);
  int32_t* khalf = grow(buf.khalf, ngroups * 16);
  LnRowState* states = grow(buf.states, kLnTile);
  uint32_t* alpha = grow(buf.alpha, kLnTile * nb + 16);
  int8_t* xq = grow(buf.xq, kLnTile * nch * 16);
  std::fill(bmax + nb * 16, bmax + ngroups * 256, 0);
  const bool all_full = h % bsz == 0;
  const LnChunks sc{valid, all_full};
  // packs of four chunks: 128-bit lane i holds dword i of chunks 0..3; dword j of the store is
  // chunk j / 4's dword j % 4
  const __m512i unpack4 = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i inv = _mm512_load_si512(tree_inverse().inv);
  const __m512i one32 = _mm512_set1_epi32(1);
  // rows in tiles: 1.-2. every row's grid and sums; 3. every row's constants (independent
  // rows: their scalar latency chains overlap); then 4.-5. row by row
  for (int64_t t0 = r0; t0 < r1; t0 += kLnTile) {
    const int64_t t1 = std::min(r1, t0 + kLnTile);
    for (int64_t r = t0; r < t1; ++r)
      layernorm_prologue_avx512(bl, cpb, x + r * h, ex + r * nb, sc, xq + (r - t0) * nch * 16,
                                &states[r - t0]);
    for (int64_t r = t0; r < t1; ++r) {
      LnRowState& st = states[r - t0];
      ln_row_constants(bl, pp, st.e_c, st.s1, st.s2, &st.lr);
      ln_alphas(st.lr, ex + r * nb, st.e_c, nb, alpha + (r - t0) * nb);
    }
    for (int64_t r = t0; r < t1; ++r) {
      const LnRowState& st = states[r - t0];
      const uint32_t* al = alpha + (r - t0) * nb;
      // 4.-5. v = round(z gamma, a1) + bterm for every chunk;
      // z = (q alpha - beta + 128) >> 8 = (q alpha + (128 - beta)) >> 8 (mod 2^32, exact value in
      // int32 range)
      const __m512i vc = _mm512_set1_epi32(static_cast<int32_t>((1u << (kWBits - 1)) - st.lr.beta32));
      // chunks all full (H a multiple of the block size): no lane masks
      if (all_full && !any_a1)
        layernorm_steps45<true, false>(nb, cpb, pp, al, st.q, valid, vc, vbuf, bmax);
      else if (all_full)
        layernorm_steps45<true, true>(nb, cpb, pp, al, st.q, valid, vc, vbuf, bmax);
      else if (!any_a1)
        layernorm_steps45<false, false>(nb, cpb, pp, al, st.q, valid, vc, vbuf, bmax);
      else
        layernorm_steps45<false, true>(nb, cpb, pp, al, st.q, valid, vc, vbuf, bmax);
      // exponents and scales, 16 blocks at a time; blocks needing the exact scalar path
      uint32_t special = 0;
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const __m512i m = _mm512_permutexvar_epi32(inv, tree16(bmax + gi * 256, MaxU32{}));
        const __m512i g = _mm512_loadu_si512(grids + gi * 16);
        __m512 scale;
        const __m512i e = reblock_exponents16(m, g, &scale);
        const __m512i k = _mm512_sub_epi32(e, g);
        const __mmask16 cnt = static_cast<__mmask16>((1u << std::min<int64_t>(16, nb - gi * 16)) - 1u);
        // the vector rounding needs 1 <= k <= 24 (|v| + 2^(k-1) < 2^31) and no clamp at 127
        special |= (_mm512_cmplt_epi32_mask(k, one32) | _mm512_cmpgt_epi32_mask(k, _mm512_set1_epi32(24)) |
                    _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(127))) & cnt;
        _mm512_storeu_si512(kk + gi * 16, k);
        _mm512_storeu_si512(khalf + gi * 16, _mm512_sllv_epi32(one32, _mm512_sub_epi32(k, one32)));
        _mm512_mask_storeu_ps(ys + r * nb + gi * 16, cnt, scale);
      }
      // codes: round half up, (v + 2^(k-1)) >> k; |.| <= 127 so the saturating pack is exact
      int8_t* yr = y + r * h;
      if (all_full && nch % 4 == 0) {  // four chunks per store: two packs and one permute
        for (int64_t c = 0; c < nch; c += 4) {
          __m512i cd[4];
          if (kCpb == 2 || (kCpb > 0 && kCpb % 4 == 0)) {  // the 4 chunks in one block, or two (cpb = 2)
            const int64_t b0 = c / cpb, b1 = kCpb == 2 ? b0 + 1 : b0;
            const __m512i k0 = _mm512_set1_epi32(kk[b0]), h0 = _mm512_set1_epi32(khalf[b0]);
            const __m512i k1 = _mm512_set1_epi32(kk[b1]), h1 = _mm512_set1_epi32(khalf[b1]);
            cd[0] = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + c * 16), h0), k0);
            cd[1] = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + c * 16 + 16), h0), k0);
            cd[2] = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + c * 16 + 32), h1), k1);
            cd[3] = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + c * 16 + 48), h1), k1);
          } else {
            for (int u = 0; u < 4; ++u) {
              const int32_t b = cblock[c + u];
              cd[u] = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + (c + u) * 16),
                                                         _mm512_set1_epi32(khalf[b])),
                                        _mm512_set1_epi32(kk[b]));
            }
          }
          const __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(cd[0], cd[1]), _mm512_packs_epi32(cd[2], cd[3]));
          _mm512_storeu_si512(yr + c * 16, _mm512_permutexvar_epi32(unpack4, p));
        }
      } else {
        for (int64_t b = 0, c = 0; b < nb; ++b) {
          const __m512i vk = _mm512_set1_epi32(kk[b]), half = _mm512_set1_epi32(khalf[b]);
          for (int64_t j = 0; j < cpb; ++j, ++c) {
            const __m512i cd = _mm512_srav_epi32(_mm512_add_epi32(_mm512_loadu_si512(vbuf + c * 16), half), vk);
            _mm_mask_storeu_epi8(yr + c * 16, valid[c], _mm512_cvtsepi32_epi8(cd));
          }
        }
      }
      if (special) {  // rare (all-zero blocks, tiny or saturated exponents): exact scalar redo
        for (int64_t b = 0; b < nb; ++b) {
          const int k = kk[b], eo = k + pp.g[b];
          if (k >= 1 && k <= 24 && eo != 127) continue;
          const int n = static_cast<int>(std::min(bsz, h - b * bsz));
          for (int i = 0; i < n; ++i)
            yr[b * bsz + i] = static_cast<int8_t>(
                std::clamp<int64_t>(shift_round_half_up(vbuf[b * bsz + i], k), -127, 127));
        }
      }
    }
  }
}
#endif

// gamma, gamma_scale, beta, beta_scale (ref: int_layernorm): int8 codes [H] and pow2 scales
// [ceil(H / B)], H in 1..4096; their H, or an error "bctonnx.IntLayerNorm: ..." naming the input.
// `x_h`: x's last axis (run time), or -1 (session creation: x unknown yet).
int64_t CheckAffineShapes(const Dims (&shape)[4], int64_t block, int64_t x_h) {
  auto fail = [](const std::string& what) {
    throw std::runtime_error("bctonnx.IntLayerNorm: " + what);
  };
  const Dims& gamma = shape[0];
  if (gamma.size() != 1 || gamma[0] < 1 || gamma[0] > kLnMaxH)
    fail("gamma must have shape [H] with H in 1.." + std::to_string(kLnMaxH) + ", got " +
         shape_str(gamma));
  const int64_t h = gamma[0];
  if (shape[2] != gamma) fail("beta must have gamma's shape " + shape_str(gamma) + ", got " + shape_str(shape[2]));
  if (x_h >= 0 && h != x_h)
    fail("gamma and beta must have H = " + std::to_string(x_h) + " elements (x's last axis), got " +
         std::to_string(h));
  Dims want;
  want.n = 1;
  want[0] = num_blocks(h, block);
  const char* names[4] = {"gamma", "gamma_scale", "beta", "beta_scale"};
  for (int i : {1, 3})
    if (shape[i] != want)
      fail(std::string(names[i]) + " must have shape [ceil(H / block_size)] = " + shape_str(want) +
           ", got " + shape_str(shape[i]));
  return h;
}

struct IntLayerNormKernel {
  int64_t block_size = 0;
  Isa isa = kScalar;
  float epsilon = 1e-5f;
  uint32_t eps_mant = 0;
  int eps_ex = 0;
  static constexpr const char* kName = "IntLayerNorm";
  // x, x_scale, gamma, gamma_scale, beta, beta_scale
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kRequiredInputs = 6;
  IntLayerNormKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    block_size = attrs.Int("block_size", 1, kMaxNonlinearBlock);
    isa = read_isa(attrs);
    epsilon = attrs.Float("epsilon", 1e-5f);
    if (!(epsilon >= 0.0f) || !std::isfinite(epsilon))
      attrs.Fail("epsilon must be finite and >= 0, got " + std::to_string(epsilon));
    uint32_t bits;  // epsilon = mant * 2^ex exactly
    std::memcpy(&bits, &epsilon, sizeof bits);
    const uint32_t ef = (bits >> 23) & 0xFFu, mf = bits & 0x7FFFFFu;
    eps_mant = ef == 0 ? mf : (mf | 0x800000u);
    eps_ex = ef == 0 ? -149 : static_cast<int>(ef) - 150;
    constant_affine(attrs, info);
  }

  // gamma/beta and their scales as constant initializers of the session (the case in every
  // model bctonnx writes): checked (shapes, pow2 scales) and converted once here, so a call
  // reads only x and x_scale. Computed at run time (any of the four): checked on every call.
  std::shared_ptr<const LnParams> const_params;
  int64_t const_h = -1;
  void constant_affine(const Attributes& attrs, const OrtKernelInfo* info) {
    const OrtValue* v[4];
    Dims shape[4];
    for (size_t i = 0; i < 4; ++i) {
      v[i] = constant_input(info, 2 + i);
      if (v[i] == nullptr) return;
      shape[i] = KernelArgs::shape(v[i]);
    }
    const int64_t h = CheckAffineShapes(shape, block_size, -1);
    const Blocking bl{1, h, num_blocks(h, block_size), block_size};
    try {
      const_params = affine_params(KernelArgs::data<int8_t>(v[0]), KernelArgs::data<float>(v[1]),
                                   KernelArgs::data<int8_t>(v[2]), KernelArgs::data<float>(v[3]), bl);
    } catch (const std::runtime_error& e) {  // a scale that is not a power of two
      attrs.Fail(std::string("gamma_scale / beta_scale: ") + e.what());
    }
    const_h = h;
  }

  // gamma/beta are initializers in practice: their integer form is built once and reused while
  // the bytes stay the same (compared on every call).
  std::mutex mu;
  std::vector<uint8_t> key;
  std::shared_ptr<const LnParams> cached;

  std::shared_ptr<const LnParams> affine_params(const int8_t* gd, const float* gsd,
                                                const int8_t* bd, const float* bsd,
                                                const Blocking& bl) {
    const int64_t h = bl.d;
    const size_t n = static_cast<size_t>(2 * h + 8 * bl.nb + 16);
    // the key: h, B, gamma, beta, gamma scales, beta scales (compared in place, no copy)
    const std::pair<const void*, size_t> parts[] = {
        {&h, 8}, {&bl.b, 8}, {gd, h}, {bd, h}, {gsd, 4 * bl.nb}, {bsd, 4 * bl.nb}};
    {
      std::lock_guard<std::mutex> lock(mu);
      if (cached && key.size() == n) {
        size_t off = 0;
        bool same = true;
        for (const auto& [ptr, len] : parts) {
          same = same && std::memcmp(key.data() + off, ptr, len) == 0;
          off += len;
        }
        if (same) return cached;
      }
    }
    std::vector<uint8_t> k(n);
    size_t off = 0;
    for (const auto& [ptr, len] : parts) {
      std::memcpy(k.data() + off, ptr, len);
      off += len;
    }
    const auto eg = scale_exponents(gsd, bl.nb);
    const auto eb = scale_exponents(bsd, bl.nb);
    auto pp = std::make_shared<LnParams>();
    pp->eps_mant = eps_mant;
    pp->eps_ex = eps_ex;
    const int64_t padded = bl.nb * bl.b;
    pp->gamma.assign(static_cast<size_t>(padded), 0);
    pp->gpair.assign(static_cast<size_t>(padded), 0);
    pp->bterm.assign(static_cast<size_t>(padded), 0);
    pp->g.assign(static_cast<size_t>((bl.nb + 15) / 16 * 16), 0);
    pp->a1.resize(static_cast<size_t>(bl.nb));
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int g = std::max(eg[b] - kZBits, eb[b] - 23);  // 5.
      pp->g[b] = g;
      pp->a1[b] = g - eg[b] + kZBits;
      pp->any_a1 |= pp->a1[b] != 0;
      const int64_t n = std::min(bl.b, h - b * bl.b);
      for (int64_t i = 0; i < n; ++i) {
        const int32_t gm = gd[b * bl.b + i];
        pp->gamma[b * bl.b + i] = gm;
        pp->gpair[b * bl.b + i] = static_cast<int32_t>((static_cast<uint32_t>(gm) & 0xFFFFu) | (static_cast<uint32_t>(gm * 256) << 16));
        pp->bterm[b * bl.b + i] = static_cast<int32_t>(shift_round_even(bd[b * bl.b + i], g - eb[b]));
      }
    }
    if (bl.b % 16 == 0) {
      const int64_t cpb = bl.b / 16, nch = bl.nb * cpb;
      pp->valid.resize(static_cast<size_t>(nch));
      pp->cblock.resize(static_cast<size_t>(nch));
      for (int64_t c = 0; c < nch; ++c) {
        pp->valid[c] = lanes16(c * 16, h);
        pp->cblock[c] = static_cast<int32_t>(c / cpb);
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    key = std::move(k);
    cached = pp;
    return cached;
  }

  void Compute(OrtKernelContext* ctx) {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const Dims xshape = KernelArgs::shape(x), sshape = KernelArgs::shape(x_scale);
    const Blocking bl = check_blocked(xshape, sshape, block_size, "IntLayerNorm");
    const int64_t h = bl.d;
    if (h > kLnMaxH)
      throw std::runtime_error("IntLayerNorm: H must be <= 4096, got " + std::to_string(h));
    std::shared_ptr<const LnParams> params;
    if (const_params) {
      if (h != const_h)
        throw std::runtime_error("bctonnx.IntLayerNorm: gamma and beta must have H = " +
                                 std::to_string(h) + " elements (x's last axis), got " +
                                 std::to_string(const_h));
      params = const_params;
    } else {
      const OrtValue* in[4];
      Dims shape[4];
      for (size_t i = 0; i < 4; ++i) {
        in[i] = args.input(2 + i);
        shape[i] = KernelArgs::shape(in[i]);
      }
      CheckAffineShapes(shape, block_size, h);
      if (bl.rows > 0)
        params = affine_params(KernelArgs::data<int8_t>(in[0]), KernelArgs::data<float>(in[1]),
                               KernelArgs::data<int8_t>(in[2]), KernelArgs::data<float>(in[3]), bl);
    }
    int8_t* yo = args.output<int8_t>(0, xshape);
    float* so = args.output<float>(1, sshape);
    if (bl.rows == 0 || h == 0) return;
    const int16_t* ex = input_exponents(KernelArgs::data<float>(x_scale), bl.rows * bl.nb);
    const LnParams& pp = *params;
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    // AVX-512 for blocks of 16..1024 (multiples of 16), AVX2 for multiples of 16, else portable
    const bool fast = isa >= kAvx512 && cpu_avx512cd() && bl.b % 16 == 0 && bl.b <= 1024;
    const bool avx2 = !fast && isa >= kAvx2 && bl.b % 16 == 0;
    parallel_rows(ctx, bl.rows, h * 2, [&](int64_t r0, int64_t r1) {
#if BCT_X86
      if (fast) {
        switch (bl.b) {  // the preset block sizes with the per-block loops unrolled
          case 32: return layernorm_rows_avx512<2>(bl, pp, xi, ex, yo, so, r0, r1);
          case 64: return layernorm_rows_avx512<4>(bl, pp, xi, ex, yo, so, r0, r1);
          case 128: return layernorm_rows_avx512<8>(bl, pp, xi, ex, yo, so, r0, r1);
          default: return layernorm_rows_avx512<0>(bl, pp, xi, ex, yo, so, r0, r1);
        }
      }
      if (avx2) return layernorm_rows_avx2(bl, pp, xi, ex, yo, so, r0, r1);
#endif
      (void)avx2;
      layernorm_rows_portable(bl, pp, xi, ex, yo, so, r0, r1);
    });
  }
};


}  // namespace

void AddIntLayerNormOp(Ort::CustomOpDomain& domain) {
  static KernelOp<IntLayerNormKernel> op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
