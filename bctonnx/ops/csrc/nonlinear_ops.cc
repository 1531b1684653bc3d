// IntGelu, IntSoftmax, IntLayerNorm: integer kernels, bit-exact with their numpy references in
// bctonnx/ops/ref_nonlinear.py (the specification: read it first; the comments below name the
// step of the reference each piece implements).
//
// Data path: integers only. Per element everything is int32/uint32 (bounds: see the reference's
// docstrings); per row int64 and, for LayerNorm's variance, unsigned __int128. The only floating
// point is the construction of GELU's constant table (float64 with + - * / in the reference's
// order, no FMA contraction), the exact float32 powers of two of the scales and the starting
// guesses of an exact integer square root (IntLayerNorm) and of an exact integer division
// (IntSoftmax's 2^62 // S), both corrected to the exact integer result.
//
// Two implementations of every row kernel, giving the same bits:
// - portable: the reference's steps literally, scalar C++ (target_clones avx2/default so the
//   compiler may vectorize it on AVX2 machines; nothing in a cloned function throws);
// - AVX-512, hand-written intrinsics, chosen at run time when the CPU has it: F/BW/VL/DQ for
//   IntSoftmax (block sizes multiple of 16), + VBMI for IntGelu's byte-table lookups (any block
//   size), + CD (lzcnt) for IntLayerNorm (block sizes multiple of 16, <= 1024).
// Rows are independent and split over ORT's intra-op thread pool (KernelContext::ParallelFor);
// scratch memory is per thread and reused across calls. Validation (shapes, pow2 scales, mask
// values) happens before the parallel section: nothing throws inside it.
// The node attribute `simd` (int, default 1; 0 = portable kernels) exists for the tests.
#include <algorithm>
#include <array>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BCT_X86 1
#include "simd.h"
#else
#define BCT_X86 0
#endif

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "the GELU table needs plain IEEE double evaluation (FLT_EVAL_METHOD == 0, e.g. SSE2)"
#endif

#if BCT_X86 && defined(__GNUC__) && !defined(__clang__)
#define BCT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BCT_CLONES
#endif
#if BCT_X86
#define BCT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define BCT_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))
#define BCT_AVX512CD __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd")))
#endif

