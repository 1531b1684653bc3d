// AttentionPV's per-head arithmetic (pv.h): V preparation, the portable and AVX-512 VNNI heads.
// The op: attention's context product P.V in integers,
// uint8 probabilities (IntSoftmax's codes) times int8 V codes with per-token pow2 scales.
//
// The specification is the numpy reference bctonnx/ops/ref_attention.py ("Arithmetic"); this
// file follows it step by step. Per batch index (one attention head), V is first brought to
// one exponent per token segment and column ("w", int16, exact when the segment's scales are
// within 2^8 of each other, else rounded half to even), then every output row accumulates
// p * w in int32 per segment and adds float32(sum) * 2^(r + p_exponent) in segment order.
//
// Paths, chosen when a session creates the kernel (BCTONNX_ISA=avx512|amx|avx2|scalar caps it,
// as for BlockMatMul):
//   avx512  AVX-512 BW + VNNI: vpdpwssd on int16 pairs, p[s], p[s+1] zero-extended into one
//           dword broadcast against w[s, j], w[s+1, j] interleaved for 16 columns; register
//           tile of 4 rows x 32 columns, int32 per segment then the float32 epilogue in
//           registers. Needs an even segment (token pairs never straddle two segments).
//   avx2    AVX2: vpmaddwd on the same int16 pairs, 4 rows x 16 columns, the float32 step of
//           each segment into a tile in L1.
//   scalar  portable C++, the same float32 operations in the same order.
// Heads run as tasks on the session's intra-op pool (KernelContext::ParallelFor). Both layout
// transposes around attention's P.V can be fused: v token-major (v_transposed) and the output
// token-major (transpose_output).
#include "pv.h"

#include <algorithm>
#include <cstring>

#include "../simd.h"

