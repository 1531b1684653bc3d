// Activation quantization (quantize_row.h): the scalar, AVX2 and AVX-512 forms of one rule.
#include "quantize_row.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "simd.h"

namespace bct {
namespace {

[[noreturn]] void Throw(const char* what) { throw std::runtime_error(what); }

// Smallest e with 2^e >= ideal, for a finite ideal >= 0; -128 for ideal == 0 (then clamped).
int CeilLog2(float ideal) {
  if (ideal == 0.0f) return -128;
  uint32_t bits;
  std::memcpy(&bits, &ideal, sizeof bits);
  const int field = static_cast<int>((bits >> 23) & 0xFF);
  if (field != 0 && field != 0xFF) {  // normal: 2^(field-127) * 1.mantissa
    return field - 127 + ((bits & 0x7FFFFF) != 0 ? 1 : 0);
  }
  int k = 0;
  const float m = std::frexp(ideal, &k);  // subnormal (or inf): ideal = m * 2^k, m in [0.5, 1)
  return m == 0.5f ? k - 1 : k;
}

// round_half_even(v) for |v| < 2^22 in the default rounding mode (adding and removing 1.5*2^23
// leaves the integer part, rounded to nearest even; the compiler may not drop it without
// -ffast-math). Codes are |x / 2^e| <= qmax * (1 + 2^-23), far inside that range.
inline float RoundEven(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// Codes of one row, blocks of B along the row: q[i] = clamp(rne(x[i] / 2^e), -qmax, qmax).
void QuantizeRowScalar(const float* x, int64_t d, int64_t b, float qmax, int8_t* q, int* exps) {
  for (int64_t begin = 0, blk = 0; begin < d; begin += b, ++blk) {
    const int64_t end = std::min(d, begin + b);
    float amax = 0.0f;
    bool bad = false;
    for (int64_t i = begin; i < end; ++i) {
      const float a = std::fabs(x[i]);
      bad |= !(a <= FLT_MAX);
      amax = std::max(amax, a);
    }
    if (bad) Throw("input contains NaN or infinity");
    const int e = BlockExponent(amax, qmax);
    exps[blk] = e;
    const float s = pow2_float(e);
    for (int64_t i = begin; i < end; ++i) {
      float v = RoundEven(x[i] / s);
      v = std::min(std::max(v, -qmax), qmax);
      q[i] = static_cast<int8_t>(v);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512dq"))) void QuantizeRowAvx512(
    const float* x, int64_t d, int64_t b, float qmax, int8_t* q, int* exps) {
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  const int64_t nb = (d + b - 1) / b;
  // three passes over the row (block maxima, exponents, codes): no vector -> scalar ->
  // vector dependency per block
  float amax_stack[64];
  std::vector<float> amax_heap;
  float* amax = amax_stack;
  if (nb > 64) {
    amax_heap.resize(static_cast<size_t>(nb));
    amax = amax_heap.data();
  }
  __mmask16 bad = 0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t begin = blk * b, end = std::min(d, begin + b);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t n = std::min<int64_t>(16, end - i);
      const __mmask16 m = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(m, x + i), sign_off);
      bad |= _mm512_mask_cmp_ps_mask(m, a, fmax, _CMP_NLE_UQ);  // NaN or > FLT_MAX
      vmax = _mm512_max_ps(vmax, a);
    }
    amax[blk] = _mm512_reduce_max_ps(vmax);
  }
  if (bad) Throw("input contains NaN or infinity");
  // BlockExponent of 16 blocks at once: CeilLog2(fl32(amax / qmax)) from the float's bits
  // (normal: exponent field - 127, + 1 if any mantissa bit; zero: -128); subnormal quotients
  // and exponents above 127 (an error) go through BlockExponent itself
  int64_t blk = 0;
  const __m512 vqmax = _mm512_set1_ps(qmax);
  const __m512i mant_bits = _mm512_set1_epi32(0x7FFFFF), bias = _mm512_set1_epi32(127);
  const __m512i lowest = _mm512_set1_epi32(-128), top = _mm512_set1_epi32(127);
  const __m512i zero = _mm512_setzero_si512();
  for (; blk + 16 <= nb; blk += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(amax + blk), vqmax));
    const __m512i field = _mm512_srli_epi32(bits, 23);  // amax >= 0: no sign bit
    const __mmask16 frac = _mm512_test_epi32_mask(bits, mant_bits);
    const __m512i unbiased = _mm512_sub_epi32(field, bias);
    __m512i e = _mm512_mask_add_epi32(unbiased, frac, unbiased, _mm512_set1_epi32(1));
    e = _mm512_mask_mov_epi32(_mm512_max_epi32(e, lowest), _mm512_cmpeq_epi32_mask(bits, zero),
                              lowest);
    _mm512_storeu_si512(exps + blk, e);
    const __mmask16 odd = (_mm512_cmpeq_epi32_mask(field, zero) & frac) |  // subnormal
                          _mm512_cmpgt_epi32_mask(e, top);
    for (uint32_t m = odd; m; m &= m - 1) {
      const int64_t i = blk + __builtin_ctz(m);
      exps[i] = BlockExponent(amax[i], qmax);
    }
  }
  for (; blk < nb; ++blk) exps[blk] = BlockExponent(amax[blk], qmax);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t begin = blk * b, end = std::min(d, begin + b);
    const int e = exps[blk];
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t n = std::min<int64_t>(16, end - i);
      const __mmask16 m = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
      _mm512_mask_cvtepi32_storeu_epi8(q + i, m, Pow2CodesAvx512(xv, e, qmax));
    }
  }
}