namespace bct {
namespace {

// ------------------------------------------------------------------------------------------
// Small integer helpers

inline int bitlen_u64(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

inline int bitlen_u128(unsigned __int128 v) {
  const uint64_t hi = static_cast<uint64_t>(v >> 64);
  return hi ? 64 + bitlen_u64(hi) : bitlen_u64(static_cast<uint64_t>(v));
}

// ref: reblock. Smallest k with m <= 127 * 2^k, for 1 <= m < 2^63.
inline int fit_shift(uint64_t m) {
  const int k = bitlen_u64(m) - 7;
  const bool fits = k >= 0 ? m <= (uint64_t{127} << k) : (m << -k) <= 127;
  return fits ? k : k + 1;
}

// ref: reblock. Output exponent of a block with max |v| = m on the grid 2^g.
inline int reblock_exponent(uint64_t m, int g) {
  if (m == 0) return -128;
  return std::clamp(g + fit_shift(m), -128, 127);
}

// round_half_even(v / 2^n), __int128, 1 <= n <= 126.
inline __int128 shift_round_even_128(__int128 v, int n) {
  const __int128 q = v >> n;  // floor
  const __int128 r = v & ((static_cast<__int128>(1) << n) - 1);  // v - q * 2^n, in [0, 2^n)
  const __int128 half = static_cast<__int128>(1) << (n - 1);
  if (r > half || (r == half && (q & 1))) return q + 1;
  return q;
}

// Exact floor(sqrt(v)) for v < 2^62: a starting guess from the (correctly rounded) double
// sqrt, then exact integer corrections, so the result is the mathematical floor.
inline uint64_t isqrt_u64(uint64_t v) {
  uint64_t r = static_cast<uint64_t>(std::sqrt(static_cast<double>(v)));
  while (r * r > v) --r;
  while ((r + 1) * (r + 1) <= v) ++r;
  return r;
}

// floor(v / 2^n + 1/2) for n <= 62 (n <= 0: a left shift) (ref: shift_round_half_up).
inline int64_t shift_round_half_up(int64_t v, int n) {
  if (n <= 0) return static_cast<int64_t>(static_cast<uint64_t>(v) << (-n));
  return (v + (int64_t{1} << (n - 1))) >> n;
}

// int8 codes of one block from exact values v (|v| < 2^31) on the grid 2^g: the exponent and
// clamp(round(v / 2^(e - g)), -127, 127), rounding half to even or, kHalfUp, half up (ref:
// reblock). Portable.
template <bool kHalfUp = false>
inline void requantize_block(const int32_t* v, int n, int g, int8_t* out, float* scale) {
  int64_t m = 0;
  for (int i = 0; i < n; ++i) m = std::max<int64_t>(m, std::abs(static_cast<int64_t>(v[i])));
  const int e = reblock_exponent(static_cast<uint64_t>(m), g);
  *scale = pow2_float(e);
  const int k = e - g;
  if (m == 0) {
    std::memset(out, 0, n);
    return;
  }
  for (int i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(
        std::clamp<int64_t>(kHalfUp ? shift_round_half_up(v[i], k) : shift_round_even(v[i], k), -127, 127));
}

// Block exponents of a scale tensor, validated (pow2_exponent throws on a non-power of two).
// Normal powers of two (sign 0, mantissa 0, exponent field 1..254) are decoded in a branch-free
// loop; anything else goes through pow2_exponent (subnormals, or the error).
BCT_CLONES bool decode_pow2_exponents(const float* s, int64_t count, int16_t* e) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, s + i, sizeof bits);
    const uint32_t field = bits >> 23;  // sign must be 0
    bad |= (bits & 0x7FFFFFu) | static_cast<uint32_t>(field - 1u > 253u);
    e[i] = static_cast<int16_t>(static_cast<int32_t>(field) - 127);
  }
  return bad == 0;
}

void scale_exponents_into(const float* s, int64_t count, int16_t* e) {
  if (!decode_pow2_exponents(s, count, e))  // not all normal powers of two: exact, or the error
    for (int64_t i = 0; i < count; ++i) e[i] = static_cast<int16_t>(pow2_exponent(s[i]));
}

std::vector<int16_t> scale_exponents(const float* s, int64_t count) {
  std::vector<int16_t> e(static_cast<size_t>(count));
  scale_exponents_into(s, count, e.data());
  return e;
}

struct Blocking {
  int64_t rows = 0, d = 0, nb = 0, b = 0;
};

Blocking check_blocked(const Dims& xs, const Dims& ss, int64_t block_size, const char* op) {
  Blocking bl;
  rows_and_depth(op, xs, &bl.rows, &bl.d);
  bl.b = block_size;
  bl.nb = num_blocks(bl.d, block_size);
  const Dims want = blocked_shape(xs, block_size);
  if (ss != want)
    throw std::runtime_error(std::string(op) + ": x_scale shape must be x.shape[:-1] + [ceil(D/B)] = " +
                             shape_str(want) + ", got " + shape_str(ss));
  return bl;
}

int64_t read_block_size(const OrtKernelInfo* info, const char* op) {
  Ort::ConstKernelInfo ki(info);
  int64_t b = 0;
  try {
    b = ki.GetAttribute<int64_t>("block_size");
  } catch (const Ort::Exception&) {
    throw std::runtime_error(std::string(op) + ": attribute block_size is required");
  }
  if (b < 1 || b > 4096)
    throw std::runtime_error(std::string(op) + ": block_size must be in 1..4096, got " +
                             std::to_string(b));
  return b;
}

// AVX-512 kernels allowed? Attribute `simd` (tests only; 0 forces the portable kernels) and
// the library-wide BCTONNX_ISA cap (avx512|avx2|scalar, read when a session creates the kernel;
// avx2 and scalar mean the portable kernels here).
bool read_simd(const OrtKernelInfo* info, const char* op) {
  Ort::ConstKernelInfo ki(info);
  bool simd = true;
  try {
    simd = ki.GetAttribute<int64_t>("simd") != 0;
  } catch (const Ort::Exception&) {
  }
  if (const char* isa = std::getenv("BCTONNX_ISA"); isa && *isa) {
    if (std::strcmp(isa, "avx2") == 0 || std::strcmp(isa, "scalar") == 0) return false;
    if (std::strcmp(isa, "avx512") != 0 && std::strcmp(isa, "amx") != 0)  // no AMX code here
      throw std::runtime_error(std::string(op) + ": BCTONNX_ISA=" + isa +
                               " is not one of amx, avx512, avx2, scalar");
  }
  return simd;
}

#if BCT_X86
bool cpu_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
bool cpu_avx512vbmi() {
  static const bool ok = cpu_avx512() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}
bool cpu_avx512cd() {
  static const bool ok = cpu_avx512() && __builtin_cpu_supports("avx512cd");
  return ok;
}
#else
bool cpu_avx512() { return false; }
bool cpu_avx512vbmi() { return false; }
bool cpu_avx512cd() { return false; }
#endif

// v's storage, grown to at least n elements (never shrunk).
template <class T>
T* grow(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Per-thread scratch buffer reused across calls (grows, never shrinks): no allocation per
// row, chunk or call in steady state. (A kernel with several buffers keeps them in one
// thread-local struct instead: each thread-local lookup is a call in a shared library.)
template <class T, int Tag>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  return grow(buf, static_cast<int64_t>(n));
}

// An input's block exponents (scale_exponents), in the calling thread's scratch: valid until
// that thread's next call; the kernels' pool threads only read it while the call runs.
const int16_t* input_exponents(const float* s, int64_t count) {
  int16_t* e = scratch<int16_t, 40>(static_cast<size_t>(count) + 16);  // + 16: IntSoftmax's gathers
  scale_exponents_into(s, count, e);
  return e;
}

// 16-lane validity mask of the chunk starting at element `start` of a row of length d.
__attribute__((always_inline)) inline uint16_t lanes16(int64_t start, int64_t d) {
  const int64_t left = d - start;
  return left >= 16 ? uint16_t{0xFFFF}
                    : static_cast<uint16_t>((1u << std::max<int64_t>(left, 0)) - 1u);
}

#if BCT_X86

BCT_AVX512 inline int hmax_epi8(__m128i m) {
  m = _mm_max_epi8(m, _mm_alignr_epi8(m, m, 8));
  m = _mm_max_epi8(m, _mm_alignr_epi8(m, m, 4));
  m = _mm_max_epi8(m, _mm_alignr_epi8(m, m, 2));
  m = _mm_max_epi8(m, _mm_alignr_epi8(m, m, 1));
  return static_cast<int8_t>(_mm_cvtsi128_si32(m) & 0xFF);
}
#endif

// ------------------------------------------------------------------------------------------
// IntGelu (ref: int_gelu, gelu_table, _phi)

constexpr int kGeluF = 16;
constexpr int kGeluELo = -30;
constexpr int kGeluEHi = 3;
constexpr int kGeluNE = kGeluEHi - kGeluELo + 1;
constexpr int kGeluKMin = -6;  // |T| >= 1 -> k >= -6
constexpr int kGeluKMax = 24;  // |T| < 2^23 -> k > 24 gives zeros
constexpr int kGeluNK = kGeluKMax - kGeluKMin + 1;

// float64 table construction: the reference's operations in the reference's order.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

constexpr double kTwoOverSqrtPi = 1.1283791670955126;
constexpr double kInvSqrtPi = 0.5641895835477563;
constexpr double kInvSqrt2 = 0.7071067811865475;
constexpr double kEInv = 0.36787944117144233;
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kGeluTanhC = 0.044715;

double exp_neg(double y) {  // ref: _exp_neg, 0 <= y < 100
  const double n = std::floor(y);
  const double r = y - n;
  double s = 1.0;
  for (int k = 30; k >= 1; --k) s = 1.0 - r * s / k;
  const long ni = static_cast<long>(n);
  for (long i = 0; i < ni; ++i) s = s * kEInv;
  return s;
}

double erf_taylor(double z) {  // ref: _erf_taylor, 0 <= z < 2.5
  const double z2 = z * z;
  double term = z, s = z;
  for (int n = 1; n < 60; ++n) {
    term = term * -z2 / n;
    s = s + term / (2 * n + 1);
  }
  return s * kTwoOverSqrtPi;
}

double erfc_cf(double z) {  // ref: _erfc_cf, 2.5 <= z < 10
  double t = z;
  for (int n = 100; n >= 1; --n) t = z + (n * 0.5) / t;
  return exp_neg(z * z) * kInvSqrtPi / t;
}

double phi(double x) {  // ref: _phi
  const double z = std::fabs(x) * kInvSqrt2;
  const bool pos = x >= 0;
  if (z < 2.5) {
    const double h = erf_taylor(z);
    return pos ? 0.5 + 0.5 * h : 0.5 - 0.5 * h;
  }
  if (z < 10.0) {
    const double c = erfc_cf(z);
    return pos ? 1.0 - 0.5 * c : 0.5 * c;
  }
  return pos ? 1.0 : 0.0;
}

double phi_tanh(double x) {  // ref: _phi_tanh
  const double z = std::fabs(x);
  const double u = kSqrt2OverPi * (z + kGeluTanhC * z * z * z);
  const double y = 2.0 * u;
  double t = 1.0;
  if (y < 100.0) {
    const double e = exp_neg(y);
    t = (1.0 - e) / (1.0 + e);
  }
  return x >= 0 ? 0.5 + 0.5 * t : 0.5 - 0.5 * t;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

struct GeluTables {
  int32_t t[kGeluNE][256];                         // T[e][q + 128]
  int32_t negmax[kGeluNE];                         // max |T| over q < 0
  alignas(64) int8_t codes[kGeluNE][kGeluNK][256];  // clamp(shift_round_even(T, k), -127, 127)
};

// ref: gelu_table(approximate): the erf form, or (tanh) the tanh form.
GeluTables* make_gelu_tables(bool tanh) {
  auto* g = new GeluTables;
  for (int ei = 0; ei < kGeluNE; ++ei) {
    const int e = kGeluELo + ei;
    g->negmax[ei] = 0;
    for (int q = -128; q < 128; ++q) {
      const double qs = static_cast<double>(q) * 65536.0;
      const double x = std::ldexp(static_cast<double>(q), e);
      const double v = std::nearbyint(qs * (tanh ? phi_tanh(x) : phi(x)));
      const int32_t t = static_cast<int32_t>(v);
      g->t[ei][q + 128] = t;
      if (q < 0) g->negmax[ei] = std::max(g->negmax[ei], std::abs(t));
    }
    for (int ki = 0; ki < kGeluNK; ++ki)
      for (int q = 0; q < 256; ++q)
        g->codes[ei][ki][q] = static_cast<int8_t>(
            std::clamp<int64_t>(shift_round_even(g->t[ei][q], kGeluKMin + ki), -127, 127));
  }
  return g;
}

const GeluTables& gelu_tables(bool tanh) {  // each built once, when first asked for
  if (tanh) {
    static const GeluTables* tanh_tables = make_gelu_tables(true);
    return *tanh_tables;
  }
  static const GeluTables* erf_tables = make_gelu_tables(false);
  return *erf_tables;
}

// Per block, given the max code `hi` and whether a negative code is present: the block's
// max |T| (exact; the scan over negative codes only runs when they might dominate), its table
// row index and grid g = e - 16, and the output exponent it asks for.
struct GeluBlock {
  int64_t m;
  int ei, g, eo;
};

inline GeluBlock gelu_block(const GeluTables& tb, const int8_t* xb, int n, int e, int hi,
                            bool anyneg) {
  const int ei = std::clamp(e, kGeluELo, kGeluEHi) - kGeluELo;
  const int32_t* t = tb.t[ei];
  int64_t m = hi > 0 ? t[hi + 128] : 0;  // GELU is increasing for x > 0
  if (anyneg && m < tb.negmax[ei]) {      // negatives may dominate: exact max
    m = 0;
    for (int i = 0; i < n; ++i) m = std::max<int64_t>(m, std::abs(t[xb[i] + 128]));
  }
  const int g = e - kGeluF;
  return {m, ei, g, reblock_exponent(static_cast<uint64_t>(m), g)};
}

// The code table row of a block at output exponent eo >= its own (nullptr: all codes 0). The
// shift k = eo - g is at least the block's own, so >= kGeluKMin; beyond kGeluKMax every code
// rounds to 0.
inline const int8_t* gelu_codes_row(const GeluTables& tb, const GeluBlock& gb, int eo) {
  const int k = eo - gb.g;
  if (gb.m == 0 || k > kGeluKMax) return nullptr;
  return tb.codes[gb.ei][k - kGeluKMin];
}

// Output blocks of `per` input blocks (ref: reblock_grouped; per = 1: reblock).
struct GeluGrouping {
  int64_t per, ngrp;
};

// Each block's output exponent: the largest of its group's (gbs[b].eo is overwritten), and
// the group scales of one row.
inline void gelu_group_exponents(const Blocking& bl, GeluGrouping gr, GeluBlock* gbs, float* ys) {
  for (int64_t gi = 0; gi < gr.ngrp; ++gi) {
    const int64_t b0 = gi * gr.per, b1 = std::min(bl.nb, b0 + gr.per);
    int eo = -128;
    for (int64_t b = b0; b < b1; ++b) eo = std::max(eo, gbs[b].eo);
    for (int64_t b = b0; b < b1; ++b) gbs[b].eo = eo;
    ys[gi] = pow2_float(eo);
  }
}

// Per row: every block's max |T| (scan), the group exponents, then every block's codes from
// its table row at the group's exponent (gbs: nb entries of scratch).
BCT_CLONES void gelu_rows_portable(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                                   const int8_t* x, const int16_t* ex, int8_t* y, float* ys,
                                   int64_t r0, int64_t r1, GeluBlock* gbs) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* xb = x + r * bl.d + b * bl.b;
      int hi = -128;
      bool anyneg = false;
      for (int i = 0; i < n; ++i) {
        hi = std::max<int>(hi, xb[i]);
        anyneg |= xb[i] < 0;
      }
      gbs[b] = gelu_block(tb, xb, n, ex[r * bl.nb + b], hi, anyneg);
    }
    gelu_group_exponents(bl, gr, gbs, ys + r * gr.ngrp);
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int64_t off = r * bl.d + b * bl.b;
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* row = gelu_codes_row(tb, gbs[b], gbs[b].eo);
      for (int i = 0; i < n; ++i)
        y[off + i] = row ? row[static_cast<uint8_t>(x[off + i]) ^ 0x80u] : int8_t{0};
    }
  }
}