namespace bct {
namespace pv {
namespace {

// Per-thread scratch, grown and reused across runs (64-byte aligned).
template <typename T>
T* Scratch(std::vector<char>& buf, size_t count) {
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(T) + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((addr + 63) & ~uintptr_t{63});
}

}  // namespace

PvDims MakeDims(int64_t m, int64_t s, int64_t d, int64_t block, int64_t seg, int p_exp) {
  PvDims dm;
  dm.m = m;
  dm.s = s;
  dm.d = d;
  dm.block = block;
  dm.nb = num_blocks(d, block);
  dm.seg = seg;
  dm.nseg = num_blocks(s, seg);
  dm.dpad = num_blocks(d, 32) * 32 + 32;  // whole 32-column tiles, + a zero tile
  dm.pairs = (s + 1) / 2;
  dm.p_exp = p_exp;
  return dm;
}

PreparedV HeadScratch(const PvDims& dm) {
  thread_local std::vector<char> wbuf, fbuf;
  return PreparedV{Scratch<int32_t>(wbuf, static_cast<size_t>(dm.pairs * dm.dpad)),
                   Scratch<float>(fbuf, static_cast<size_t>(dm.nseg * dm.dpad))};
}

namespace {

// The exponent r of segment [s0, s1) of V's block column c (ref_attention.py step 1): 8 binades
// below the largest exponent of the segment's valid tokens (none valid: the floor, so that
// 2^(r + p_exponent) stays a float32).
int SegmentExponent(const PvDims& dm, const int* exps, const uint8_t* valid, int64_t s0,
                    int64_t s1, int64_t c) {
  int emax = -100000;
  for (int64_t s = s0; s < s1; ++s)
    if (valid == nullptr || valid[s]) emax = std::max(emax, exps[s * dm.nb + c]);
  return std::max(emax - 8, -149 - dm.p_exp);
}

// 32 int16 lanes of x (int8 codes widened) times 2^-n, rounded half to even (shift_round_even
// on each lane: n <= 0 a left shift, exact in int16 for n >= -8; n > 0 the rounding shift).
__attribute__((target("avx512f,avx512bw"))) inline __m512i ShiftRoundEven16(__m512i x, int n) {
  if (n <= 0) return _mm512_sll_epi16(x, _mm_cvtsi32_si128(-n));
  if (n >= 16) return _mm512_setzero_si512();  // |x| <= 128 < 2^(n-1): rounds to 0
  const __m512i q = _mm512_sra_epi16(x, _mm_cvtsi32_si128(n));  // floor
  const __m512i r = _mm512_and_si512(x, _mm512_set1_epi16(static_cast<int16_t>((1 << n) - 1)));
  const __m512i half = _mm512_set1_epi16(static_cast<int16_t>(1 << (n - 1)));
  const __mmask32 odd = _mm512_test_epi16_mask(q, _mm512_set1_epi16(1));
  const __mmask32 up = _mm512_cmpgt_epi16_mask(r, half) | (_mm512_cmpeq_epi16_mask(r, half) & odd);
  return _mm512_mask_add_epi16(q, up, q, _mm512_set1_epi16(1));
}

// PrepareV with AVX-512 BW: the same w and factors, 32 columns of a token pair at a time.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void PrepareVAvx512(
    const PvDims& dm, const int8_t* v, int64_t v_row, const int* exps, const uint8_t* valid,
    PreparedV* out) {
  alignas(64) static const int16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_load_si512(kHi);
  const int64_t d = dm.d;
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t s0 = g * dm.seg, s1 = std::min(s0 + dm.seg, dm.s);
    float* factor = out->factor + g * dm.dpad;
    std::fill(factor + d, factor + dm.dpad, 0.0f);
    for (int64_t t = s0 / 2; t < (s1 + 1) / 2; ++t)  // the padding columns of the pairs: 0
      std::memset(out->w + t * dm.dpad + d, 0, sizeof(int32_t) * (dm.dpad - d));
    for (int64_t c = 0; c < dm.nb; ++c) {
      const int r = SegmentExponent(dm, exps, valid, s0, s1, c);
      const int64_t j0 = c * dm.block, j1 = std::min(j0 + dm.block, d);
      std::fill(factor + j0, factor + j1, pow2_float(r + dm.p_exp));
      for (int64_t s = s0; s < s1; s += 2) {
        const bool has[2] = {valid == nullptr || valid[s] != 0,
                             s + 1 < s1 && (valid == nullptr || valid[s + 1] != 0)};
        int32_t* wrow = out->w + (s / 2) * dm.dpad;
        for (int64_t j = j0; j < j1; j += 32) {
          const int64_t cols = std::min<int64_t>(32, j1 - j);
          const __mmask32 m = cols >= 32 ? ~0u : (1u << cols) - 1u;
          __m512i x[2];
          for (int i = 0; i < 2; ++i) {
            x[i] = _mm512_setzero_si512();
            if (!has[i]) continue;
            const __m512i wide =
                _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, v + (s + i) * v_row + j));
            x[i] = ShiftRoundEven16(wide, r - exps[(s + i) * dm.nb + c]);
          }
          const __m512i lo = _mm512_permutex2var_epi16(x[0], lo_idx, x[1]);
          const __m512i hi = _mm512_permutex2var_epi16(x[0], hi_idx, x[1]);
          if (cols == 32) {
            _mm512_storeu_si512(wrow + j, lo);
            _mm512_storeu_si512(wrow + j + 16, hi);
          } else {
            const auto m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
            const auto m1 = static_cast<__mmask16>(cols > 16 ? (1u << (cols - 16)) - 1u : 0u);
            _mm512_mask_storeu_epi32(wrow + j, m0, lo);
            _mm512_mask_storeu_epi32(wrow + j + 16, m1, hi);
          }
        }
      }
    }
  }
}

}  // namespace