__attribute__((target("avx2,fma"))) void QuantizeRowAvx2(const float* x, int64_t d, int64_t b,
                                                         float qmax, int8_t* q, int* exps) {
  const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(FLT_MAX);
  const __m256 vq = _mm256_set1_ps(qmax), vnq = _mm256_set1_ps(-qmax);
  for (int64_t begin = 0, blk = 0; begin < d; begin += b, ++blk) {
    const int64_t end = std::min(d, begin + b);
    __m256 vmax = _mm256_setzero_ps();
    int bad = 0;
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), sign_off);
      bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));
      vmax = _mm256_max_ps(vmax, a);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm_cvtss_f32(m4);  // (max is exact: any order)
    for (; i < end; ++i) {
      const float a = std::fabs(x[i]);
      bad |= !(a <= FLT_MAX);
      amax = std::max(amax, a);
    }
    if (bad) Throw("input contains NaN or infinity");
    const int e = BlockExponentInline(amax, qmax);
    exps[blk] = e;
    const float sf = pow2_float(e);
    const bool divide = e < -127;  // see QuantizeRowAvx512
    const __m256 s = _mm256_set1_ps(divide ? sf : pow2_float(-e));
    i = begin;
    for (; i + 8 <= end; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      __m256 v = divide ? _mm256_div_ps(xv, s) : _mm256_mul_ps(xv, s);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(v, vnq), vq);
      // codes within [-qmax, qmax]: the saturating packs keep them as they are
      const __m256i c = _mm256_cvtps_epi32(v);
      const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(c16, c16));
    }
    for (; i < end; ++i) {
      float v = RoundEven(x[i] / sf);
      v = std::min(std::max(v, -qmax), qmax);
      q[i] = static_cast<int8_t>(v);
    }
  }
}

}  // namespace

int BlockExponent(float amax, float qmax) {
  if (!(amax <= FLT_MAX)) Throw("input contains NaN or infinity");
  const int e = std::max(CeilLog2(amax / qmax), -128);  // float32 division, as the reference
  if (e > 127) Throw("values too large for a pow2 scale (max |x| / qmax beyond 2^127)");
  return e;
}

void QuantizeRow(Isa isa, const float* x, int64_t d, int64_t b, int bits, int8_t* q, int* exps) {
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  if (isa >= kAvx512)
    QuantizeRowAvx512(x, d, b, qmax, q, exps);
  else if (isa == kAvx2)
    QuantizeRowAvx2(x, d, b, qmax, q, exps);
  else
    QuantizeRowScalar(x, d, b, qmax, q, exps);
}

int BestIsa() { return static_cast<int>(ChooseIsa()); }

void QuantizeRowsPow2(int isa, const float* x, int64_t rows, int64_t d, int64_t b, int bits,
                      int8_t* q, float* scales) {
  const int64_t nb = (d + b - 1) / b;
  thread_local std::vector<int> exps;
  exps.resize(static_cast<size_t>(nb));
  try {
    for (int64_t r = 0; r < rows; ++r) {
      QuantizeRow(static_cast<Isa>(isa), x + r * d, d, b, bits, q + r * d, exps.data());
      for (int64_t j = 0; j < nb; ++j) scales[r * nb + j] = pow2_float(exps[j]);
    }
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(std::string("bctonnx.BlockQuantize: ") + e.what());
  }
}

}  // namespace bct

// Which instruction set a BlockMatMul kernel created now would use, given a BCTONNX_ISA-style
// request (null = the environment's): 0 scalar, 1 avx2, 2 avx512, 3 amx; -1 for an unknown
// request. For tests and diagnostics.
extern "C" __attribute__((visibility("default"))) int bctonnx_block_matmul_isa(const char* request) {
  try {
    return static_cast<int>(bct::ChooseIsa(request ? request : std::getenv("BCTONNX_ISA")));
  } catch (const std::exception&) {
    return -1;
  }
}