#if BCT_X86
// AVX-512 VBMI: the 256-entry byte table lives in four zmm registers; two vpermi2b pick from
// its halves and the index's top bit chooses.
BCT_AVX512VBMI void gelu_rows_avx512(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                                     const int8_t* x, const int16_t* ex, int8_t* y, float* ys,
                                     int64_t r0, int64_t r1, GeluBlock* gbs) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lowest = _mm512_set1_epi8(-128);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* xb = x + r * bl.d + b * bl.b;
      __m512i mx = lowest;
      __mmask64 neg = 0;
      for (int i = 0; i < n; i += 64) {
        const __mmask64 k = n - i >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (n - i)) - 1);
        const __m512i v = _mm512_mask_loadu_epi8(lowest, k, xb + i);
        mx = _mm512_max_epi8(mx, v);
        neg |= _mm512_movepi8_mask(v) & k;
      }
      __m256i m256 = _mm256_max_epi8(_mm512_castsi512_si256(mx), _mm512_extracti64x4_epi64(mx, 1));
      const int hi = hmax_epi8(
          _mm_max_epi8(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1)));
      gbs[b] = gelu_block(tb, xb, n, ex[r * bl.nb + b], hi, neg != 0);
    }
    gelu_group_exponents(bl, gr, gbs, ys + r * gr.ngrp);
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int64_t off = r * bl.d + b * bl.b;
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* row = gelu_codes_row(tb, gbs[b], gbs[b].eo);
      if (!row) {
        std::memset(y + off, 0, n);
        continue;
      }
      const __m512i t0 = _mm512_loadu_si512(row);
      const __m512i t1 = _mm512_loadu_si512(row + 64);
      const __m512i t2 = _mm512_loadu_si512(row + 128);
      const __m512i t3 = _mm512_loadu_si512(row + 192);
      for (int i = 0; i < n; i += 64) {
        const __mmask64 k = n - i >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (n - i)) - 1);
        const __m512i idx = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, x + off + i), flip);
        const __m512i lo = _mm512_permutex2var_epi8(t0, idx, t1);
        const __m512i hv = _mm512_permutex2var_epi8(t2, idx, t3);
        const __m512i res = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hv);
        _mm512_mask_storeu_epi8(y + off + i, k, res);
      }
    }
  }
}
#endif

