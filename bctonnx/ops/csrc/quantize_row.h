// Activation quantization shared by the kernels: BlockQuantize's rule (ref_quant.py, "Scale
// choice" and "Codes"), bit for bit, on one row.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"
#include "platform.h"
#include "simd.h"

namespace bct {

// Codes of one row of `d` floats in blocks of `b` along it: q[i] = clamp(rne(x[i] / 2^e),
// -qmax, qmax) with qmax = 2^(bits-1) - 1 and e per block the smallest in [-128, 127] with
// fl32(max|x| / qmax) <= 2^e; exps[blk] = e. Throws std::runtime_error("input contains NaN or
// infinity" / "values too large ...") without an op prefix (the caller's error adds its name).
void QuantizeRow(Isa isa, const float* x, int64_t d, int64_t b, int bits, int8_t* q, int* exps);

// The exponent e of one block from its max |x| (finite, >= 0): the smallest e in [-128, 127]
// with fl32(amax / qmax) <= 2^e. Throws as QuantizeRow on NaN / infinity or e > 127.
int BlockExponent(float amax, float qmax);

// BlockExponent for a finite amax, inline: the normal quotients here, the others (zero aside:
// subnormal, or an exponent beyond 127, which throws) through BlockExponent itself.
inline int BlockExponentInline(float amax, float qmax) {
  const float ideal = amax / qmax;  // float32 division, as the reference
  uint32_t bits;
  std::memcpy(&bits, &ideal, sizeof bits);
  const int field = static_cast<int>(bits >> 23);  // ideal >= 0: no sign bit
  if (field == 0 && bits == 0) return -128;
  if (field == 0 || field >= 254) return BlockExponent(amax, qmax);
  const int e = field - 127 + ((bits & 0x7FFFFFu) != 0 ? 1 : 0);
  return e < -128 ? -128 : e;
}

#if defined(__x86_64__) || defined(_M_X64)
// The codes step of QuantizeRow on 16 floats of a block with exponent e: rne(x / 2^e) clamped
// to [-qmax, qmax], as int32 lanes (x * 2^-e when 2^-e is a float32, which is the same real
// number rounded once; e = -128 divides, as the reference does). Every AVX-512 path of the
// rule (QuantizeRow, the fused attention scores) goes through this one function.
__attribute__((target("avx512f,avx512bw,avx512dq"))) inline __m512i Pow2CodesAvx512(
    __m512 x, int e, float qmax) {
  const bool divide = e < -127;
  const __m512 s = _mm512_set1_ps(divide ? pow2_float(e) : pow2_float(-e));
  __m512 v = divide ? _mm512_div_ps(x, s) : _mm512_mul_ps(x, s);
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-qmax)), _mm512_set1_ps(qmax));
  return _mm512_cvtps_epi32(v);
}
#endif

}  // namespace bct