void PrepareV(Isa isa, const PvDims& dm, const int8_t* v, int64_t v_row, const float* vs,
              int64_t s_row, const uint8_t* valid, PreparedV* out) {
  thread_local std::vector<int> exps;
  exps.resize(static_cast<size_t>(dm.s * dm.nb));
  for (int64_t s = 0; s < dm.s; ++s)
    for (int64_t c = 0; c < dm.nb; ++c) exps[s * dm.nb + c] = pow2_exponent(vs[s * s_row + c]);
  if (isa >= kAvx512) return PrepareVAvx512(dm, v, v_row, exps.data(), valid, out);
  auto* w16 = reinterpret_cast<int16_t*>(out->w);
  std::memset(out->w, 0, sizeof(int32_t) * dm.pairs * dm.dpad);
  std::fill(out->factor, out->factor + dm.nseg * dm.dpad, 0.0f);
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t s0 = g * dm.seg, s1 = std::min(s0 + dm.seg, dm.s);
    for (int64_t c = 0; c < dm.nb; ++c) {
      const int r = SegmentExponent(dm, exps.data(), valid, s0, s1, c);
      const int64_t j0 = c * dm.block, j1 = std::min(j0 + dm.block, dm.d);
      const float f = pow2_float(r + dm.p_exp);
      for (int64_t j = j0; j < j1; ++j) out->factor[g * dm.dpad + j] = f;
      for (int64_t s = s0; s < s1; ++s) {
        if (valid != nullptr && !valid[s]) continue;  // w = 0 (memset above)
        const int shift = r - exps[s * dm.nb + c];  // <= 0: left shift by up to 8
        for (int64_t j = j0; j < j1; ++j)
          w16[((s >> 1) * dm.dpad + j) * 2 + (s & 1)] =
              static_cast<int16_t>(shift_round_even(v[s * v_row + j], shift));
      }
    }
  }
}

namespace {

void ScalarHead(const PvDims& dm, const uint8_t* p, const PreparedV& pv, const RowOut& out) {
  const auto* w16 = reinterpret_cast<const int16_t*>(pv.w);
  for (int64_t m = 0; m < dm.m; ++m) {
    float* y = out.row(m);
    for (int64_t j = 0; j < dm.d; ++j) y[j] = 0.0f;
    for (int64_t g = 0; g < dm.nseg; ++g) {
      const int64_t s0 = g * dm.seg, s1 = std::min(s0 + dm.seg, dm.s);
      for (int64_t j = 0; j < dm.d; ++j) {
        int32_t a = 0;
        for (int64_t s = s0; s < s1; ++s)
          a += static_cast<int32_t>(p[m * dm.s + s]) *
               static_cast<int32_t>(w16[((s >> 1) * dm.dpad + j) * 2 + (s & 1)]);
        y[j] = y[j] + static_cast<float>(a) * pv.factor[g * dm.dpad + j];
      }
    }
  }
}

// p rows as dword pairs (p[2t] | p[2t+1] << 16), zero padded to `pairs`.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void PairRows(const PvDims& dm, const uint8_t* p,
                                                           int64_t m0, int64_t rows,
                                                           int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = p + (m0 + r) * dm.s;
    int32_t* dst = out + r * dm.pairs;
    int64_t s = 0;
    for (; s + 32 <= dm.s; s += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + s));
      _mm512_storeu_si512(dst + s / 2, _mm512_cvtepu8_epi16(b));
    }
    if (s < dm.s) {
      const __mmask32 k = (dm.s - s) >= 32 ? ~0u : ((1u << (dm.s - s)) - 1u);
      const __m256i b = _mm256_maskz_loadu_epi8(k, src + s);
      const __m512i wide = _mm512_cvtepu8_epi16(b);
      const int64_t left = dm.pairs - s / 2;  // dwords still to write (<= 16)
      _mm512_mask_storeu_epi32(dst + s / 2, static_cast<__mmask16>((1u << left) - 1u), wide);
    }
  }
}