struct IntGeluKernel {
  int64_t block_size;
  int64_t out_block_size;  // a multiple of block_size (attribute 0 or absent: the same)
  bool simd;
  bool tanh = false;  // attribute approximate: "none" (erf GELU, the default) or "tanh"
  static constexpr const char* kName = "IntGelu";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs = kInputs;  // y, y_scale
  static constexpr size_t kRequiredInputs = 2;
  IntGeluKernel(const OrtApi&, const OrtKernelInfo* info)
      : block_size(read_block_size(info, "IntGelu")), simd(read_simd(info, "IntGelu")) {
    static const int64_t kSame = 0;
    out_block_size = int_attribute(info, "IntGelu", "out_block_size", &kSame);
    if (out_block_size == 0) out_block_size = block_size;
    if (out_block_size < 0 || out_block_size % block_size)
      throw std::runtime_error("IntGelu: out_block_size must be a multiple of block_size " +
                               std::to_string(block_size) + ", got " +
                               std::to_string(out_block_size));
    std::string approximate = "none";
    try {
      approximate = Ort::ConstKernelInfo(info).GetAttribute<std::string>("approximate");
    } catch (const Ort::Exception&) {  // absent: the erf form
    }
    if (approximate != "none" && approximate != "tanh")
      throw std::runtime_error("IntGelu: approximate must be \"none\" or \"tanh\", got \"" +
                               approximate + "\"");
    tanh = approximate == "tanh";
    gelu_tables(tanh);
  }
  void Compute(OrtKernelContext* ctx) {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const Dims xshape = KernelArgs::shape(x);
    const Blocking bl = check_blocked(xshape, KernelArgs::shape(x_scale), block_size, "IntGelu");
    int8_t* yo = args.output<int8_t>(0, xshape);
    const GeluGrouping gr{out_block_size / block_size, num_blocks(bl.d, out_block_size)};
    float* so = args.output<float>(1, blocked_shape(xshape, out_block_size));
    if (bl.rows == 0 || bl.d == 0) return;
    const int16_t* ex = input_exponents(KernelArgs::data<float>(x_scale), bl.rows * bl.nb);
    const GeluTables& tb = gelu_tables(tanh);
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    const bool fast = simd && cpu_avx512vbmi();
    parallel_rows(ctx, bl.rows, bl.d, [&](int64_t r0, int64_t r1) {
      GeluBlock* gbs = scratch<GeluBlock, 1>(static_cast<size_t>(bl.nb));  // one row's blocks
#if BCT_X86
      if (fast) return gelu_rows_avx512(tb, bl, gr, xi, ex, yo, so, r0, r1, gbs);
#endif
      gelu_rows_portable(tb, bl, gr, xi, ex, yo, so, r0, r1, gbs);
    });
  }
};

