// BlockAttention's fused scores of one head (scores.h), AVX-512 VNNI.
//
// Layout: K is packed per head into panels of 16 keys, per block of d its k-steps (4 codes of
// each key, + 128 as the u8 operand of vpdpbusd) as one zmm; Q is read in place, 4 codes of a
// row broadcast per k-step. A register tile is 4 query rows x 32 keys (one score block), all of
// d: int32 sums per block, the float steps in registers, then the block's quantization of each
// row, so the float scores never reach memory.
#include "scores.h"

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../common.h"
#include "../matmul/gemm.h"
#include "../quantize_row.h"
#include "../simd.h"

namespace bct {
namespace attn {
namespace {

constexpr int kRows = 4;     // query rows per register tile
constexpr int kKeys = 32;    // keys per register tile: one score block
constexpr int kMaxD = 256;

#define BCT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

template <typename T>
T* Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

struct Scratch {
  std::vector<int32_t> kp, kc, corr;
  std::vector<int8_t> qc;
  std::vector<float> sk, qe;
};

// s rows of n bytes (every `ld` bytes) into dst, contiguous: masked 64-byte moves.
BCT_AVX512 void CopyRows(const int8_t* src, int64_t ld, int64_t s, int64_t n, int8_t* dst) {
  for (int64_t r = 0; r < s; ++r)
    for (int64_t i = 0; i < n; i += 64) {
      const int64_t left = n - i;
      const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      _mm512_mask_storeu_epi8(dst + r * n + i, m, _mm512_maskz_loadu_epi8(m, src + r * ld + i));
    }
}

// A pow2 scale, checked (pow2_exponent throws otherwise): normal powers of two by their bits,
// the rest through pow2_exponent; the same float comes back.
inline float CheckedPow2(float scale) {
  uint32_t bits;
  std::memcpy(&bits, &scale, sizeof bits);
  const uint32_t field = bits >> 23;  // with the sign bit: a negative scale is not in 1..254
  if ((bits & 0x7FFFFFu) != 0 || field == 0 || field >= 255) pow2_exponent(scale);
  return scale;
}

}  // namespace

bool FastScoresApply(Isa isa, int64_t d, int64_t block, int64_t score_block) {
  return isa >= kAvx512 && score_block == kKeys && block > 0 && block % 4 == 0 &&
         d % block == 0 && d > 0 && d <= kMaxD;
}

BCT_AVX512 void ScoresAvx512(const ScoresArgs& a) {
  const int64_t s = a.s, nb = a.d / a.block, nks = a.block / 4;
  const int64_t ntile = (s + kKeys - 1) / kKeys;  // key tiles (= score blocks)
  const int64_t npad = ntile * kKeys;
  thread_local Scratch sc;
  // K: [panel][block][kstep][16] dwords of u8 = k + 128; padding keys 0 (u8 128), scale 0
  int32_t* kp = Grow(sc.kp, static_cast<size_t>(npad * nb * nks));
  float* sk = Grow(sc.sk, static_cast<size_t>(nb * npad));
  // K's rows first copied together (independent loads: their cache misses overlap), padding
  // keys as code 0, then each panel's k-steps gathered from the copy
  const int64_t kd = nb * nks;  // dwords per key
  int32_t* kc = Grow(sc.kc, static_cast<size_t>(npad * kd));
  CopyRows(a.k, a.k_row, s, 4 * kd, reinterpret_cast<int8_t*>(kc));
  std::memset(kc + s * kd, 0, 4 * (npad - s) * kd);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t c = 0; c < s; ++c) sk[b * npad + c] = CheckedPow2(a.ks[c * a.ks_row + b]);
    std::fill(sk + b * npad + s, sk + (b + 1) * npad, 0.0f);
  }
  const __m512i rows16 = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(kd)));
  const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  for (int64_t p = 0; p < npad / 16; ++p)
    for (int64_t i = 0; i < kd; ++i) {
      const __m512i idx = _mm512_add_epi32(rows16, _mm512_set1_epi32(static_cast<int32_t>(i)));
      const __m512i four = _mm512_i32gather_epi32(idx, kc + p * 16 * kd, 4);
      _mm512_storeu_si512(kp + (p * kd + i) * 16, _mm512_xor_si512(four, offset));
    }
  // Q: its rows copied together too (the tiles read the copy); per row and block the
  // correction -128 * sum(q) and 2^E
  int32_t* corr = Grow(sc.corr, static_cast<size_t>(s * nb));
  float* qe = Grow(sc.qe, static_cast<size_t>(s * nb));
  int8_t* qc = Grow(sc.qc, static_cast<size_t>(s * a.d));
  CopyRows(a.q, a.q_row, s, a.d, qc);
  for (int64_t r = 0; r < s; ++r) {
    gemm::RowSegmentSums(qc + r * a.d, a.block, nb, kAvx512, corr + r * nb);
    for (int64_t b = 0; b < nb; ++b) {
      corr[r * nb + b] *= -128;
      qe[r * nb + b] = CheckedPow2(a.qs[r * a.qs_row + b]);
    }
  }

  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  const bool has_mul = a.ymul != nullptr;
  const __m512 mul = _mm512_set1_ps(has_mul ? *a.ymul : 1.0f);
  for (int64_t kt = 0; kt < ntile; ++kt) {
    const int64_t c0 = kt * kKeys;
    const int64_t valid = std::min<int64_t>(kKeys, s - c0);
    __mmask16 vmask[2];
    vmask[0] = static_cast<__mmask16>(valid >= 16 ? 0xFFFFu : (1u << valid) - 1u);
    vmask[1] = static_cast<__mmask16>(valid >= 32 ? 0xFFFFu : valid > 16 ? (1u << (valid - 16)) - 1u : 0u);
    __mmask16 kmask[2] = {vmask[0], vmask[1]};  // kept keys (scores of the others are 0)
    if (a.keep != nullptr)
      for (int64_t c = c0; c < c0 + valid; ++c)
        if (!a.keep[c]) kmask[(c - c0) / 16] &= static_cast<__mmask16>(~(1u << ((c - c0) % 16)));
    __m512 bias[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    if (a.bias != nullptr)
      for (int v = 0; v < 2; ++v)
        bias[v] = a.bias_s == 1 ? _mm512_set1_ps(a.bias[0])
                                : _mm512_maskz_loadu_ps(vmask[v], a.bias + c0 + 16 * v);
    const int32_t* w0 = kp + (2 * kt) * nb * nks * 16;
    const int32_t* w1 = w0 + nb * nks * 16;
    for (int64_t r0 = 0; r0 < s; r0 += kRows) {
      const int8_t* qrow[kRows];
      int64_t rr[kRows];
      for (int r = 0; r < kRows; ++r) {
        rr[r] = std::min(r0 + r, s - 1);  // rows past s: a copy of the last, not stored
        qrow[r] = qc + rr[r] * a.d;
      }
      __m512 y[kRows][2];
      for (int r = 0; r < kRows; ++r) y[r][0] = y[r][1] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m512i acc[kRows][2];
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        const int32_t* wb0 = w0 + b * nks * 16;
        const int32_t* wb1 = w1 + b * nks * 16;
#pragma GCC unroll 8
        for (int64_t ks = 0; ks < nks; ++ks) {
          const __m512i k0 = _mm512_loadu_si512(wb0 + ks * 16);
          const __m512i k1 = _mm512_loadu_si512(wb1 + ks * 16);
          for (int r = 0; r < kRows; ++r) {
            int32_t four;
            std::memcpy(&four, qrow[r] + b * a.block + 4 * ks, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            acc[r][0] = Dpbusd(acc[r][0], k0, xb);
            acc[r][1] = Dpbusd(acc[r][1], k1, xb);
          }
        }
        const __m512 sw0 = _mm512_loadu_ps(sk + b * npad + c0);
        const __m512 sw1 = _mm512_loadu_ps(sk + b * npad + c0 + 16);
        for (int r = 0; r < kRows; ++r) {
          const __m512i cr = _mm512_set1_epi32(corr[rr[r] * nb + b]);
          const __m512 e = _mm512_set1_ps(qe[rr[r] * nb + b]);
          const __m512 u0 = Rounded(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][0], cr)), sw0));
          const __m512 u1 = Rounded(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][1], cr)), sw1));
          y[r][0] = _mm512_fmadd_ps(u0, e, y[r][0]);  // exact product by 2^E
          y[r][1] = _mm512_fmadd_ps(u1, e, y[r][1]);
        }
      }
      const int rows = static_cast<int>(std::min<int64_t>(kRows, s - r0));
      // the 4 rows' finished scores (rows past s repeat the last one: harmless below)
      __m512 v[kRows][2], m[kRows];
      __mmask16 bad = 0;
      for (int r = 0; r < kRows; ++r) {
        for (int h = 0; h < 2; ++h) {
          __m512 x = y[r][h];
          if (has_mul) x = Rounded(_mm512_mul_ps(x, mul));
          if (a.bias != nullptr) x = _mm512_add_ps(x, bias[h]);
          v[r][h] = _mm512_maskz_mov_ps(kmask[h], x);  // dropped and padding keys: 0
        }
        const __m512 a0 = _mm512_and_ps(v[r][0], sign_off), a1 = _mm512_and_ps(v[r][1], sign_off);
        bad |= _mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ);
        m[r] = _mm512_max_ps(a0, a1);
      }
      if (bad) throw std::runtime_error("input contains NaN or infinity");
      // the 4 rows' maxima at once: halves, then 128-bit lanes, then within a lane
      const __m512 t01 = _mm512_max_ps(_mm512_shuffle_f32x4(m[0], m[1], 0x44),
                                       _mm512_shuffle_f32x4(m[0], m[1], 0xEE));
      const __m512 t23 = _mm512_max_ps(_mm512_shuffle_f32x4(m[2], m[3], 0x44),
                                       _mm512_shuffle_f32x4(m[2], m[3], 0xEE));
      __m512 u = _mm512_max_ps(_mm512_shuffle_f32x4(t01, t23, 0x88),
                               _mm512_shuffle_f32x4(t01, t23, 0xDD));  // lane r: row r
      u = _mm512_max_ps(u, _mm512_permute_ps(u, 0x4E));
      u = _mm512_max_ps(u, _mm512_permute_ps(u, 0xB1));
      const __m128 amax = _mm512_castps512_ps128(
          _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u));
      // BlockExponent of the 4 maxima (BlockExponentInline's steps; zero -> -128, subnormal
      // quotients and exponents outside [-127, 126] through the scalar form)
      const __m128i bits = _mm_castps_si128(_mm_div_ps(amax, _mm_set1_ps(127.0f)));
      const __m128i field = _mm_srli_epi32(bits, 23);
      const __m128i frac = _mm_and_si128(bits, _mm_set1_epi32(0x7FFFFF));
      __m128i e4 = _mm_sub_epi32(field, _mm_set1_epi32(127));
      e4 = _mm_mask_add_epi32(e4, _mm_test_epi32_mask(frac, frac), e4, _mm_set1_epi32(1));
      alignas(16) int32_t ev[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(ev), e4);
      const __mmask8 odd = _mm_cmpeq_epi32_mask(field, _mm_setzero_si128()) |
                           _mm_cmpgt_epi32_mask(e4, _mm_set1_epi32(126)) |
                           _mm_cmplt_epi32_mask(e4, _mm_set1_epi32(-127));
      for (int r = 0; r < rows; ++r) {
        const int e = (odd >> r) & 1 ? BlockExponentInline(amax[r], 127.0f) : ev[r];
        const __m512i c0v = Pow2CodesAvx512(v[r][0], e, 127.0f);
        const __m512i c1v = Pow2CodesAvx512(v[r][1], e, 127.0f);
        const __m256i codes = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm512_cvtepi32_epi8(c0v)), _mm512_cvtepi32_epi8(c1v), 1);
        int8_t* out = a.codes + (r0 + r) * s + c0;
        if (valid == kKeys)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), codes);
        else
          _mm256_mask_storeu_epi8(out, static_cast<__mmask32>(vmask[0] | (uint32_t{vmask[1]} << 16)), codes);
        a.ex[(r0 + r) * ntile + kt] = static_cast<int16_t>(e);
      }
    }
  }
}

}  // namespace attn
}  // namespace bct