// MR rows x 2 column vectors (32 columns), one segment loop; cols = valid columns in the
// 32-wide tile, for the masked store.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void Tile(const PvDims& dm,
                                                                 const int32_t* prow,
                                                                 const PreparedV& pv,
                                                                 int64_t j0, int nv,
                                                                 __mmask16 mask_last,
                                                                 float** yrows) {
  __m512 y[MR][2];
  for (int r = 0; r < MR; ++r) y[r][0] = y[r][1] = _mm512_setzero_ps();
  const int64_t seg_pairs = dm.seg / 2;
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t t0 = g * seg_pairs, t1 = std::min(t0 + seg_pairs, dm.pairs);
    __m512i a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    const int32_t* wp = pv.w + t0 * dm.dpad + j0;
    for (int64_t t = t0; t < t1; ++t, wp += dm.dpad) {
      const __m512i w0 = _mm512_loadu_si512(wp);
      const __m512i w1 = nv > 1 ? _mm512_loadu_si512(wp + 16) : _mm512_setzero_si512();
      for (int r = 0; r < MR; ++r) {
        const __m512i pr = _mm512_set1_epi32(prow[r * dm.pairs + t]);
        a[r][0] = _mm512_dpwssd_epi32(a[r][0], pr, w0);
        if (nv > 1) a[r][1] = _mm512_dpwssd_epi32(a[r][1], pr, w1);
      }
    }
    const float* f = pv.factor + g * dm.dpad + j0;
    const __m512 f0 = _mm512_loadu_ps(f);
    const __m512 f1 = nv > 1 ? _mm512_loadu_ps(f + 16) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      y[r][0] = _mm512_add_ps(y[r][0], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][0]), f0));
      if (nv > 1)
        y[r][1] = _mm512_add_ps(y[r][1], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][1]), f1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* dst = yrows[r] + j0;
    if (nv == 1) {
      _mm512_mask_storeu_ps(dst, mask_last, y[r][0]);
    } else {
      _mm512_storeu_ps(dst, y[r][0]);
      _mm512_mask_storeu_ps(dst + 16, mask_last, y[r][1]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void Avx512Head(const PvDims& dm,
                                                                       const uint8_t* p,
                                                                       const PreparedV& pv,
                                                                       const RowOut& out) {
  constexpr int kMR = 4;
  thread_local std::vector<char> pbuf;
  int32_t* prow = Scratch<int32_t>(pbuf, static_cast<size_t>(kMR * dm.pairs));
  for (int64_t m0 = 0; m0 < dm.m; m0 += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, dm.m - m0));
    PairRows(dm, p, m0, rows, prow);
    float* yrows[kMR];
    for (int r = 0; r < rows; ++r) yrows[r] = out.row(m0 + r);
    for (int64_t j0 = 0; j0 < dm.d; j0 += 32) {
      const int64_t cols = std::min<int64_t>(32, dm.d - j0);
      const int nv = cols > 16 ? 2 : 1;
      const int64_t last = cols - 16 * (nv - 1);
      const auto mask = static_cast<__mmask16>(last >= 16 ? 0xFFFFu : (1u << last) - 1u);
      switch (rows) {
        case 4: Tile<4>(dm, prow, pv, j0, nv, mask, yrows); break;
        case 3: Tile<3>(dm, prow, pv, j0, nv, mask, yrows); break;
        case 2: Tile<2>(dm, prow, pv, j0, nv, mask, yrows); break;
        default: Tile<1>(dm, prow, pv, j0, nv, mask, yrows); break;
      }
    }
  }
}

#define BCT_AVX2 __attribute__((target("avx2,fma")))