#if BCT_X86
// Horizontal reductions of 16 vectors of 16 dwords at once (a transposed tree: 45 shuffles /
// ops instead of 16 separate reductions); lane j of the result reduces v[order[j]] (order:
// tree_inverse). `op` is an associative, commutative lane-wise operation (max, add).
template <class Op>
BCT_AVX512 __attribute__((always_inline)) inline __m512i tree16(const int32_t* p, Op op) {
  __m512i v[16], x[8], y[4], z[2];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(p + 16 * i);
  for (int i = 0; i < 8; ++i)
    x[i] = op(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0x44),
              _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = op(_mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], 0x88),
              _mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = op(_mm512_unpacklo_epi64(y[2 * i], y[2 * i + 1]), _mm512_unpackhi_epi64(y[2 * i], y[2 * i + 1]));
  const __m512 a = _mm512_castsi512_ps(z[0]), b = _mm512_castsi512_ps(z[1]);
  return op(_mm512_castps_si512(_mm512_shuffle_ps(a, b, 0x88)), _mm512_castps_si512(_mm512_shuffle_ps(a, b, 0xDD)));
}
struct MaxU32 {
  BCT_AVX512 __m512i operator()(__m512i a, __m512i b) const { return _mm512_max_epu32(a, b); }
};
struct AddI32 {
  BCT_AVX512 __m512i operator()(__m512i a, __m512i b) const { return _mm512_add_epi32(a, b); }
};

// Lane permutation putting tree16's result in vector order (lane j reduces v[j]); found once by
// running the tree on constant vectors.
struct TreeInverse {
  alignas(64) int32_t inv[16];
};
BCT_AVX512 TreeInverse make_tree_inverse() {
  std::array<int32_t, 256> v;
  for (int i = 0; i < 256; ++i) v[i] = i / 16;
  alignas(64) int32_t order[16];
  _mm512_store_si512(order, tree16(v.data(), MaxU32{}));
  TreeInverse t{};
  for (int j = 0; j < 16; ++j) t.inv[order[j]] = j;
  return t;
}
const TreeInverse& tree_inverse() {
  static const TreeInverse t = make_tree_inverse();
  return t;
}
#endif

// ------------------------------------------------------------------------------------------
// IntSoftmax (ref: int_softmax, exp2_neg_q16)

