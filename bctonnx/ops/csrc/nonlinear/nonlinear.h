// Shared pieces of the integer nonlinear kernels (IntGelu, IntSoftmax, IntLayerNorm; one file
// each in this folder): small exact integer helpers, the blocked-row view of an input, attribute
// reading, per-thread scratch and the AVX-512 reductions they share.
//
// step of the reference each piece implements).
//
// Data path: integers only. Per element everything is int32/uint32 (bounds: see the reference's
// docstrings); per row int64 and, for LayerNorm's variance, unsigned __int128. The only floating
// point is the construction of GELU's constant table (float64 with + - * / in the reference's
// order, no FMA contraction), the exact float32 powers of two of the scales and the starting
// guesses of an exact integer square root (IntLayerNorm) and of an exact integer division
// (IntSoftmax's 2^62 // S), both corrected to the exact integer result.
//
// Up to three implementations of each row kernel, giving the same bits:
// - portable: the reference's steps literally, scalar C++ (target_clones avx2/default so the
//   compiler may vectorize it on AVX2 machines; nothing in a cloned function throws);
// - AVX2 (block sizes multiple of 16: *_avx2.cc), hand-written intrinsics, chosen when the ISA
//   (platform.h, capped by BCTONNX_ISA) is avx2 (IntLayerNorm also at avx512 for blocks > 1024,
//   IntGelu at avx512 on a CPU without VBMI);
// - AVX-512, hand-written intrinsics, chosen at run time when the CPU has it: F/BW/VL/DQ for
//   IntSoftmax (block sizes multiple of 16), + VBMI for IntGelu's byte-table lookups (any block
//   size), + CD (lzcnt) for IntLayerNorm (block sizes multiple of 16, <= 1024).
// Rows are independent and split over ORT's intra-op thread pool (KernelContext::ParallelFor);
// scratch memory is per thread and reused across calls. Validation (shapes, pow2 scales, mask
// values) happens before the parallel section: nothing throws inside it.
// The node attribute `simd` (0 or 1, default 1; 0 = portable kernels) exists for the tests.
#pragma once

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

#include "../common.h"
#include "../platform.h"
#include "../reduce16.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BCT_X86 1
#include "../simd.h"
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
#define BCT_AVX2 __attribute__((target("avx2")))
#define BCT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define BCT_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))
#define BCT_AVX512CD __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd")))
#endif

namespace bct {
namespace nl {

using bct::AddI32;
using bct::MaxU32;
using bct::tree16;
using bct::tree_inverse;

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
bool decode_pow2_exponents(const float* s, int64_t count, int16_t* e);  // nonlinear.cc

inline void scale_exponents_into(const float* s, int64_t count, int16_t* e) {
  if (!decode_pow2_exponents(s, count, e))  // not all normal powers of two: exact, or the error
    for (int64_t i = 0; i < count; ++i) e[i] = static_cast<int16_t>(pow2_exponent(s[i]));
}

inline std::vector<int16_t> scale_exponents(const float* s, int64_t count) {
  std::vector<int16_t> e(static_cast<size_t>(count));
  scale_exponents_into(s, count, e.data());
  return e;
}

struct Blocking {
  int64_t rows = 0, d = 0, nb = 0, b = 0;
};

inline Blocking check_blocked(const Dims& xs, const Dims& ss, int64_t block_size, const char* op) {
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

// The block size of a nonlinear op's input: 1..4096 (the kernels' row scratch and LayerNorm's
// bounds).
constexpr int64_t kMaxNonlinearBlock = 4096;

// The instruction set a kernel may use: the library-wide choice (platform.h: BCTONNX_ISA, read
// when a session creates the kernel), or kScalar (the portable kernels) when the attribute
// `simd` (0 or 1, default 1; tests only) is 0.
inline Isa read_isa(const Attributes& attrs) {
  const bool simd = attrs.Bool("simd", true);
  return simd ? ChooseIsa() : kScalar;
}

#if BCT_X86
inline bool cpu_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
inline bool cpu_avx512vbmi() {
  static const bool ok = cpu_avx512() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}
inline bool cpu_avx512cd() {
  static const bool ok = cpu_avx512() && __builtin_cpu_supports("avx512cd");
  return ok;
}
#else
inline bool cpu_avx512() { return false; }
inline bool cpu_avx512vbmi() { return false; }
inline bool cpu_avx512cd() { return false; }
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
inline const int16_t* input_exponents(const float* s, int64_t count) {
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

#if BCT_X86
// Two 16-byte halves in one register: lo in lanes 0-15, hi in 16-31 (the AVX2 kernels' steps of
// 32 bytes whose halves may belong to two blocks).
BCT_AVX2 __attribute__((always_inline)) inline __m256i halves(__m128i lo, __m128i hi) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
BCT_AVX2 __attribute__((always_inline)) inline __m128i load16(const void* p) {  // aligned
  return _mm_load_si128(static_cast<const __m128i*>(p));
}
// Stores step st of a row of d bytes: the 32 bytes of v, or those before d in the row's last step.
BCT_AVX2 __attribute__((always_inline)) inline void store_step32(void* row, int64_t st, int64_t d,
                                                                 __m256i v) {
  char* p = static_cast<char*>(row) + st * 32;
  if (st * 32 + 32 <= d) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    alignas(32) char tail[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tail), v);
    std::memcpy(p, tail, static_cast<size_t>(d - st * 32));
  }
}
#endif

}  // namespace nl
}  // namespace bct