// PairRows for AVX2: p rows as dword pairs, zero padded to `pairs`.
BCT_AVX2 void PairRowsAvx2(const PvDims& dm, const uint8_t* p, int64_t m0, int64_t rows,
                           int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = p + (m0 + r) * dm.s;
    int32_t* dst = out + r * dm.pairs;
    int64_t s = 0;
    for (; s + 16 <= dm.s; s += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s / 2), _mm256_cvtepu8_epi16(b));
    }
    for (; s < dm.s; s += 2)
      dst[s / 2] = src[s] | (s + 1 < dm.s ? static_cast<int32_t>(src[s + 1]) << 16 : 0);
  }
}

// Keeps a rounded product from being contracted into the addition after it.
BCT_AVX2 inline __m256 Rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// MR rows x 16 columns (two ymm of int32), vpmaddwd on the int16 pairs of p and w (exact:
// |p0 w0 + p1 w1| <= 2 * 255 * 2^15), int32 per segment, then the float32 step of every
// segment into yt [MR][16] in L1; cols = valid columns for the store.
template <int MR>
BCT_AVX2 void TileAvx2(const PvDims& dm, const int32_t* prow, const PreparedV& pv, int64_t j0,
                       int64_t cols, float** yrows) {
  alignas(32) float yt[MR][16] = {};
  const int64_t seg_pairs = dm.seg / 2;
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t t0 = g * seg_pairs, t1 = std::min(t0 + seg_pairs, dm.pairs);
    __m256i a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    const int32_t* wp = pv.w + t0 * dm.dpad + j0;
    for (int64_t t = t0; t < t1; ++t, wp += dm.dpad) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 8));
      for (int r = 0; r < MR; ++r) {
        const __m256i pr = _mm256_set1_epi32(prow[r * dm.pairs + t]);
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(pr, w0));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(pr, w1));
      }
    }
    const float* f = pv.factor + g * dm.dpad + j0;
    const __m256 f0 = _mm256_loadu_ps(f), f1 = _mm256_loadu_ps(f + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 u0 = Rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(a[r][0]), f0));
      const __m256 u1 = Rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(a[r][1]), f1));
      _mm256_store_ps(yt[r], _mm256_add_ps(_mm256_load_ps(yt[r]), u0));
      _mm256_store_ps(yt[r] + 8, _mm256_add_ps(_mm256_load_ps(yt[r] + 8), u1));
    }
  }
  for (int r = 0; r < MR; ++r)
    std::memcpy(yrows[r] + j0, yt[r], sizeof(float) * static_cast<size_t>(cols));
}

BCT_AVX2 void Avx2Head(const PvDims& dm, const uint8_t* p, const PreparedV& pv,
                       const RowOut& out) {
  constexpr int kMR = 4;
  thread_local std::vector<char> pbuf;
  int32_t* prow = Scratch<int32_t>(pbuf, static_cast<size_t>(kMR * dm.pairs));
  for (int64_t m0 = 0; m0 < dm.m; m0 += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, dm.m - m0));
    PairRowsAvx2(dm, p, m0, rows, prow);
    float* yrows[kMR];
    for (int r = 0; r < rows; ++r) yrows[r] = out.row(m0 + r);
    for (int64_t j0 = 0; j0 < dm.d; j0 += 16) {
      const int64_t cols = std::min<int64_t>(16, dm.d - j0);
      switch (rows) {
        case 4: TileAvx2<4>(dm, prow, pv, j0, cols, yrows); break;
        case 3: TileAvx2<3>(dm, prow, pv, j0, cols, yrows); break;
        case 2: TileAvx2<2>(dm, prow, pv, j0, cols, yrows); break;
        default: TileAvx2<1>(dm, prow, pv, j0, cols, yrows); break;
      }
    }
  }
}

}  // namespace

void Head(Isa isa, const PvDims& dm, const uint8_t* p, const PreparedV& pv, const RowOut& out) {
  if (isa >= kAvx512)
    Avx512Head(dm, p, pv, out);
  else if (isa == kAvx2)
    Avx2Head(dm, p, pv, out);
  else
    ScalarHead(dm, p, pv, out);
}

}  // namespace pv
}  // namespace bct