constexpr int64_t kLog2eQ30 = 1549082005;
constexpr int64_t kTSat = int64_t{1} << 21;  // huge-score branch: n = 32 -> E = 0
constexpr uint32_t kC0 = 65535, kC1 = 45420, kC2 = 15693, kC3 = 3488, kC4 = 448;

// c_b = shift_round_even(round(log2 e * 2^30), 10 + delta) for delta = e_top - e_b >= 0
// (0 from delta = 22 on).
constexpr int32_t log2e_coef_at(int n) {
  const int64_t q = kLog2eQ30 >> n, r = kLog2eQ30 - (q << n), half = int64_t{1} << (n - 1);
  return static_cast<int32_t>((r > half || (r == half && (q & 1))) ? q + 1 : q);
}
struct Log2eCoefs {
  alignas(64) int32_t c[32];  // 0 from delta = 22 on
};
constexpr Log2eCoefs kLog2eCoef = [] {
  Log2eCoefs t{};
  for (int i = 0; i < 22; ++i) t.c[i] = log2e_coef_at(10 + i);
  return t;
}();
inline int32_t log2e_coef(int delta) { return delta < 32 ? kLog2eCoef.c[delta] : 0; }

// ~65536 * 2^(-f/65536), f in [0, 65536): ref exp2_neg_q16 (every operand < 2^16).
inline uint32_t exp2_neg_q16(uint32_t f) {
  uint32_t acc = kC4;
  acc = kC3 - ((f * acc) >> 16);
  acc = kC2 - ((f * acc) >> 16);
  acc = kC1 - ((f * acc) >> 16);
  return kC0 - ((f * acc) >> 16);
}

// Mask information per distinct mask row: unmasked flags, per block any/all, per row any.
struct MaskRows {
  bool present = false;
  int64_t padded = 0;               // nb * B rounded up to 16
  std::vector<uint8_t> flags;       // [mask rows, padded], 1 = unmasked (padding: 0)
  std::vector<uint16_t> bits;       // the same as 16-bit lane masks
  std::vector<uint8_t> block_any;   // [mask rows, nb]
  std::vector<uint8_t> row_any;     // [mask rows]
  std::vector<int64_t> row_of;      // x row -> mask row (empty: one mask row for all)
  int64_t steps = 0;                // 32-lane steps per row
  std::vector<uint32_t> valid32;    // [steps]: lanes inside the row
  std::vector<uint32_t> k32;        // [mask rows, steps]: valid and unmasked lanes
};

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

// Fills `mr` (a thread's MaskRows, reused across calls: its vectors keep their memory, so a
// call allocates nothing once they are large enough).
void build_mask(const Blocking& bl, const Dims& xshape, const OrtValue* mask, MaskRows& mr) {
  mr.present = false;
  mr.row_of.clear();
  mr.padded = (bl.nb * bl.b + 31) / 32 * 32;
  mr.steps = (bl.d + 31) / 32;
  mr.valid32.resize(static_cast<size_t>(mr.steps));
  for (int64_t st = 0; st < mr.steps; ++st)
    mr.valid32[st] = uint32_t{lanes16(st * 32, bl.d)} | (uint32_t{lanes16(st * 32 + 16, bl.d)} << 16);
  if (mask == nullptr) return;
  mr.present = true;
  const Dims ms = KernelArgs::shape(mask);
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
  const float* md = KernelArgs::data<float>(mask);
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

// Constant tables of step 2, per clamped block exponent (ref: softmax_tables): A[j] = 2^-(j a)
// and B[k] = 2^-(32 k a) in Q15 with a = 2^e log2(e); B padded to 32 entries (zeros) so one
// vpermw reads either table.
constexpr int kSmELo = -26, kSmEHi = 4, kSmTables = kSmEHi - kSmELo + 1;
struct SoftmaxTables {
  alignas(64) uint16_t a[kSmTables][32];
  alignas(64) uint16_t b[kSmTables][32];
};
// 2^-(u / 2^16) in Q`frac_bits` (<= 30), rounded half even, for u >= 0 (ref: _exp2_neg; its
// caps are applied by the callers).
inline int64_t exp2_neg_fixed(int64_t u, int frac_bits) {
  return shift_round_even(exp2_neg_q16(static_cast<uint32_t>(u & 0xFFFF)),
                          static_cast<int>(std::min<int64_t>((u >> 16) + 16 - frac_bits, 62)));
}
inline uint16_t exp2_neg_q15(int64_t u) { return static_cast<uint16_t>(std::min<int64_t>(exp2_neg_fixed(u, 15), 32767)); }
const SoftmaxTables& softmax_tables() {
  static const SoftmaxTables t = [] {
    SoftmaxTables s{};
    for (int i = 0; i < kSmTables; ++i) {
      const int sh = 14 - (kSmELo + i);  // 10..40
      for (int j = 0; j < 32; ++j) s.a[i][j] = exp2_neg_q15(shift_round_even(j * kLog2eQ30, sh));
      for (int k = 0; k < 8; ++k) s.b[i][k] = exp2_neg_q15(shift_round_even(32 * k * kLog2eQ30, sh));
    }
    return s;
  }();
  return t;
}
inline int softmax_table_index(int e) { return std::clamp(e, kSmELo, kSmEHi) - kSmELo; }

// Step 1's t_b from d_b = max(L) - L_b >= 0, sh = 4 - e_top (either sign).
inline int64_t softmax_t(int64_t d, int sh) {
  if (sh >= 0) return d >> std::min(sh, 31);
  const int shl = std::min(-sh, 31);
  return d > (kTSat >> shl) ? kTSat : (d << shl);
}

// Step 3's F_b = 2^-t in Q30 (< 2^30: no cap).
inline int64_t softmax_factor(int64_t t) { return exp2_neg_fixed(t, 30); }

// Step 4's per-block output factor: min((F_b R0) >> 45, 65535), R0 = 2^62 // S.
inline uint32_t softmax_rb(int64_t f, uint64_t r0) {
  return static_cast<uint32_t>(std::min<uint64_t>((static_cast<uint64_t>(f) * r0) >> 45, 0xFFFF));
}

// y = min(255, (h + 64) >> 7).
inline uint8_t softmax_out(uint32_t h) { return static_cast<uint8_t>(std::min<uint32_t>((h + 64) >> 7, 255)); }

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

void softmax_rows(const Blocking& bl, const int8_t* x, const int16_t* ex, const MaskRows& mr,
                  bool fast, uint8_t* y, int64_t r0, int64_t r1) {
#if BCT_X86
  if (fast) {
    switch (bl.b) {  // the preset block sizes with the per-block loops unrolled
      case 32: return softmax_rows_avx512<2>(bl, x, ex, mr, y, r0, r1);
      case 64: return softmax_rows_avx512<4>(bl, x, ex, mr, y, r0, r1);
      case 128: return softmax_rows_avx512<8>(bl, x, ex, mr, y, r0, r1);
      default: return softmax_rows_avx512<0>(bl, x, ex, mr, y, r0, r1);
    }
  }
#endif
  (void)fast;
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

struct IntSoftmaxKernel {
  int64_t block_size;
  bool simd;
  static constexpr const char* kName = "IntSoftmax";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};  // x, x_scale, mask
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
  static constexpr size_t kRequiredInputs = 2;
  IntSoftmaxKernel(const OrtApi&, const OrtKernelInfo* info)
      : block_size(read_block_size(info, "IntSoftmax")), simd(read_simd(info, "IntSoftmax")) {}
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
    build_mask(bl, xshape, mask, mr);
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    const bool fast = simd && cpu_avx512() && bl.b % 16 == 0;
    parallel_rows(ctx, bl.rows, bl.d * 4, [&](int64_t r0, int64_t r1) {
      softmax_rows(bl, xi, ex, mr, fast, yo, r0, r1);
    });
  }
};

// ------------------------------------------------------------------------------------------
// IntLayerNorm (ref: int_layernorm)

constexpr int64_t kLnMaxH = 4096;
constexpr int kLnWindow = 16;
constexpr int kZBits = 16;
constexpr int kWBits = 8;

struct LnParams {
  std::vector<int32_t> gamma;  // [nb * B] (zero padded), int32 for the vector loops
  std::vector<int32_t> gpair;  // the int16 pairs (gamma, 256 gamma), [nb * B]
  std::vector<int32_t> bterm;  // shift_round_even(beta, g - eb), [nb * B]
  std::vector<int32_t> g;      // per block: output grid (zeros after nb, to whole groups of 16)
  std::vector<int> a1;         // per block: right shift of z * gamma
  bool any_a1 = false;         // some a1 != 0
  // the AVX-512 kernel's row layout (B a multiple of 16): per 16-lane chunk its lanes inside
  // the row and its block
  std::vector<uint16_t> valid;
  std::vector<int32_t> cblock;
  uint32_t eps_mant = 0;       // epsilon = eps_mant * 2^eps_ex
  int eps_ex = 0;
};

// eps / 2^(2 e_c) rounded half even, capped at 2^100 (ref: _eps_int).
unsigned __int128 eps_int(uint32_t mant, int ex, int e_c) {
  if (mant == 0) return 0;
  const unsigned __int128 cap = static_cast<unsigned __int128>(1) << 100;
  const int sh = ex - 2 * e_c;
  if (sh >= 0) {
    if (bitlen_u64(mant) + sh > 101) return cap;
    return std::min(static_cast<unsigned __int128>(mant) << sh, cap);
  }
  return static_cast<unsigned __int128>(shift_round_even(mant, -sh));
}

// Per row after the sums: steps 2-4's row constants.
struct LnRow {
  uint32_t beta32;
  int64_t hm;  // H * m (0: constant row)
  int sh;      // 37 + j
};

inline void ln_row_constants(const Blocking& bl, const LnParams& pp, int e_c, int64_t s1,
                             int64_t s2, LnRow* out) {
  const int64_t h = bl.d;
  const unsigned __int128 vv =
      static_cast<unsigned __int128>(h) * static_cast<unsigned __int128>(s2) -
      static_cast<unsigned __int128>(static_cast<__int128>(s1) * s1) +
      static_cast<unsigned __int128>(h * h) * eps_int(pp.eps_mant, pp.eps_ex, e_c);
  // field by field (see layernorm_prologue_avx512)
  if (vv == 0) {
    out->beta32 = 0;
    out->hm = 0;
    out->sh = 0;
    return;
  }
  const int j = (bitlen_u128(vv) - 61) >> 1;  // floor (arithmetic shift)
  const uint64_t vn = static_cast<uint64_t>(j >= 0 ? vv >> (2 * j) : vv << (-2 * j));
  const uint64_t m = (uint64_t{1} << 61) / isqrt_u64(vn);
  const int sh = 45 + j - kWBits;
  out->sh = sh;
  out->hm = h * static_cast<int64_t>(m);
  out->beta32 = static_cast<uint32_t>(
      shift_round_even_128(static_cast<__int128>(s1) * static_cast<__int128>(m), sh));
}

inline uint32_t ln_alpha(const LnRow& lr, int s) {
  return lr.hm == 0 ? 0u
                    : static_cast<uint32_t>(shift_round_even(lr.hm << std::max(s, 0), lr.sh));
}

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

struct IntLayerNormKernel {
  int64_t block_size;
  bool simd;
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
  IntLayerNormKernel(const OrtApi& api, const OrtKernelInfo* info)
      : block_size(read_block_size(info, "IntLayerNorm")), simd(read_simd(info, "IntLayerNorm")) {
    Ort::ConstKernelInfo ki(info);
    try {
      epsilon = ki.GetAttribute<float>("epsilon");
    } catch (const Ort::Exception&) {
      epsilon = 1e-5f;
    }
    if (!(epsilon >= 0.0f) || !std::isfinite(epsilon))
      throw std::runtime_error("IntLayerNorm: epsilon must be finite and >= 0");
    uint32_t bits;  // epsilon = mant * 2^ex exactly
    std::memcpy(&bits, &epsilon, sizeof bits);
    const uint32_t ef = (bits >> 23) & 0xFFu, mf = bits & 0x7FFFFFu;
    eps_mant = ef == 0 ? mf : (mf | 0x800000u);
    eps_ex = ef == 0 ? -149 : static_cast<int>(ef) - 150;
    constant_affine(api, info);
  }

  // gamma/beta and their scales as constant initializers of the session (the case in every
  // model bctonnx writes): read, checked and converted once here, so a call reads only x and
  // x_scale. Anything else (inputs computed at run time, or values a call would reject) takes
  // the per-call path, which validates and reports.
  std::shared_ptr<const LnParams> const_params;
  int64_t const_h = -1;
  void constant_affine(const OrtApi& api, const OrtKernelInfo* info) {
    const OrtValue* v[4];
    for (size_t i = 0; i < 4; ++i) {
      int is_const = 0;
      OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 2 + i, &is_const, &v[i]);
      if (st != nullptr) {
        api.ReleaseStatus(st);
        return;
      }
      if (!is_const || v[i] == nullptr) return;
    }
    try {
      const int64_t h = KernelArgs::shape(v[0]).count();
      if (h < 1 || h > kLnMaxH || KernelArgs::shape(v[2]).count() != h) return;
      const Blocking bl{1, h, num_blocks(h, block_size), block_size};
      if (KernelArgs::shape(v[1]).count() != bl.nb || KernelArgs::shape(v[3]).count() != bl.nb) return;
      const_params = affine_params(KernelArgs::data<int8_t>(v[0]), KernelArgs::data<float>(v[1]),
                                   KernelArgs::data<int8_t>(v[2]), KernelArgs::data<float>(v[3]), bl);
      const_h = h;
    } catch (const std::exception&) {  // e.g. a scale that is not a power of two: per call
      const_params.reset();
    }
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
    if (const_params && h == const_h) {
      params = const_params;
    } else {
      const OrtValue* in[6] = {x, x_scale};
      for (size_t i = 2; i < 6; ++i) in[i] = args.input(i);
      if (KernelArgs::shape(in[2]).count() != h || KernelArgs::shape(in[4]).count() != h)
        throw std::runtime_error("IntLayerNorm: gamma and beta must have H = " + std::to_string(h) +
                                 " elements");
      if (KernelArgs::shape(in[3]).count() != bl.nb || KernelArgs::shape(in[5]).count() != bl.nb)
        throw std::runtime_error("IntLayerNorm: gamma_scale and beta_scale must have ceil(H/B) = " +
                                 std::to_string(bl.nb) + " elements");
      if (bl.rows > 0 && h > 0)
        params = affine_params(KernelArgs::data<int8_t>(in[2]), KernelArgs::data<float>(in[3]),
                               KernelArgs::data<int8_t>(in[4]), KernelArgs::data<float>(in[5]), bl);
    }
    int8_t* yo = args.output<int8_t>(0, xshape);
    float* so = args.output<float>(1, sshape);
    if (bl.rows == 0 || h == 0) return;
    const int16_t* ex = input_exponents(KernelArgs::data<float>(x_scale), bl.rows * bl.nb);
    const LnParams& pp = *params;
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    const bool fast = simd && cpu_avx512cd() && bl.b % 16 == 0 && bl.b <= 1024;
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
#endif
      layernorm_rows_portable(bl, pp, xi, ex, yo, so, r0, r1);
    });
  }
};

}  // namespace

void AddNonlinearOps(Ort::CustomOpDomain& domain) {
  // static: they live as long as the process (sessions keep raw pointers)
  static KernelOp<IntGeluKernel> gelu;
  static KernelOp<IntSoftmaxKernel> softmax;
  static KernelOp<IntLayerNormKernel> layernorm;
  domain.Add(&gelu);
  domain.Add(&softmax);
  domain.Add(&layernorm);
}

}  // namespace bct
