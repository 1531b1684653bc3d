// BlockMatMul (domain "bctonnx", version 1): a linear layer on block-quantized operands, and
// BlockBatchMatMul: attention scores Q.K^T with both operands block-quantized (same kernels,
// K packed per batch at run time).
//
// The specification is the numpy reference bctonnx/ops/ref_matmul.py (signature, arithmetic,
// float order); this file follows it step by step. In short: activations are quantized on the
// fly exactly as BlockQuantize does (or arrive as int8 codes + pow2 scales), weights stay in
// their stored block format (int8 or packed int4 codes, pow2 scale codes, zero points) and are
// re-packed once, at kernel construction, into a layout for the SIMD loops -- never
// dequantized to float. Products accumulate in int32 per K segment (exact), scales are applied
// per segment / weight block in float32.
//
// Instruction sets, chosen at kernel construction with __builtin_cpu_supports (the library is
// compiled without -march, so each path is a function with __attribute__((target)) or inline
// assembly):
//   amx     AMX-INT8 (+ AVX-512 for the float steps): tdpbssd (s8 x s8 -> s32) on 16 x 16 int32
//           tiles, one per K segment, stored to memory and scaled there (see "AMX path"). Needs
//           the OS's permission (Linux: arch_prctl, asked once per process); without it, avx512.
//           BlockMatMul only: BlockBatchMatMul stays at avx512 (AMX does not pay there).
//   avx512  AVX-512 F/BW/DQ + VNNI: vpdpbusd (u8 x s8 -> s32, never saturating), 16 columns per
//           register, register tiles of MR rows x NV*16 columns.
//   avx2    AVX2 + FMA: vpmaddubsw / vpmaddwd. vpmaddubsw saturates int16, so 8-bit weights use
//           the sign trick (|x| x sign(w, x), pairs <= 2*128*127 < 2^15); int4 weights are small
//           enough (pairs <= 2*15*128).
//   scalar  portable C++.
// BCTONNX_ISA=amx|avx512|avx2|scalar (read when a session creates the kernel) caps the choice,
// so tests compare the paths on one machine. All paths do the same float32 operations in the same
// order, so their outputs are identical (ref_matmul.py: "Arithmetic").
//
// How the signedness of vpdpbusd is handled (the AMX path packs 8-bit weights as q - zp and
// unpacks int4 ones to q - zp, both signed, for tdpbssd: d itself, no correction):
//   8-bit weights: stored as u8 = (q - zp) + 128, activations are the s8 operand, so
//     sum((w + 128) * x) = d + 128 * sum(x): the accumulator starts at -128 * sum(x) of the
//     row's segment (a broadcast, no extra instruction per product).
//   int4 weights: nibbles u = q + 8 in 0..15 are already valid u8 (unpacked in registers with
//     and/shift, two k-groups per 64-byte load); d = sum(u * x) - (zp + 8) * sum(x), the
//     correction done in float (all terms are integers below 2^24: exact).
//
// Speed (AVX-512): the weights of a column tile are processed in K slices of ~16 KB (they stay
// in L1 while the rows go by); the full 4-row x 48-column register tile runs its K loop and
// the per-segment epilogue in inline assembly (w8a8: int32 accumulators and the per-block
// float sums all in zmm registers; w4a8: nibbles unpacked in registers, the zero-point
// correction and both scales applied per segment in registers); partial tiles use the same
// steps in intrinsics. Per-call scratch (activation codes, sums, float output of a fused
// quantization) is thread-local and reused across runs.
//
// Threading: Ort::KernelContext::ParallelFor (OrtApi::KernelContext_ParallelFor, API 17+, in
// the 1.21 headers this library is built against) runs tasks on the session's intra-op thread
// pool, so intra_op_num_threads is respected and no threads of our own are created. Tasks are
// (row chunk x column tile) pairs; each output element is computed by exactly one task in a
// fixed order, so results do not depend on the thread count.
#include "simd.h"
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <tuple>

#include "common.h"
#include "nm_sparsity.h"

namespace bct {
namespace {

constexpr int kPanel = 16;  // output columns per packed weight panel (one zmm of int32)

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };
static_assert(kAvx512 == kIsaAvx512, "common.h's BestIsa() levels are these");

// AMX needs the OS's permission to use the tile data state: on Linux one arch_prctl
// (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) per process, asked once (thread-safe static
// initialization); without it the first tile instruction would fault, so no AMX then.
bool AmxPermitted() {
#if defined(__linux__)
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
#else
  return false;
#endif
}

Isa DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni")) {
    if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
        AmxPermitted())
      return kAmx;
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

// The best supported ISA, capped by a request ("amx", "avx512", "avx2", "scalar"; null/"" =
// none).
Isa ChooseIsa(const char* request) {
  Isa isa = DetectIsa();
  if (request == nullptr || *request == '\0' || std::strcmp(request, "auto") == 0) return isa;
  Isa cap;
  if (std::strcmp(request, "amx") == 0)
    cap = kAmx;
  else if (std::strcmp(request, "avx512") == 0)
    cap = kAvx512;
  else if (std::strcmp(request, "avx2") == 0)
    cap = kAvx2;
  else if (std::strcmp(request, "scalar") == 0)
    cap = kScalar;
  else
    throw std::runtime_error(std::string("bctonnx.BlockMatMul: BCTONNX_ISA=") + request +
                             " is not one of amx, avx512, avx2, scalar");
  return std::min(isa, cap);
}

// A value the compiler must materialize as is: keeps a rounded product from being contracted
// into a fused multiply-add with the addition after it (-ffp-contract=fast is GCC's default
// for C++ with FMA enabled), which would change the float32 result (ref_matmul.py fixes one
// rounding per operation).
template <typename T>
inline T Rounded(T v) {
  asm("" : "+x"(v));
  return v;
}

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.BlockMatMul: " + what);
}

// Per-thread scratch memory that grows and is reused across runs: a fresh allocation of a few
// hundred KB per call is an mmap plus page faults, a visible share of a small matmul.
enum ScratchSlot {
  kSlotA = 0, kSlotSx, kSlotSum, kSlotY, kSlotB, kSlotBScale, kSlotATail, kSlotSxTile, kNumSlots
};

template <typename T>
T* ThreadScratch(ScratchSlot slot, size_t count) {
  thread_local std::vector<char> buffers[kNumSlots];
  std::vector<char>& buf = buffers[slot];
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(T) + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((addr + 63) & ~uintptr_t{63});
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: BlockQuantize's rule (ref_quant.py "Scale choice"), bit for bit.

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

int BlockExponent(float amax, float qmax) {
  if (!(amax <= FLT_MAX)) Fail("input contains NaN or infinity");
  const int e = std::max(CeilLog2(amax / qmax), -128);  // float32 division, as the reference
  if (e > 127) Fail("values too large for a pow2 scale (max |x| / qmax beyond 2^127)");
  return e;
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
    if (bad) Fail("input contains NaN or infinity");
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
  const __m512 vq = _mm512_set1_ps(qmax), vnq = _mm512_set1_ps(-qmax);
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
  if (bad) Fail("input contains NaN or infinity");
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
    // x / 2^e and x * 2^-e are the same real number, rounded once: identical, as long as
    // 2^-e is a float32 (e >= -127); e = -128 divides, as the reference does
    const bool divide = e < -127;
    const __m512 s = _mm512_set1_ps(divide ? pow2_float(e) : pow2_float(-e));
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t n = std::min<int64_t>(16, end - i);
      const __mmask16 m = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
      __m512 v = divide ? _mm512_div_ps(xv, s) : _mm512_mul_ps(xv, s);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, vnq), vq);
      _mm512_mask_cvtepi32_storeu_epi8(q + i, m, _mm512_cvtps_epi32(v));
    }
  }
}

__attribute__((target("avx2,fma"))) void QuantizeRowAvx2(const float* x, int64_t d, int64_t b,
                                                         float qmax, int8_t* q, int* exps) {
  const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(FLT_MAX);
  const __m256 vq = _mm256_set1_ps(qmax), vnq = _mm256_set1_ps(-qmax);
  alignas(32) int32_t tmp[8];
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
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.0f;
    for (float l : lanes) amax = std::max(amax, l);
    for (; i < end; ++i) {
      const float a = std::fabs(x[i]);
      bad |= !(a <= FLT_MAX);
      amax = std::max(amax, a);
    }
    if (bad) Fail("input contains NaN or infinity");
    const int e = BlockExponent(amax, qmax);
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
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), _mm256_cvtps_epi32(v));
      for (int l = 0; l < 8; ++l) q[i + l] = static_cast<int8_t>(tmp[l]);
    }
    for (; i < end; ++i) {
      float v = RoundEven(x[i] / sf);
      v = std::min(std::max(v, -qmax), qmax);
      q[i] = static_cast<int8_t>(v);
    }
  }
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

// ---------------------------------------------------------------------------------------------
// Weights, packed once per kernel.
//
// K is cut into segments of g = min(block_size, act_block_size), each padded to gp (a multiple
// of 4 for 8-bit codes, of 8 for int4) with zero activations. Columns are grouped in panels of
// 16 (the last one zero-padded). Per panel and segment, 64-byte chunks:
//   int8: chunk c holds k = 4c..4c+3 of the 16 columns: byte [col * 4 + i] = (q - zp) + 128 of
//         k = 4c + i (the u8 operand of vpdpbusd; x is the s8 one).
//   int4: chunk c holds k = 8c..8c+7: byte [col * 4 + i] = u(4c' + i) | u(4c' + 4 + i) << 4
//         with c' = 2c and u = q + 8 in 0..15; the low nibbles are k-group 2c, the high ones
//         k-group 2c + 1.

// 64-byte aligned storage: each 64-byte chunk of packed weights is one cache line (a load
// that straddles two lines costs two; tileloadd rows are chunks too).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

struct PackedWeights {
  int64_t k = 0, n = 0, block = 0, act_block = 0, g = 0, gp = 0, nseg = 0, nblk = 0;
  int64_t spb = 1;       // segments per weight block
  int64_t npanel = 0, npad = 0, chunks = 0;  // chunks (64 bytes) per segment and panel
  bool int4 = false;
  bool signed8 = false;  // int8 bytes hold q - zp itself (the AMX path: s8 x s8 tdpbssd)
  std::vector<uint8_t, AlignedAllocator<uint8_t>> data;  // [panel][segment][chunk][64]
  std::vector<float> sw;      // [nblk][npad] weight scales
  std::vector<float> zpp;     // int4: [nblk][npad] zero point + 8
  int64_t panel_bytes() const { return nseg * chunks * 64; }
};

// ---------------------------------------------------------------------------------------------
// One task's view of the operands.

struct Operands {
  const PackedWeights* w = nullptr;
  const int8_t* a = nullptr;     // [m][nseg * gp] activation codes (segments padded with 0)
  const float* sx = nullptr;     // [m][nseg] activation scale of each segment
  const float* sxt = nullptr;    // AMX: the same by 16-row tile, [m / 16][nseg][16] (0 past m)
  const int32_t* corr = nullptr; // [m][nseg] -128 * sum(x) of each segment (8-bit weights)
  const float* sumx = nullptr;   // [m][nseg] sum(x) of each segment, as float (int4 weights)
  const float* bias = nullptr;   // [npad] or null
  const float* ymul = nullptr;   // scalar multiplier of y (after the bias) or null
  float* y = nullptr;            // [m][n]
  int32_t* seg = nullptr;        // [m][nseg][n] or null (segment sums, debug output)
  int64_t lda = 0;
};

// op.sxt of rows [r0, r1) (r0 a multiple of 16; the rows after the last one, up to the next
// multiple of 16, get 0 when r1 == rows).
void ScalesByTile(const float* sx, int64_t nseg, int64_t r0, int64_t r1, int64_t rows,
                  float* sxt) {
  const int64_t end = r1 == rows ? (rows + 15) / 16 * 16 : r1;
  for (int64_t m = r0; m < end; ++m) {
    float* dst = sxt + (m / 16) * nseg * 16 + m % 16;
    for (int64_t j = 0; j < nseg; ++j) dst[j * 16] = m < rows ? sx[m * nseg + j] : 0.0f;
  }
}

// Store one 16-column panel of a row, only the valid columns of the last panel.
template <typename StoreFull>
inline void StoreColumns(float* dst, const float* lanes, int64_t valid, StoreFull full) {
  if (valid >= kPanel)
    full();
  else
    std::memcpy(dst, lanes, sizeof(float) * static_cast<size_t>(valid));
}

// ---------------------------------------------------------------------------------------------
// Scalar path (also the reference for the packed layout)

void TileScalar(const Operands& op, int64_t m0, int64_t mr, int64_t p0, int64_t np) {
  const PackedWeights& w = *op.w;
  for (int64_t m = m0; m < m0 + mr; ++m) {
    const int8_t* x = op.a + m * op.lda;
    for (int64_t p = p0; p < p0 + np; ++p) {
      const uint8_t* panel = w.data.data() + p * w.panel_bytes();
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = p * kPanel + c;
        if (col >= w.n) break;
        float y = 0.0f;
        for (int64_t b = 0; b < w.nblk; ++b) {
          float t = 0.0f;
          for (int64_t jj = 0; jj < w.spb; ++jj) {
            const int64_t j = b * w.spb + jj;
            const uint8_t* chunk = panel + j * w.chunks * 64;
            const int8_t* xs = x + j * w.gp;
            int32_t d = 0;
            if (!w.int4) {
              for (int64_t k = 0; k < w.gp; ++k)
                d += xs[k] * (static_cast<int32_t>(chunk[(k / 4) * 64 + c * 4 + k % 4]) - 128);
            } else {
              const int32_t zpp = static_cast<int32_t>(w.zpp[b * w.npad + col]);
              for (int64_t k = 0; k < w.gp; ++k) {
                const uint8_t byte = chunk[(k / 8) * 64 + c * 4 + k % 4];
                const int32_t u = (k % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
                d += xs[k] * (u - zpp);
              }
            }
            if (op.seg) op.seg[(m * w.nseg + j) * w.n + col] = d;
            const float sx = op.sx[m * w.nseg + j];
            const float sw = w.sw[b * w.npad + col];
            if (w.spb == 1) {
              y = y + Rounded(static_cast<float>(d) * sw) * sx;  // round(d * sw) * 2^e: exact
            } else {
              t = t + static_cast<float>(d) * sx;  // exact product
            }
          }
          if (w.spb > 1) y = y + Rounded(t * w.sw[b * w.npad + col]);
        }
        if (op.bias) y = y + op.bias[col];
        if (op.ymul) y = y * *op.ymul;
        op.y[m * w.n + col] = y;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI path: MR rows x NV panels per register tile.

__attribute__((target("avx512f"))) inline __m512 Rounded512(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

// acc += u8(a) . s8(b) per 32-bit lane. Inline asm: GCC 12 surrounds the intrinsic with
// register copies when the accumulators live in arrays (measured ~2x slower loops).
__attribute__((target("avx512f,avx512vnni"))) inline __m512i Dpbusd(__m512i acc, __m512i a,
                                                                      __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// Segment sums of one register (debug output): the valid columns of a panel row.
void StoreSegmentSums(const Operands& op, int64_t m, int64_t j, int64_t col0, const int32_t* lanes,
                      int64_t width) {
  const int64_t valid = std::min<int64_t>(width, op.w->n - col0);
  if (valid > 0)
    std::memcpy(op.seg + (m * op.w->nseg + j) * op.w->n + col0, lanes,
                sizeof(int32_t) * static_cast<size_t>(valid));
}

#define BCT_UNROLL _Pragma("GCC unroll 16")

// One register tile: rows m0..m0+MR, panels p0..p0+NV, weight blocks [b0, b1). The float
// result of the tile is kept in y itself between calls (K is processed in slices that keep
// the weights in L1 while the rows go by): the first slice starts from 0, the last one adds
// the bias and applies the multiplier. int32 accumulators and the float ones of the current
// weight block live in registers.
// One K step (8 bytes of K: two int4 nibble planes) of the 4x48 int4 tile, shared by the
// w4a8 whole-slice kernel and the generic full tile: unpack 3 weight vectors into 6 nibble
// planes (zmm26-31), 2 x-broadcasts per row (zmm24/25), 24 vpdpbusd into zmm0-11, advance w
// and x. M4 is the low-nibble mask operand as that asm statement names it.
// One K step (4 k of 16 columns x 3 panels, 4 rows) of the int8 4 x 48 tile: zmm0-11 += the
// u8 weights of the three panels times the broadcast s8 activations of the four rows.
#define BCT_INT8_KSTEP \
  "vmovdqu64 (%[w]), %%zmm28\n\t" \
  "vmovdqu64 (%[w],%[pb]), %%zmm29\n\t" \
  "vmovdqu64 (%[w],%[pb],2), %%zmm30\n\t" \
  "vpbroadcastd (%[x]), %%zmm31\n\t" \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm0\n\t" \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm1\n\t" \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm2\n\t" \
  "vpbroadcastd (%[x],%[lda]), %%zmm31\n\t" \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm3\n\t" \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm4\n\t" \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm5\n\t" \
  "vpbroadcastd (%[x],%[lda],2), %%zmm31\n\t" \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm6\n\t" \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm7\n\t" \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm8\n\t" \
  "vpbroadcastd (%[x],%[lda3]), %%zmm31\n\t" \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm9\n\t" \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm10\n\t" \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm11\n\t" \
  "add $64, %[w]\n\t" \
  "add $4, %[x]\n\t"

#define BCT_INT4_KSTEP(M4) \
  "vmovdqu64 (%[w]), %%zmm26\n\t" \
  "vpsrlw $4, %%zmm26, %%zmm27\n\t" \
  "vpandd " M4 ", %%zmm26, %%zmm26\n\t" \
  "vpandd " M4 ", %%zmm27, %%zmm27\n\t" \
  "vmovdqu64 (%[w],%[pb]), %%zmm28\n\t" \
  "vpsrlw $4, %%zmm28, %%zmm29\n\t" \
  "vpandd " M4 ", %%zmm28, %%zmm28\n\t" \
  "vpandd " M4 ", %%zmm29, %%zmm29\n\t" \
  "vmovdqu64 (%[w],%[pb],2), %%zmm30\n\t" \
  "vpsrlw $4, %%zmm30, %%zmm31\n\t" \
  "vpandd " M4 ", %%zmm30, %%zmm30\n\t" \
  "vpandd " M4 ", %%zmm31, %%zmm31\n\t" \
  "vpbroadcastd (%[x]), %%zmm24\n\t" \
  "vpbroadcastd 4(%[x]), %%zmm25\n\t" \
  "vpdpbusd %%zmm24, %%zmm26, %%zmm0\n\t" \
  "vpdpbusd %%zmm24, %%zmm28, %%zmm1\n\t" \
  "vpdpbusd %%zmm24, %%zmm30, %%zmm2\n\t" \
  "vpdpbusd %%zmm25, %%zmm27, %%zmm0\n\t" \
  "vpdpbusd %%zmm25, %%zmm29, %%zmm1\n\t" \
  "vpdpbusd %%zmm25, %%zmm31, %%zmm2\n\t" \
  "vpbroadcastd (%[x],%[lda]), %%zmm24\n\t" \
  "vpbroadcastd 4(%[x],%[lda]), %%zmm25\n\t" \
  "vpdpbusd %%zmm24, %%zmm26, %%zmm3\n\t" \
  "vpdpbusd %%zmm24, %%zmm28, %%zmm4\n\t" \
  "vpdpbusd %%zmm24, %%zmm30, %%zmm5\n\t" \
  "vpdpbusd %%zmm25, %%zmm27, %%zmm3\n\t" \
  "vpdpbusd %%zmm25, %%zmm29, %%zmm4\n\t" \
  "vpdpbusd %%zmm25, %%zmm31, %%zmm5\n\t" \
  "vpbroadcastd (%[x],%[lda],2), %%zmm24\n\t" \
  "vpbroadcastd 4(%[x],%[lda],2), %%zmm25\n\t" \
  "vpdpbusd %%zmm24, %%zmm26, %%zmm6\n\t" \
  "vpdpbusd %%zmm24, %%zmm28, %%zmm7\n\t" \
  "vpdpbusd %%zmm24, %%zmm30, %%zmm8\n\t" \
  "vpdpbusd %%zmm25, %%zmm27, %%zmm6\n\t" \
  "vpdpbusd %%zmm25, %%zmm29, %%zmm7\n\t" \
  "vpdpbusd %%zmm25, %%zmm31, %%zmm8\n\t" \
  "vpbroadcastd (%[x],%[lda3]), %%zmm24\n\t" \
  "vpbroadcastd 4(%[x],%[lda3]), %%zmm25\n\t" \
  "vpdpbusd %%zmm24, %%zmm26, %%zmm9\n\t" \
  "vpdpbusd %%zmm24, %%zmm28, %%zmm10\n\t" \
  "vpdpbusd %%zmm24, %%zmm30, %%zmm11\n\t" \
  "vpdpbusd %%zmm25, %%zmm27, %%zmm9\n\t" \
  "vpdpbusd %%zmm25, %%zmm29, %%zmm10\n\t" \
  "vpdpbusd %%zmm25, %%zmm31, %%zmm11\n\t" \
  "add $64, %[w]\n\t" \
  "add $8, %[x]\n\t"

template <int MR, int NV, bool INT4, bool SPB1>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,fma"))) void TileAvx512(
    const Operands& op, int64_t m0, int64_t p0, int64_t b0, int64_t b1) {
  const PackedWeights& w = *op.w;
  const int64_t pb = w.panel_bytes(), seg_bytes = w.chunks * 64, chunks = w.chunks;
  const uint8_t* wp = w.data.data() + p0 * pb;
  const int8_t* xr[MR];
  BCT_UNROLL for (int r = 0; r < MR; ++r) xr[r] = op.a + (m0 + r) * op.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const bool first = b0 == 0, last = b1 == w.nblk;
  int64_t valid[NV];
  __mmask16 mask[NV];
  BCT_UNROLL for (int v = 0; v < NV; ++v) {
    valid[v] = std::min<int64_t>(kPanel, w.n - (p0 + v) * kPanel);
    mask[v] = valid[v] >= kPanel ? 0xFFFF : static_cast<__mmask16>((1u << valid[v]) - 1);
  }
  auto y_at = [&](int r, int v) { return op.y + (m0 + r) * w.n + (p0 + v) * kPanel; };

  // SPB1: f accumulates in registers over the slice; otherwise t does, per weight block, and
  // f in y (memory) once per block
  __m512 acc_f[MR][NV];
  BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
    acc_f[r][v] = (SPB1 && !first) ? _mm512_maskz_loadu_ps(mask[v], y_at(r, v))
                                   : _mm512_setzero_ps();
  if (!SPB1 && first)
    BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(y_at(r, v), mask[v], _mm512_setzero_ps());

  int64_t b_start = b0;
  if constexpr (MR == 4 && NV == 3 && INT4 && SPB1) {
    if (op.seg == nullptr) {
      // int4 weights, one segment per block (w4a8): the whole slice in assembly, int32
      // accumulators in zmm0-11, f in zmm12-23; per segment d = acc - (zp + 8) * sum(x)
      // (exact), u = round(d * sw), f = f + u * 2^e (exact product): TileAvx512's steps
      alignas(64) float fm[MR * NV][kPanel];
      BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
        _mm512_store_ps(fm[r * NV + v], acc_f[r][v]);
      static const uint32_t kLow4 = 0x0F0F0F0Fu;
      const uint8_t* wc = wp + b0 * seg_bytes;
      const int8_t* x = xr[0] + b0 * w.gp;
      const float* sump = op.sumx + m0 * w.nseg + b0;
      const float* sp = op.sx + m0 * w.nseg + b0;
      const float* swp = w.sw.data() + b0 * w.npad + p0 * kPanel;
      const float* zpp = w.zpp.data() + b0 * w.npad + p0 * kPanel;
      const int64_t lda = op.lda, lda3 = 3 * op.lda;
      const int64_t rs = w.nseg * 4, rs3 = 3 * w.nseg * 4, xstep = w.gp - 8 * chunks;
      const int64_t pad_bytes = w.npad * 4;
      int64_t nseg = b1 - b0, k = 0;
      float* fptr = &fm[0][0];
      asm volatile(
          "mov %[fptr], %[k]\n\t"
          "vmovaps 0(%[k]), %%zmm12\n\t"
          "vmovaps 64(%[k]), %%zmm13\n\t"
          "vmovaps 128(%[k]), %%zmm14\n\t"
          "vmovaps 192(%[k]), %%zmm15\n\t"
          "vmovaps 256(%[k]), %%zmm16\n\t"
          "vmovaps 320(%[k]), %%zmm17\n\t"
          "vmovaps 384(%[k]), %%zmm18\n\t"
          "vmovaps 448(%[k]), %%zmm19\n\t"
          "vmovaps 512(%[k]), %%zmm20\n\t"
          "vmovaps 576(%[k]), %%zmm21\n\t"
          "vmovaps 640(%[k]), %%zmm22\n\t"
          "vmovaps 704(%[k]), %%zmm23\n\t"
          "2:\n\t"
          "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
          "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"
          "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"
          "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"
          "vpxord %%zmm4, %%zmm4, %%zmm4\n\t"
          "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"
          "vpxord %%zmm6, %%zmm6, %%zmm6\n\t"
          "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"
          "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"
          "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"
          "vpxord %%zmm10, %%zmm10, %%zmm10\n\t"
          "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"
          "mov %[chunks], %[k]\n\t"
          "1:\n\t"
          BCT_INT4_KSTEP("%[m4]%{1to16%}")
          "dec %[k]\n\t"
          "jnz 1b\n\t"
          "add %[xstep], %[x]\n\t"
          // epilogue: per row r: d = cvt(acc) - zpp * sum_r; u = d * sw; f += u * sx_r
          "vcvtdq2ps %%zmm0, %%zmm0\n\t"
          "vcvtdq2ps %%zmm1, %%zmm1\n\t"
          "vcvtdq2ps %%zmm2, %%zmm2\n\t"
          "vcvtdq2ps %%zmm3, %%zmm3\n\t"
          "vcvtdq2ps %%zmm4, %%zmm4\n\t"
          "vcvtdq2ps %%zmm5, %%zmm5\n\t"
          "vcvtdq2ps %%zmm6, %%zmm6\n\t"
          "vcvtdq2ps %%zmm7, %%zmm7\n\t"
          "vcvtdq2ps %%zmm8, %%zmm8\n\t"
          "vcvtdq2ps %%zmm9, %%zmm9\n\t"
          "vcvtdq2ps %%zmm10, %%zmm10\n\t"
          "vcvtdq2ps %%zmm11, %%zmm11\n\t"
          "vmovups 0(%[zp]), %%zmm26\n\t"
          "vmovups 64(%[zp]), %%zmm27\n\t"
          "vmovups 128(%[zp]), %%zmm28\n\t"
          "vmovups 0(%[sw]), %%zmm29\n\t"
          "vmovups 64(%[sw]), %%zmm30\n\t"
          "vmovups 128(%[sw]), %%zmm31\n\t"
          "vbroadcastss (%[sum]), %%zmm24\n\t"
          "vbroadcastss (%[s]), %%zmm25\n\t"
          "vfnmadd231ps %%zmm24, %%zmm26, %%zmm0\n\t"
          "vfnmadd231ps %%zmm24, %%zmm27, %%zmm1\n\t"
          "vfnmadd231ps %%zmm24, %%zmm28, %%zmm2\n\t"
          "vmulps %%zmm29, %%zmm0, %%zmm0\n\t"
          "vmulps %%zmm30, %%zmm1, %%zmm1\n\t"
          "vmulps %%zmm31, %%zmm2, %%zmm2\n\t"
          "vfmadd231ps %%zmm25, %%zmm0, %%zmm12\n\t"
          "vfmadd231ps %%zmm25, %%zmm1, %%zmm13\n\t"
          "vfmadd231ps %%zmm25, %%zmm2, %%zmm14\n\t"
          "vbroadcastss (%[sum],%[rs]), %%zmm24\n\t"
          "vbroadcastss (%[s],%[rs]), %%zmm25\n\t"
          "vfnmadd231ps %%zmm24, %%zmm26, %%zmm3\n\t"
          "vfnmadd231ps %%zmm24, %%zmm27, %%zmm4\n\t"
          "vfnmadd231ps %%zmm24, %%zmm28, %%zmm5\n\t"
          "vmulps %%zmm29, %%zmm3, %%zmm3\n\t"
          "vmulps %%zmm30, %%zmm4, %%zmm4\n\t"
          "vmulps %%zmm31, %%zmm5, %%zmm5\n\t"
          "vfmadd231ps %%zmm25, %%zmm3, %%zmm15\n\t"
          "vfmadd231ps %%zmm25, %%zmm4, %%zmm16\n\t"
          "vfmadd231ps %%zmm25, %%zmm5, %%zmm17\n\t"
          "vbroadcastss (%[sum],%[rs],2), %%zmm24\n\t"
          "vbroadcastss (%[s],%[rs],2), %%zmm25\n\t"
          "vfnmadd231ps %%zmm24, %%zmm26, %%zmm6\n\t"
          "vfnmadd231ps %%zmm24, %%zmm27, %%zmm7\n\t"
          "vfnmadd231ps %%zmm24, %%zmm28, %%zmm8\n\t"
          "vmulps %%zmm29, %%zmm6, %%zmm6\n\t"
          "vmulps %%zmm30, %%zmm7, %%zmm7\n\t"
          "vmulps %%zmm31, %%zmm8, %%zmm8\n\t"
          "vfmadd231ps %%zmm25, %%zmm6, %%zmm18\n\t"
          "vfmadd231ps %%zmm25, %%zmm7, %%zmm19\n\t"
          "vfmadd231ps %%zmm25, %%zmm8, %%zmm20\n\t"
          "vbroadcastss (%[sum],%[rs3]), %%zmm24\n\t"
          "vbroadcastss (%[s],%[rs3]), %%zmm25\n\t"
          "vfnmadd231ps %%zmm24, %%zmm26, %%zmm9\n\t"
          "vfnmadd231ps %%zmm24, %%zmm27, %%zmm10\n\t"
          "vfnmadd231ps %%zmm24, %%zmm28, %%zmm11\n\t"
          "vmulps %%zmm29, %%zmm9, %%zmm9\n\t"
          "vmulps %%zmm30, %%zmm10, %%zmm10\n\t"
          "vmulps %%zmm31, %%zmm11, %%zmm11\n\t"
          "vfmadd231ps %%zmm25, %%zmm9, %%zmm21\n\t"
          "vfmadd231ps %%zmm25, %%zmm10, %%zmm22\n\t"
          "vfmadd231ps %%zmm25, %%zmm11, %%zmm23\n\t"
          "add $4, %[sum]\n\t"
          "add $4, %[s]\n\t"
          "add %[padb], %[sw]\n\t"
          "add %[padb], %[zp]\n\t"
          "dec %[nseg]\n\t"
          "jnz 2b\n\t"
          "mov %[fptr], %[k]\n\t"
          "vmovaps %%zmm12, 0(%[k])\n\t"
          "vmovaps %%zmm13, 64(%[k])\n\t"
          "vmovaps %%zmm14, 128(%[k])\n\t"
          "vmovaps %%zmm15, 192(%[k])\n\t"
          "vmovaps %%zmm16, 256(%[k])\n\t"
          "vmovaps %%zmm17, 320(%[k])\n\t"
          "vmovaps %%zmm18, 384(%[k])\n\t"
          "vmovaps %%zmm19, 448(%[k])\n\t"
          "vmovaps %%zmm20, 512(%[k])\n\t"
          "vmovaps %%zmm21, 576(%[k])\n\t"
          "vmovaps %%zmm22, 640(%[k])\n\t"
          "vmovaps %%zmm23, 704(%[k])\n\t"
          : [w] "+r"(wc), [x] "+r"(x), [sum] "+r"(sump), [s] "+r"(sp), [sw] "+r"(swp),
            [zp] "+r"(zpp), [nseg] "+r"(nseg), [k] "+r"(k)
          : [fptr] "m"(fptr), [chunks] "m"(chunks), [pb] "r"(pb), [lda] "r"(lda),
            [lda3] "r"(lda3), [rs] "r"(rs), [rs3] "r"(rs3), [xstep] "m"(xstep),
            [padb] "m"(pad_bytes), [m4] "m"(kLow4)
          : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9",
            "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18",
            "zmm19", "zmm20", "zmm21", "zmm22", "zmm23", "zmm24", "zmm25", "zmm26", "zmm27",
            "zmm28", "zmm29", "zmm30", "zmm31", "memory", "cc");
      BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
        acc_f[r][v] = _mm512_load_ps(fm[r * NV + v]);
      b_start = b1;  // done
    }
  }
  for (int64_t b = b_start; b < b1; ++b) {
    const float* swb = w.sw.data() + b * w.npad + p0 * kPanel;
    if (!SPB1)
      BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
        acc_f[r][v] = _mm512_setzero_ps();
    bool block_done = false;
    if constexpr (MR == 4 && NV == 3 && !INT4 && !SPB1) {
      if (op.seg == nullptr) {
        // 8-bit weights, several segments per weight block (w8a8): the whole block in
        // assembly: int32 accumulators in zmm0-11, t = sum of d * 2^e in zmm12-23 (the
        // products are exact, so the fused multiply-add is the reference's t + d * sx)
        alignas(64) float tm[MR * NV][kPanel];
        const int64_t j0 = b * w.spb;
        const uint8_t* wc = wp + j0 * seg_bytes;
        const int8_t* x = xr[0] + j0 * w.gp;
        const int32_t* cp = op.corr + m0 * w.nseg + j0;
        const float* sp = op.sx + m0 * w.nseg + j0;
        const int64_t lda = op.lda, lda3 = 3 * op.lda;
        const int64_t rs = w.nseg * 4, rs3 = 3 * w.nseg * 4, xstep = w.gp - 4 * chunks;
        int64_t nseg = w.spb, k = 0;
        asm volatile(
            "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"
            "vpxord %%zmm13, %%zmm13, %%zmm13\n\t"
            "vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
            "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
            "vpxord %%zmm16, %%zmm16, %%zmm16\n\t"
            "vpxord %%zmm17, %%zmm17, %%zmm17\n\t"
            "vpxord %%zmm18, %%zmm18, %%zmm18\n\t"
            "vpxord %%zmm19, %%zmm19, %%zmm19\n\t"
            "vpxord %%zmm20, %%zmm20, %%zmm20\n\t"
            "vpxord %%zmm21, %%zmm21, %%zmm21\n\t"
            "vpxord %%zmm22, %%zmm22, %%zmm22\n\t"
            "vpxord %%zmm23, %%zmm23, %%zmm23\n\t"
            "2:\n\t"
            "vpbroadcastd (%[c]), %%zmm0\n\t"
            "vmovdqa64 %%zmm0, %%zmm1\n\t"
            "vmovdqa64 %%zmm0, %%zmm2\n\t"
            "vpbroadcastd (%[c],%[rs]), %%zmm3\n\t"
            "vmovdqa64 %%zmm3, %%zmm4\n\t"
            "vmovdqa64 %%zmm3, %%zmm5\n\t"
            "vpbroadcastd (%[c],%[rs],2), %%zmm6\n\t"
            "vmovdqa64 %%zmm6, %%zmm7\n\t"
            "vmovdqa64 %%zmm6, %%zmm8\n\t"
            "vpbroadcastd (%[c],%[rs3]), %%zmm9\n\t"
            "vmovdqa64 %%zmm9, %%zmm10\n\t"
            "vmovdqa64 %%zmm9, %%zmm11\n\t"
            "mov %[chunks], %[k]\n\t"
            "1:\n\t"
            BCT_INT8_KSTEP
            "dec %[k]\n\t"
            "jnz 1b\n\t"
            "add %[xstep], %[x]\n\t"
            "vbroadcastss (%[s]), %%zmm24\n\t"
            "vbroadcastss (%[s],%[rs]), %%zmm25\n\t"
            "vbroadcastss (%[s],%[rs],2), %%zmm26\n\t"
            "vbroadcastss (%[s],%[rs3]), %%zmm27\n\t"
            "vcvtdq2ps %%zmm0, %%zmm0\n\t"
            "vcvtdq2ps %%zmm1, %%zmm1\n\t"
            "vcvtdq2ps %%zmm2, %%zmm2\n\t"
            "vcvtdq2ps %%zmm3, %%zmm3\n\t"
            "vcvtdq2ps %%zmm4, %%zmm4\n\t"
            "vcvtdq2ps %%zmm5, %%zmm5\n\t"
            "vcvtdq2ps %%zmm6, %%zmm6\n\t"
            "vcvtdq2ps %%zmm7, %%zmm7\n\t"
            "vcvtdq2ps %%zmm8, %%zmm8\n\t"
            "vcvtdq2ps %%zmm9, %%zmm9\n\t"
            "vcvtdq2ps %%zmm10, %%zmm10\n\t"
            "vcvtdq2ps %%zmm11, %%zmm11\n\t"
            "vfmadd231ps %%zmm24, %%zmm0, %%zmm12\n\t"
            "vfmadd231ps %%zmm24, %%zmm1, %%zmm13\n\t"
            "vfmadd231ps %%zmm24, %%zmm2, %%zmm14\n\t"
            "vfmadd231ps %%zmm25, %%zmm3, %%zmm15\n\t"
            "vfmadd231ps %%zmm25, %%zmm4, %%zmm16\n\t"
            "vfmadd231ps %%zmm25, %%zmm5, %%zmm17\n\t"
            "vfmadd231ps %%zmm26, %%zmm6, %%zmm18\n\t"
            "vfmadd231ps %%zmm26, %%zmm7, %%zmm19\n\t"
            "vfmadd231ps %%zmm26, %%zmm8, %%zmm20\n\t"
            "vfmadd231ps %%zmm27, %%zmm9, %%zmm21\n\t"
            "vfmadd231ps %%zmm27, %%zmm10, %%zmm22\n\t"
            "vfmadd231ps %%zmm27, %%zmm11, %%zmm23\n\t"
            "add $4, %[c]\n\t"
            "add $4, %[s]\n\t"
            "dec %[nseg]\n\t"
            "jnz 2b\n\t"
            "vmovaps %%zmm12, 0(%[t])\n\t"
            "vmovaps %%zmm13, 64(%[t])\n\t"
            "vmovaps %%zmm14, 128(%[t])\n\t"
            "vmovaps %%zmm15, 192(%[t])\n\t"
            "vmovaps %%zmm16, 256(%[t])\n\t"
            "vmovaps %%zmm17, 320(%[t])\n\t"
            "vmovaps %%zmm18, 384(%[t])\n\t"
            "vmovaps %%zmm19, 448(%[t])\n\t"
            "vmovaps %%zmm20, 512(%[t])\n\t"
            "vmovaps %%zmm21, 576(%[t])\n\t"
            "vmovaps %%zmm22, 640(%[t])\n\t"
            "vmovaps %%zmm23, 704(%[t])\n\t"
            : [w] "+r"(wc), [x] "+r"(x), [c] "+r"(cp), [s] "+r"(sp), [nseg] "+r"(nseg),
              [k] "+r"(k)
            : [t] "r"(&tm[0][0]), [chunks] "r"(chunks), [pb] "r"(pb), [lda] "r"(lda),
              [lda3] "r"(lda3), [rs] "r"(rs), [rs3] "r"(rs3), [xstep] "r"(xstep)
            : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9",
              "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18",
              "zmm19", "zmm20", "zmm21", "zmm22", "zmm23", "zmm24", "zmm25", "zmm26", "zmm27",
              "zmm28", "zmm29", "zmm30", "zmm31", "memory", "cc");
        BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
          acc_f[r][v] = _mm512_load_ps(tm[r * NV + v]);
        block_done = true;
      }
    }
    for (int64_t jj = 0; jj < (block_done ? 0 : w.spb); ++jj) {
      const int64_t j = b * w.spb + jj;
      __m512i acc[MR][NV];
      BCT_UNROLL for (int r = 0; r < MR; ++r) {
        const __m512i init =
            INT4 ? _mm512_setzero_si512() : _mm512_set1_epi32(op.corr[(m0 + r) * w.nseg + j]);
        BCT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = init;
      }
      const uint8_t* wj = wp + j * seg_bytes;
      const int64_t xo = j * w.gp;
      if constexpr (MR == 4 && NV == 3) {
        // the full tile: the segment's K loop in assembly, accumulators in zmm0-11 (GCC
        // surrounds vpdpbusd with register copies when it allocates 12 accumulators itself)
        alignas(64) int32_t accm[MR * NV][kPanel];
        BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
          _mm512_store_si512(reinterpret_cast<void*>(accm[r * NV + v]), acc[r][v]);
        const uint8_t* wc = wj;
        const int8_t* x = xr[0] + xo;
        const int64_t lda = op.lda, lda3 = 3 * op.lda;
        int64_t count = chunks;
        if (!INT4) {
          asm volatile(
              "vmovdqa64 0(%[acc]), %%zmm0\n\t"
              "vmovdqa64 64(%[acc]), %%zmm1\n\t"
              "vmovdqa64 128(%[acc]), %%zmm2\n\t"
              "vmovdqa64 192(%[acc]), %%zmm3\n\t"
              "vmovdqa64 256(%[acc]), %%zmm4\n\t"
              "vmovdqa64 320(%[acc]), %%zmm5\n\t"
              "vmovdqa64 384(%[acc]), %%zmm6\n\t"
              "vmovdqa64 448(%[acc]), %%zmm7\n\t"
              "vmovdqa64 512(%[acc]), %%zmm8\n\t"
              "vmovdqa64 576(%[acc]), %%zmm9\n\t"
              "vmovdqa64 640(%[acc]), %%zmm10\n\t"
              "vmovdqa64 704(%[acc]), %%zmm11\n\t"
              "1:\n\t"
              BCT_INT8_KSTEP
              "dec %[n]\n\t"
              "jnz 1b\n\t"
              "vmovdqa64 %%zmm0, 0(%[acc])\n\t"
              "vmovdqa64 %%zmm1, 64(%[acc])\n\t"
              "vmovdqa64 %%zmm2, 128(%[acc])\n\t"
              "vmovdqa64 %%zmm3, 192(%[acc])\n\t"
              "vmovdqa64 %%zmm4, 256(%[acc])\n\t"
              "vmovdqa64 %%zmm5, 320(%[acc])\n\t"
              "vmovdqa64 %%zmm6, 384(%[acc])\n\t"
              "vmovdqa64 %%zmm7, 448(%[acc])\n\t"
              "vmovdqa64 %%zmm8, 512(%[acc])\n\t"
              "vmovdqa64 %%zmm9, 576(%[acc])\n\t"
              "vmovdqa64 %%zmm10, 640(%[acc])\n\t"
              "vmovdqa64 %%zmm11, 704(%[acc])\n\t"
              : [w] "+r"(wc), [x] "+r"(x), [n] "+r"(count)
              : [acc] "r"(&accm[0][0]), [pb] "r"(pb), [lda] "r"(lda), [lda3] "r"(lda3)
              : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8",
                "zmm9", "zmm10", "zmm11", "zmm28", "zmm29", "zmm30", "zmm31", "memory", "cc");
        } else {
          asm volatile(
              "vmovdqa64 0(%[acc]), %%zmm0\n\t"
              "vmovdqa64 64(%[acc]), %%zmm1\n\t"
              "vmovdqa64 128(%[acc]), %%zmm2\n\t"
              "vmovdqa64 192(%[acc]), %%zmm3\n\t"
              "vmovdqa64 256(%[acc]), %%zmm4\n\t"
              "vmovdqa64 320(%[acc]), %%zmm5\n\t"
              "vmovdqa64 384(%[acc]), %%zmm6\n\t"
              "vmovdqa64 448(%[acc]), %%zmm7\n\t"
              "vmovdqa64 512(%[acc]), %%zmm8\n\t"
              "vmovdqa64 576(%[acc]), %%zmm9\n\t"
              "vmovdqa64 640(%[acc]), %%zmm10\n\t"
              "vmovdqa64 704(%[acc]), %%zmm11\n\t"
              "1:\n\t"
              BCT_INT4_KSTEP("%[m4]")
              "dec %[n]\n\t"
              "jnz 1b\n\t"
              "vmovdqa64 %%zmm0, 0(%[acc])\n\t"
              "vmovdqa64 %%zmm1, 64(%[acc])\n\t"
              "vmovdqa64 %%zmm2, 128(%[acc])\n\t"
              "vmovdqa64 %%zmm3, 192(%[acc])\n\t"
              "vmovdqa64 %%zmm4, 256(%[acc])\n\t"
              "vmovdqa64 %%zmm5, 320(%[acc])\n\t"
              "vmovdqa64 %%zmm6, 384(%[acc])\n\t"
              "vmovdqa64 %%zmm7, 448(%[acc])\n\t"
              "vmovdqa64 %%zmm8, 512(%[acc])\n\t"
              "vmovdqa64 %%zmm9, 576(%[acc])\n\t"
              "vmovdqa64 %%zmm10, 640(%[acc])\n\t"
              "vmovdqa64 %%zmm11, 704(%[acc])\n\t"
              : [w] "+r"(wc), [x] "+r"(x), [n] "+r"(count)
              : [acc] "r"(&accm[0][0]), [pb] "r"(pb), [lda] "r"(lda), [lda3] "r"(lda3),
                [m4] "v"(low4)
              : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8",
                "zmm9", "zmm10", "zmm11", "zmm24", "zmm25", "zmm26", "zmm27", "zmm28",
                "zmm29", "zmm30", "zmm31", "memory", "cc");
        }
        BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm512_load_si512(reinterpret_cast<const void*>(accm[r * NV + v]));
      } else if (!INT4) {
#pragma GCC unroll 1
        for (int64_t c = 0; c < chunks; ++c) {
          __m512i wv[NV];
          BCT_UNROLL for (int v = 0; v < NV; ++v)
            wv[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(wj + v * pb + c * 64));
          BCT_UNROLL for (int r = 0; r < MR; ++r) {
            int32_t x4;
            std::memcpy(&x4, xr[r] + xo + 4 * c, 4);
            const __m512i xb = _mm512_set1_epi32(x4);
            BCT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Dpbusd(acc[r][v], wv[v], xb);
          }
        }
      } else {
#pragma GCC unroll 1
        for (int64_t c = 0; c < chunks; ++c) {
          __m512i lo[NV], hi[NV];
          BCT_UNROLL for (int v = 0; v < NV; ++v) {
            const __m512i raw =
                _mm512_loadu_si512(reinterpret_cast<const void*>(wj + v * pb + c * 64));
            lo[v] = _mm512_and_si512(raw, low4);
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          }
          BCT_UNROLL for (int r = 0; r < MR; ++r) {
            int32_t x0, x1;
            std::memcpy(&x0, xr[r] + xo + 8 * c, 4);
            std::memcpy(&x1, xr[r] + xo + 8 * c + 4, 4);
            const __m512i xb0 = _mm512_set1_epi32(x0), xb1 = _mm512_set1_epi32(x1);
            BCT_UNROLL for (int v = 0; v < NV; ++v) {
              acc[r][v] = Dpbusd(acc[r][v], lo[v], xb0);
              acc[r][v] = Dpbusd(acc[r][v], hi[v], xb1);
            }
          }
        }
      }
      // float epilogue of the segment
      BCT_UNROLL for (int r = 0; r < MR; ++r) {
        const __m512 sx = _mm512_set1_ps(op.sx[(m0 + r) * w.nseg + j]);
        const __m512 sumx = INT4 ? _mm512_set1_ps(op.sumx[(m0 + r) * w.nseg + j]) : sx;
        BCT_UNROLL for (int v = 0; v < NV; ++v) {
          __m512 d = _mm512_cvtepi32_ps(acc[r][v]);
          if (INT4) {  // d - (zp + 8) * sum(x): integers below 2^24, exact
            const __m512 zpp = _mm512_loadu_ps(w.zpp.data() + b * w.npad + (p0 + v) * kPanel);
            d = _mm512_fnmadd_ps(zpp, sumx, d);
          }
          if (op.seg) {
            alignas(64) int32_t lanes[kPanel];
            _mm512_store_si512(reinterpret_cast<void*>(lanes), _mm512_cvtps_epi32(d));
            StoreSegmentSums(op, m0 + r, j, (p0 + v) * kPanel, lanes, kPanel);
          }
          if (SPB1) {  // f + round(d * sw) * 2^e: the product by 2^e is exact
            const __m512 u = _mm512_mul_ps(d, _mm512_loadu_ps(swb + v * kPanel));
            acc_f[r][v] = _mm512_fmadd_ps(u, sx, acc_f[r][v]);
          } else {  // t + d * 2^e: exact product
            acc_f[r][v] = _mm512_fmadd_ps(d, sx, acc_f[r][v]);
          }
        }
      }
    }
    if (!SPB1)  // f = f + round(t * sw), f in y
      BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v) {
        const __m512 p = Rounded512(_mm512_mul_ps(acc_f[r][v], _mm512_loadu_ps(swb + v * kPanel)));
        float* dst = y_at(r, v);
        _mm512_mask_storeu_ps(dst, mask[v], _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], dst), p));
      }
  }
  BCT_UNROLL for (int r = 0; r < MR; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v) {
    float* dst = y_at(r, v);
    if (!SPB1 && !last) continue;  // already in y
    __m512 out = SPB1 ? acc_f[r][v] : _mm512_maskz_loadu_ps(mask[v], dst);
    if (last) {
      if (op.bias) out = _mm512_add_ps(out, _mm512_loadu_ps(op.bias + (p0 + v) * kPanel));
      if (op.ymul) out = _mm512_mul_ps(out, _mm512_set1_ps(*op.ymul));
    }
    _mm512_mask_storeu_ps(dst, mask[v], out);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 path: a panel is two ymm halves (columns 0-7, 8-15); MR rows x 1 panel per tile.

__attribute__((target("avx2"))) inline __m256 Rounded256(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

template <int MR, bool INT4, bool SPB1>
__attribute__((target("avx2,fma"))) void TileAvx2(const Operands& op, int64_t m0, int64_t p) {
  const PackedWeights& w = *op.w;
  const int64_t seg_bytes = w.chunks * 64;
  const uint8_t* wp = w.data.data() + p * w.panel_bytes();
  const int8_t* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = op.a + (m0 + r) * op.lda;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));

  __m256 f[MR][2];
  for (int r = 0; r < MR; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nblk; ++b) {
    const float* swb = w.sw.data() + b * w.npad + p * kPanel;
    __m256 t[MR][2];
    for (int r = 0; r < MR; ++r) t[r][0] = t[r][1] = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < w.spb; ++jj) {
      const int64_t j = b * w.spb + jj;
      __m256i acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      const uint8_t* wj = wp + j * seg_bytes;
      const int64_t xo = j * w.gp;
      for (int64_t c = 0; c < w.chunks; ++c) {
        const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * 64));
        const __m256i raw1 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * 64 + 32));
        if (!INT4) {
          const __m256i ws[2] = {_mm256_xor_si256(raw0, flip), _mm256_xor_si256(raw1, flip)};
          for (int r = 0; r < MR; ++r) {
            int32_t x4;
            std::memcpy(&x4, xr[r] + xo + 4 * c, 4);
            const __m256i xb = _mm256_set1_epi32(x4);
            const __m256i ax = _mm256_abs_epi8(xb);
            for (int h = 0; h < 2; ++h) {
              const __m256i prod = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(ws[h], xb));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(prod, ones16));
            }
          }
        } else {
          const __m256i lo[2] = {_mm256_and_si256(raw0, low4), _mm256_and_si256(raw1, low4)};
          const __m256i hi[2] = {_mm256_and_si256(_mm256_srli_epi16(raw0, 4), low4),
                                 _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low4)};
          for (int r = 0; r < MR; ++r) {
            int32_t x0, x1;
            std::memcpy(&x0, xr[r] + xo + 8 * c, 4);
            std::memcpy(&x1, xr[r] + xo + 8 * c + 4, 4);
            const __m256i xb0 = _mm256_set1_epi32(x0), xb1 = _mm256_set1_epi32(x1);
            for (int h = 0; h < 2; ++h) {
              // pairs <= 2 * 15 * 128 each, their sum < 2^15: no saturation
              const __m256i prod = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xb0),
                                                    _mm256_maddubs_epi16(hi[h], xb1));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(prod, ones16));
            }
          }
        }
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 sx = _mm256_set1_ps(op.sx[(m0 + r) * w.nseg + j]);
        const __m256 sumx = INT4 ? _mm256_set1_ps(op.sumx[(m0 + r) * w.nseg + j]) : sx;
        for (int h = 0; h < 2; ++h) {
          __m256 d = _mm256_cvtepi32_ps(acc[r][h]);
          if (INT4) {
            const __m256 zpp = _mm256_loadu_ps(w.zpp.data() + b * w.npad + p * kPanel + 8 * h);
            d = _mm256_fnmadd_ps(zpp, sumx, d);
          }
          if (op.seg) {
            const int64_t col0 = p * kPanel + 8 * h;
            alignas(32) int32_t lanes[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_cvtps_epi32(d));
            const int64_t valid = std::min<int64_t>(8, w.n - col0);
            if (valid > 0)
              std::memcpy(op.seg + ((m0 + r) * w.nseg + j) * w.n + col0, lanes,
                          sizeof(int32_t) * static_cast<size_t>(valid));
          }
          if (SPB1) {
            const __m256 u = _mm256_mul_ps(d, _mm256_loadu_ps(swb + 8 * h));
            f[r][h] = _mm256_fmadd_ps(u, sx, f[r][h]);
          } else {
            t[r][h] = _mm256_fmadd_ps(d, sx, t[r][h]);
          }
        }
      }
    }
    if (!SPB1)
      for (int r = 0; r < MR; ++r)
        for (int h = 0; h < 2; ++h)
          f[r][h] = _mm256_add_ps(
              f[r][h], Rounded256(_mm256_mul_ps(t[r][h], _mm256_loadu_ps(swb + 8 * h))));
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = op.y + (m0 + r) * w.n;
    const int64_t col0 = p * kPanel;
    alignas(32) float lanes[kPanel];
    for (int h = 0; h < 2; ++h) {
      __m256 out = f[r][h];
      if (op.bias) out = _mm256_add_ps(out, _mm256_loadu_ps(op.bias + col0 + 8 * h));
      if (op.ymul) out = _mm256_mul_ps(out, _mm256_set1_ps(*op.ymul));
      _mm256_store_ps(lanes + 8 * h, out);
    }
    const int64_t valid = std::min<int64_t>(kPanel, w.n - col0);
    std::memcpy(yr + col0, lanes, sizeof(float) * static_cast<size_t>(valid));
  }
}

// ---------------------------------------------------------------------------------------------
// AMX path (amx-int8): tdpbssd on 16 x 16 tiles (16 rows x 1 panel), one int32 tile per K
// segment, stored to memory; then the same float steps as the other paths, in AVX-512 (RunAmx
// below has the schedule).
//
// Weights: 8-bit ones are packed signed (PackedWeights::signed8); the 64-byte chunks of a
// panel are then exactly the rows of a B tile (4 consecutive k of the 16 columns). int4 ones
// stay packed as nibbles (no extra memory) and each task unpacks one panel at a time to
// q - zp (in -15..15) into per-thread scratch, reused by all its row tiles. Both make
// tdpbssd's sums d itself: no correction term.
// The tile configuration is per thread, and other code on the pool threads may change or
// release it, so every task loads it (ldtilecfg, ~60 ns) and releases the tiles at its end.
// GCC's AMX intrinsics declare no memory operands for tileloadd / tilestored (and only 8 bytes
// for ldtilecfg), so the instructions are written out here with memory clobbers.
//
// Measured on one Sapphire Rapids core (microbenchmarks): the tile unit needs ~10 ns per
// 16 x 16 x 32 tile product including its store, the float steps of one such tile ~8 ns, and
// within one thread the two hardly overlap. In this kernel (K = 384, N = 1536, 128 rows, one
// thread) a tile-segment costs ~29 ns against ~43 ns on the AVX-512 VNNI path.

#define BCT_TILE_ZERO(t) asm volatile("tilezero %%tmm" #t ::)
#define BCT_TILE_LOAD(t, base, stride) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(stride) : "memory")
#define BCT_TILE_STORE(t, base, stride) \
  asm volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(stride) : "memory")
#define BCT_TDPBSSD(c, a, b) asm volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// K bytes per tdpbssd: the largest multiple of 4 up to 64 that divides the padded segment.
int64_t AmxKStep(int64_t gp) {
  for (int64_t kt = std::min<int64_t>(64, gp) / 4 * 4; kt > 4; kt -= 4)
    if (gp % kt == 0) return kt;
  return 4;
}

class AmxTiles {  // the tile configuration of one task: loaded now, released at the end
 public:
  explicit AmxTiles(int64_t kt) {
    AmxTileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // int32 sums
    for (int t = 4; t < 8; t += 2) {
      cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(kt);        // activations
      cfg.rows[t + 1] = static_cast<uint8_t>(kt / 4), cfg.colsb[t + 1] = 64;  // weights
    }
    asm volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  ~AmxTiles() { asm volatile("tilerelease" ::: "memory"); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// The int4 weights of panel p as signed bytes q - zp in the int8 layout (B tiles).
__attribute__((target("avx512f,avx512bw,avx512dq"))) void UnpackInt4PanelAmx(
    const PackedWeights& w, int64_t p, int8_t* dst) {
  const uint8_t* src = w.data.data() + p * w.panel_bytes();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < w.nblk; ++b) {
    // zp + 8 of the 16 columns, in each byte of their 4-byte group
    const __m512i zp = _mm512_mullo_epi32(
        _mm512_maskz_cvtps_epi32(0xFFFF, _mm512_loadu_ps(w.zpp.data() + b * w.npad + p * kPanel)),
        _mm512_set1_epi32(0x01010101));
    for (int64_t j = b * w.spb; j < (b + 1) * w.spb; ++j)
      for (int64_t c = 0; c < w.chunks; ++c) {
        const __m512i raw =
            _mm512_loadu_si512(reinterpret_cast<const void*>(src + (j * w.chunks + c) * 64));
        const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(raw, low4), zp);
        const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), zp);
        int8_t* out = dst + (j * 2 * w.chunks + 2 * c) * 64;
        _mm512_store_si512(reinterpret_cast<void*>(out), lo);
        _mm512_store_si512(reinterpret_cast<void*>(out + 64), hi);
      }
  }
}

// Rows [m0, m1) x panels [p0, p1) on AMX. The unit of work is a 16 x 16 tile (one row tile x
// one panel) over all of K; tiles go panel by panel (int4 weights: each panel unpacked once,
// for all its row tiles), and inside a tile the segments go in groups of four through tmm0-3
// (four independent tdpbssd in flight, so the tile unit pipelines them), their operands
// alternating between tmm4/5 and tmm6/7 (activations: 16 rows x kt bytes, kt a divisor of the
// padded segment, at most 64; weights: kt/4 rows x 64 bytes). The int32 sums of a group are
// stored to memory and their float epilogue runs one step later, after the tile instructions
// of the next group -- of the same tile or of the next one -- are issued: its loads do not wait
// for a tile store just issued, and the tile unit does not drain between tiles. The 16 float
// accumulators of the tile (f with one segment per weight block; else t, the sum of the
// current block, with f in memory) stay in registers. A last partial row tile reads a
// zero-padded copy of its rows (a tile load reads 16); its extra rows are computed, never
// stored.
template <bool SPB1>
__attribute__((target("avx512f,avx512bw,avx512dq,fma"))) void RunAmx(
    const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  const int64_t lda = op.lda, gp = w.gp, kt = AmxKStep(gp), ksteps = gp / kt;
  const int64_t nseg = w.nseg, spb = w.spb;
  const int64_t full_end = m0 + (m1 - m0) / 16 * 16;
  const int8_t* tail = nullptr;
  if (full_end < m1) {
    int8_t* t = ThreadScratch<int8_t>(kSlotATail, static_cast<size_t>(16 * lda));
    std::memset(t, 0, static_cast<size_t>(16 * lda));
    std::memcpy(t, op.a + full_end * lda, static_cast<size_t>((m1 - full_end) * lda));
    tail = t;
  }
  // int4: two unpacked panels (the next one is written while tile loads of the last may be
  // in flight)
  const int64_t panel_elems = nseg * gp * kPanel;
  int8_t* unpacked = w.int4 ? ThreadScratch<int8_t>(kSlotB, static_cast<size_t>(2 * panel_elems))
                            : nullptr;
  const int64_t nrt = (m1 - m0 + 15) / 16;
  const float* sxt = op.sxt + (m0 / 16) * nseg * 16;  // m0 is a multiple of 16
  auto panel_weights = [&](int64_t pi) {
    return w.int4 ? unpacked + (pi & 1) * panel_elems
                  : reinterpret_cast<const int8_t*>(w.data.data() + (p0 + pi) * w.panel_bytes());
  };

  alignas(64) int32_t buf[2][4][16][kPanel];  // [step parity][segment in group]
  alignas(64) float fm[SPB1 ? 1 : 16][kPanel];
  __m512 acc[16];
  BCT_UNROLL for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  if (!SPB1) std::memset(fm, 0, sizeof fm);

#define BCT_AMX_SEGMENT(C, A, B, j)                          \
  do {                                                        \
    BCT_TILE_ZERO(C);                                         \
    for (int64_t s = 0; s < ksteps; ++s) {                    \
      const int64_t ko = (j) * gp + s * kt;                   \
      BCT_TILE_LOAD(A, a + ko, lda);                          \
      BCT_TILE_LOAD(B, wb + ko * 16, int64_t{64});            \
      BCT_TDPBSSD(C, A, B);                                   \
    }                                                         \
  } while (0)

  // Weights come from L3 or memory (a model's do not fit in L2), and a tile load that misses
  // stalls the tile unit: the next panel is prefetched while the current one is in use, a
  // slice per step, and the first one now.
  const int64_t pbytes = w.panel_bytes(), steps_per_panel = nrt * ((nseg + 3) / 4);
  const int64_t pf_lines = (pbytes / 64 + steps_per_panel - 1) / steps_per_panel;
  auto prefetch = [&](int64_t pi, int64_t line0, int64_t lines) {
    if (pi >= p1 - p0) return;
    const char* base = reinterpret_cast<const char*>(w.data.data() + (p0 + pi) * pbytes);
    for (int64_t l = line0; l < std::min(line0 + lines, pbytes / 64); ++l)
      _mm_prefetch(base + l * 64, _MM_HINT_T0);
  };
  prefetch(0, 0, pbytes / 64);

  AmxTiles tiles(kt);
  // position of the step being issued (pi, rt, g) and of the one in the epilogue (e*); the
  // epilogue's weight block b and segment jb in it (no divisions in the loop)
  const int64_t ngroups = (nseg + 3) / 4, steps = (p1 - p0) * nrt * ngroups;
  int64_t pi = 0, rt = 0, g = 0, epi = 0, ert = 0, eg = 0, b = 0, jb = 0;
  for (int64_t step = 0; step <= steps; ++step) {
    if (step < steps) {  // issue group g of tile (rt, pi)
      prefetch(pi + 1, (rt * ngroups + g) * pf_lines, pf_lines);
      if (w.int4 && g == 0 && rt == 0)
        UnpackInt4PanelAmx(w, p0 + pi, unpacked + (pi & 1) * panel_elems);
      const int8_t* wb = panel_weights(pi);
      const int64_t m = m0 + 16 * rt;
      const int8_t* a = m < full_end ? op.a + m * lda : tail;
      const int64_t j0 = 4 * g, cnt = std::min<int64_t>(4, nseg - j0);
      int32_t(*d)[16][kPanel] = buf[step & 1];
      BCT_AMX_SEGMENT(0, 4, 5, j0);
      if (cnt > 1) BCT_AMX_SEGMENT(1, 6, 7, j0 + 1);
      if (cnt > 2) BCT_AMX_SEGMENT(2, 4, 5, j0 + 2);
      if (cnt > 3) BCT_AMX_SEGMENT(3, 6, 7, j0 + 3);
      BCT_TILE_STORE(0, &d[0][0][0], int64_t{64});
      if (cnt > 1) BCT_TILE_STORE(1, &d[1][0][0], int64_t{64});
      if (cnt > 2) BCT_TILE_STORE(2, &d[2][0][0], int64_t{64});
      if (cnt > 3) BCT_TILE_STORE(3, &d[3][0][0], int64_t{64});
      if (++g == ngroups) {
        g = 0;
        if (++rt == nrt) rt = 0, ++pi;
      }
    }
    if (step == 0) continue;
    // the float steps of the previous step's segments (ref_matmul.py "Arithmetic")
    const int64_t prev = step - 1;
    const int64_t m = m0 + 16 * ert, col0 = (p0 + epi) * kPanel;
    const int rows = static_cast<int>(std::min<int64_t>(16, m1 - m));
    const int64_t valid = std::min<int64_t>(kPanel, w.n - col0);
    const float* sx = sxt + ert * nseg * 16;
    const float* swp = w.sw.data() + col0;
    const int64_t j0 = 4 * eg, cnt = std::min<int64_t>(4, nseg - j0);
    for (int64_t q = 0; q < cnt; ++q) {
      const int64_t j = j0 + q;
      const int32_t(*d)[kPanel] = buf[prev & 1][q];
      const __m512 sw = _mm512_loadu_ps(swp + b * w.npad);
      if (op.seg)
        for (int r = 0; r < rows; ++r)
          std::memcpy(op.seg + ((m + r) * nseg + j) * w.n + col0, d[r],
                      sizeof(int32_t) * static_cast<size_t>(valid));
      BCT_UNROLL for (int r = 0; r < 16; ++r) {
        // (maskz with all lanes: the same instruction, without GCC 12's -Wmaybe-uninitialized
        // false positive on _mm512_undefined_ps in the unmasked intrinsic)
        const __m512 dv = _mm512_maskz_cvtepi32_ps(
            0xFFFF, _mm512_load_si512(reinterpret_cast<const void*>(d[r])));
        const __m512 s = _mm512_set1_ps(sx[j * 16 + r]);
        if (SPB1)  // f + round(d * sw) * 2^e: exact product
          acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dv, sw), s, acc[r]);
        else  // t + d * 2^e: exact product
          acc[r] = _mm512_fmadd_ps(dv, s, acc[r]);
      }
      if (++jb == spb) {
        jb = 0;
        ++b;
        if (!SPB1)  // f = f + round(t * sw), t = 0
          BCT_UNROLL for (int r = 0; r < 16; ++r) {
            _mm512_store_ps(fm[r], _mm512_add_ps(_mm512_load_ps(fm[r]),
                                                 Rounded512(_mm512_mul_ps(acc[r], sw))));
            acc[r] = _mm512_setzero_ps();
          }
      }
    }
    if (++eg == ngroups) {  // the tile is done: y = (f + bias) * multiplier; restart from 0
      eg = 0;
      b = 0;
      const __mmask16 mask =
          valid >= kPanel ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      const __m512 bias = op.bias ? _mm512_loadu_ps(op.bias + col0) : _mm512_setzero_ps();
      const __m512 ymul = op.ymul ? _mm512_set1_ps(*op.ymul) : _mm512_setzero_ps();
      BCT_UNROLL for (int r = 0; r < 16; ++r) {
        __m512 out = SPB1 ? acc[r] : _mm512_load_ps(fm[r]);
        if (op.bias) out = _mm512_add_ps(out, bias);
        if (op.ymul) out = _mm512_mul_ps(out, ymul);
        if (r < rows) _mm512_mask_storeu_ps(op.y + (m + r) * w.n + col0, mask, out);
        acc[r] = _mm512_setzero_ps();
        if (!SPB1) _mm512_store_ps(fm[r], acc[r]);
      }
      if (++ert == nrt) ert = 0, ++epi;
    }
  }
#undef BCT_AMX_SEGMENT
}

// ---------------------------------------------------------------------------------------------
// Dispatch of one (row range, panel range) to the register tiles.

constexpr int kMrAvx512 = 4;
constexpr int kNvAvx512 = 3;
constexpr int kMrAvx2 = 2;
constexpr int kMrAmx = 16;      // rows of a tile
constexpr int kPanelsAmx = 4;   // panels per task
constexpr int64_t kRowsPerTask = 32;  // BlockMatMul's whole-row tasks (enough rows)
constexpr int64_t kL1SliceBytes = 16 * 1024;  // weights of one K slice of a column tile

template <int MR, bool INT4, bool SPB1>
void RowsAvx512(const Operands& op, int64_t m, int64_t p, int64_t nv, int64_t b0, int64_t b1) {
  static_assert(kNvAvx512 == 3, "dispatch below covers NV = 1..3");
  switch (nv) {
    case 3:
      TileAvx512<MR, 3, INT4, SPB1>(op, m, p, b0, b1);
      break;
    case 2:
      TileAvx512<MR, 2, INT4, SPB1>(op, m, p, b0, b1);
      break;
    default:
      TileAvx512<MR, 1, INT4, SPB1>(op, m, p, b0, b1);
  }
}

// Rows [m0, m1) x panels [p0, p1): column tiles of NV panels, K in slices of whole weight
// blocks (about kL1SliceBytes of weights), all row tiles per slice.
template <bool INT4, bool SPB1>
void RunAvx512(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  const int64_t block_bytes = w.spb * w.chunks * 64 * kNvAvx512;  // one weight block, NV panels
  const int64_t slice = std::max<int64_t>(1, kL1SliceBytes / block_bytes);
  for (int64_t p = p0; p < p1; p += kNvAvx512) {
    const int64_t nv = std::min<int64_t>(kNvAvx512, p1 - p);
    for (int64_t b0 = 0; b0 < w.nblk; b0 += slice) {
      const int64_t b1 = std::min(w.nblk, b0 + slice);
      int64_t m = m0;
      for (; m + kMrAvx512 <= m1; m += kMrAvx512)
        RowsAvx512<kMrAvx512, INT4, SPB1>(op, m, p, nv, b0, b1);
      for (; m < m1; ++m) RowsAvx512<1, INT4, SPB1>(op, m, p, nv, b0, b1);
    }
  }
}

template <bool INT4, bool SPB1>
void RunAvx2(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + kMrAvx2 <= m1; m += kMrAvx2) TileAvx2<kMrAvx2, INT4, SPB1>(op, m, p);
    for (; m < m1; ++m) TileAvx2<1, INT4, SPB1>(op, m, p);
  }
}

void RunTile(Isa isa, const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const bool int4 = op.w->int4, spb1 = op.w->spb == 1;
  if (isa == kAmx) {
    spb1 ? RunAmx<true>(op, m0, m1, p0, p1) : RunAmx<false>(op, m0, m1, p0, p1);
  } else if (isa == kAvx512) {
    if (int4)
      spb1 ? RunAvx512<true, true>(op, m0, m1, p0, p1) : RunAvx512<true, false>(op, m0, m1, p0, p1);
    else
      spb1 ? RunAvx512<false, true>(op, m0, m1, p0, p1)
           : RunAvx512<false, false>(op, m0, m1, p0, p1);
  } else if (isa == kAvx2) {
    if (int4)
      spb1 ? RunAvx2<true, true>(op, m0, m1, p0, p1) : RunAvx2<true, false>(op, m0, m1, p0, p1);
    else
      spb1 ? RunAvx2<false, true>(op, m0, m1, p0, p1) : RunAvx2<false, false>(op, m0, m1, p0, p1);
  } else {
    TileScalar(op, m0, m1 - m0, p0, p1 - p0);
  }
}

// ---------------------------------------------------------------------------------------------
// Constant inputs

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetShape();
}

// The values of a constant int8 / int4 / uint4 tensor, unpacked to int32, with its shape.
std::vector<int32_t> ConstInts(const Ort::ConstKernelInfo& info, size_t index, const char* name,
                               std::vector<int64_t>* shape, bool required) {
  const bool present = index < info.GetInputCount() && !info.GetInputName(index).empty();
  if (!present) {
    if (required) Fail(std::string(name) + " is required");
    return {};
  }
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) Fail(std::string(name) + " must be a constant initializer");
  auto ti = v.GetTensorTypeAndShapeInfo();
  *shape = ti.GetShape();
  const size_t count = ti.GetElementCount();
  const auto type = ti.GetElementType();
  std::vector<int32_t> out(count);
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
    const int8_t* p = static_cast<const int8_t*>(v.GetTensorRawData());
    for (size_t i = 0; i < count; ++i) out[i] = p[i];
  } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4 ||
             type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT4) {
    const uint8_t* p = static_cast<const uint8_t*>(v.GetTensorRawData());
    const bool is_signed = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;
    for (size_t i = 0; i < count; ++i) {
      int32_t nib = (i % 2 == 0) ? (p[i / 2] & 0x0F) : (p[i / 2] >> 4);
      if (is_signed && nib > 7) nib -= 16;
      out[i] = nib;
    }
  } else {
    Fail(std::string(name) + " must be int8, int4 or uint4");
  }
  return out;
}

bool IsInt4(const Ort::ConstKernelInfo& info, size_t index) {
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  return v.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;
}

// ---------------------------------------------------------------------------------------------
// The kernel

enum Input : size_t {
  kX = 0, kXScale, kCodes, kScales, kScaleBase, kZeroPoints, kBias, kYMul, kResidual,
  kResidualScale, kMultipliers, kNMPattern, kNumInputs
};
enum Output : size_t { kY = 0, kYQ, kYScale, kSegments, kNumOutputs };

struct BlockMatMulKernel {
  BlockMatMulKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info{raw_info};
    static const int64_t k8 = 8, k0 = 0;
    const int64_t block = int_attribute(info, "BlockMatMul", "block_size", nullptr);
    const int64_t frac_bits = int_attribute(info, "BlockMatMul", "frac_bits", nullptr);
    act_block_ = int_attribute(info, "BlockMatMul", "act_block_size", nullptr);
    act_bits_ = static_cast<int>(int_attribute(info, "BlockMatMul", "act_bits", &k8));
    out_block_ = int_attribute(info, "BlockMatMul", "out_block_size", &k0);
    out_bits_ = static_cast<int>(int_attribute(info, "BlockMatMul", "out_bits", &k8));
    residual_block_ = int_attribute(info, "BlockMatMul", "residual_block_size", &k0);
    const int64_t superblock = int_attribute(info, "BlockMatMul", "superblock", &k0);
    if (act_bits_ < 2 || act_bits_ > 8 || out_bits_ < 2 || out_bits_ > 8)
      Fail("act_bits and out_bits must be in 2..8");
    if (block < 1 || act_block_ < 1 || out_block_ < 0 || residual_block_ < 0)
      Fail("block sizes must be >= 1");
    if (frac_bits < 0 || frac_bits > 4) Fail("frac_bits must be in 0..4");
    if (superblock < 0 || (superblock > 0 && (superblock <= block || superblock % block)))
      Fail("superblock must be 0 or a multiple (> 1) of block_size");
    isa_ = ChooseIsa(std::getenv("BCTONNX_ISA"));
    PackWeights(info, block, frac_bits, superblock);
    // a constant bias is padded once; otherwise it is read at run time
    int is_constant = 0;
    if (kBias < info.GetInputCount() && !info.GetInputName(kBias).empty()) {
      Ort::ConstValue b = info.GetTensorConstantInput(kBias, &is_constant);
      has_bias_ = true;
      if (is_constant && b != nullptr) {
        CheckBias(ShapeOf(b));
        bias_.assign(static_cast<size_t>(w_.npad), 0.0f);
        std::memcpy(bias_.data(), b.GetTensorData<float>(), sizeof(float) * w_.n);
      }
    }
  }

  void CheckBias(const std::vector<int64_t>& shape) const {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    if (shape.empty() || shape.back() != w_.n || count != w_.n)
      Fail("bias must have N = " + std::to_string(w_.n) + " elements, got " + shape_str(shape));
  }

  // Superblock weights (blockformat.widen_superblocks): the codes become m * (q - zp), int8,
  // in blocks of the superblock, without zero points; from here on 8-bit weights.
  static void WidenSuperblocks(const Ort::ConstKernelInfo& info, int64_t block,
                               const std::vector<int64_t>& cshape, std::vector<int32_t>& codes,
                               std::vector<int32_t>& zps, const std::vector<int64_t>& zshape) {
    std::vector<int64_t> mshape;
    const std::vector<int32_t> mult = ConstInts(info, kMultipliers, "w_multipliers", &mshape, true);
    if (cshape[0] % block)
      Fail("block_size " + std::to_string(block) + " does not divide K = " +
           std::to_string(cshape[0]));
    const std::vector<int64_t> blocked{cshape[0] / block, cshape[1]};
    if (mshape != blocked)
      Fail("w_multipliers must be " + shape_str(blocked) + ", got " + shape_str(mshape));
    if (!zps.empty() && zshape != blocked)
      Fail("w_zero_points must be " + shape_str(blocked) + ", got " + shape_str(zshape));
    const int64_t n = cshape[1];
    for (int64_t k = 0; k < cshape[0]; ++k)
      for (int64_t c = 0; c < n; ++c) {
        const int64_t b = (k / block) * n + c;
        const int32_t v = mult[b] * (codes[k * n + c] - (zps.empty() ? 0 : zps[b]));
        if (v < -128 || v > 127) Fail("superblock weights: m * (q - zp) outside int8");
        codes[k * n + c] = v;
      }
    zps.clear();
  }

  void PackWeights(const Ort::ConstKernelInfo& info, int64_t block, int64_t frac_bits,
                   int64_t superblock) {
    std::vector<int64_t> cshape, sshape, bshape, zshape;
    std::vector<int32_t> codes = ConstInts(info, kCodes, "w_codes", &cshape, true);
    std::vector<int32_t> scodes = ConstInts(info, kScales, "w_scales", &sshape, true);
    const std::vector<int32_t> base = ConstInts(info, kScaleBase, "w_scale_base", &bshape, false);
    std::vector<int32_t> zps = ConstInts(info, kZeroPoints, "w_zero_points", &zshape, false);
    // --- N:M-sparse weights (nm_sparsity.h): kept codes + patterns -> dense codes, once ---
    static const int64_t kDense = 0;
    const int64_t nm_m = int_attribute(info, "BlockMatMul", "nm_m", &kDense);
    if (nm_m > 0) {
      std::vector<int64_t> pshape;
      const std::vector<int32_t> pattern =
          ConstInts(info, kNMPattern, "w_nm_pattern", &pshape, true);
      const int64_t nm_n = int_attribute(info, "BlockMatMul", "nm_n", nullptr);
      codes = ExpandNMCodes(codes, cshape, pattern, pshape, nm_n, nm_m, zps, block, &cshape);
    }
    // --- end of N:M ---
    if (cshape.size() != 2) Fail("w_codes must be [K, N], got " + shape_str(cshape));
    if (superblock > 0) {
      WidenSuperblocks(info, block, cshape, codes, zps, zshape);
      block = superblock;
    }
    PackedWeights& w = w_;
    w.k = cshape[0];
    w.n = cshape[1];
    w.block = block;
    w.act_block = act_block_;
    if (w.k < 1 || w.n < 1) Fail("empty weights " + shape_str(cshape));
    if (w.k % block) Fail("block_size " + std::to_string(block) + " does not divide K = " +
                          std::to_string(w.k));
    const int64_t lo = std::min(block, act_block_), hi = std::max(block, act_block_);
    if (hi % lo) Fail("block_size and act_block_size: one must divide the other");
    w.g = lo;
    w.nblk = w.k / block;
    w.nseg = w.k / w.g;
    w.spb = block / w.g;
    w.int4 = superblock == 0 && IsInt4(info, kCodes);
    w.signed8 = !w.int4 && isa_ == kAmx;
    w.gp = w.int4 ? (w.g + 7) / 8 * 8 : (w.g + 3) / 4 * 4;
    w.chunks = w.int4 ? w.gp / 8 : w.gp / 4;
    w.npanel = (w.n + kPanel - 1) / kPanel;
    w.npad = w.npanel * kPanel;
    const std::vector<int64_t> blocked{w.nblk, w.n};
    if (sshape != blocked) Fail("w_scales must be " + shape_str(blocked) + ", got " + shape_str(sshape));
    if (!base.empty()) {
      if (bshape != std::vector<int64_t>{1, w.n}) Fail("w_scale_base must be [1, N]");
      for (int64_t b = 0; b < w.nblk; ++b)
        for (int64_t c = 0; c < w.n; ++c) scodes[b * w.n + c] += base[c];
    }
    if (!zps.empty() && zshape != blocked)
      Fail("w_zero_points must be " + shape_str(blocked) + ", got " + shape_str(zshape));
    auto q_at = [&](int64_t k, int64_t c) { return codes[k * w.n + c]; };
    auto zp_at = [&](int64_t b, int64_t c) { return zps.empty() ? 0 : zps[b * w.n + c]; };

    w.sw.assign(static_cast<size_t>(w.nblk * w.npad), 0.0f);
    for (int64_t b = 0; b < w.nblk; ++b)
      for (int64_t c = 0; c < w.n; ++c) {
        const int32_t code = scodes[b * w.n + c];
        if (code < -128 || code > 127) Fail("weight scale code out of int8 range");
        // correctly rounded 2^(code / 2^F) (= blockformat.decode_scales)
        w.sw[b * w.npad + c] = static_cast<float>(std::exp2(static_cast<double>(code) /
                                                            static_cast<double>(1 << frac_bits)));
      }
    w.data.assign(static_cast<size_t>(w.npanel * w.panel_bytes()), 0);
    if (w.int4) {
      w.zpp.assign(static_cast<size_t>(w.nblk * w.npad), 0.0f);
      for (int64_t b = 0; b < w.nblk; ++b)
        for (int64_t c = 0; c < w.n; ++c) w.zpp[b * w.npad + c] = static_cast<float>(zp_at(b, c) + 8);
      for (int64_t k = 0; k < w.k; ++k)
        for (int64_t c = 0; c < w.n; ++c) {
          const int32_t u = q_at(k, c) + 8;
          if (u < 0 || u > 15) Fail("int4 code out of range");
          const int64_t j = k / w.g, kk = k % w.g;
          const int64_t p = c / kPanel, lane = c % kPanel;
          uint8_t& byte = w.data[p * w.panel_bytes() + (j * w.chunks + kk / 8) * 64 + lane * 4 +
                                 kk % 4];
          byte |= static_cast<uint8_t>((kk % 8) < 4 ? u : u << 4);
        }
    } else {
      for (int64_t k = 0; k < w.k; ++k)
        for (int64_t c = 0; c < w.n; ++c) {
          const int32_t s = q_at(k, c) - zp_at(k / block, c);
          if (s < -128 || s > 127)
            Fail("8-bit asymmetric weights (q - zp outside int8) are not supported");
          const int64_t j = k / w.g, kk = k % w.g;
          const int64_t p = c / kPanel, lane = c % kPanel;
          w.data[p * w.panel_bytes() + (j * w.chunks + kk / 4) * 64 + lane * 4 + kk % 4] =
              static_cast<uint8_t>(w.signed8 ? s : s + 128);
        }
      // padding rows (kk >= g) hold 0 + 128 -> weight 0 (their activations are 0 anyway)
      for (int64_t p = 0; p < (w.signed8 ? 0 : w.npanel); ++p)
        for (int64_t j = 0; j < w.nseg; ++j)
          for (int64_t kk = w.g; kk < w.gp; ++kk)
            for (int64_t lane = 0; lane < kPanel; ++lane)
              w.data[p * w.panel_bytes() + (j * w.chunks + kk / 4) * 64 + lane * 4 + kk % 4] = 128;
    }
  }

  // Per-call scratch: activation codes and per-segment scale / sums.
  struct Job {
    const BlockMatMulKernel* self;
    Operands op;
    const float* xf;      // float input or null
    const int8_t* xq;     // int8 input or null
    const float* xs;      // its scales
    int64_t rows, row_chunk, col_tiles, x_nb;
    bool codes_in_place;  // op.a is x itself (AMX, int8 x, unpadded segments)
    int8_t* yq;
    float* ys;
    const int8_t* rq;   // residual codes [rows][n] or null
    const float* rs;    // residual scales [rows][ceil(n / residual_block)]
    std::string error;
    std::mutex mu;
    void SetError(const std::string& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = e;
    }
  };

  // Activation codes of rows [r0, r1): quantize (float input) or copy (int8 input), segment
  // scales and sums (AMX: no sums, and int8 codes in unpadded segments are not copied).
  void PackRows(Job& job, int64_t r0, int64_t r1) const {
    const PackedWeights& w = w_;
    const int64_t lda = job.op.lda;
    std::vector<int8_t> codes(static_cast<size_t>(w.k));
    std::vector<int> exps(static_cast<size_t>(job.x_nb));
    for (int64_t m = r0; m < r1; ++m) {
      const int8_t* q = nullptr;
      if (job.xf) {
        QuantizeRow(isa_, job.xf + m * w.k, w.k, act_block_, act_bits_, codes.data(), exps.data());
        q = codes.data();
      } else {
        q = job.xq + m * w.k;
        for (int64_t b = 0; b < job.x_nb; ++b) exps[b] = pow2_exponent(job.xs[m * job.x_nb + b]);
      }
      float* sx = const_cast<float*>(job.op.sx) + m * w.nseg;
      if (isa_ == kAmx) {
        for (int64_t j = 0; j < w.nseg; ++j) sx[j] = pow2_float(exps[(j * w.g) / act_block_]);
        if (job.codes_in_place) continue;
        int8_t* a = const_cast<int8_t*>(job.op.a) + m * lda;
        for (int64_t j = 0; j < w.nseg; ++j) {
          std::memcpy(a + j * w.gp, q + j * w.g, static_cast<size_t>(w.g));
          std::memset(a + j * w.gp + w.g, 0, static_cast<size_t>(w.gp - w.g));
        }
        continue;
      }
      int8_t* a = const_cast<int8_t*>(job.op.a) + m * lda;
      for (int64_t j = 0; j < w.nseg; ++j) {
        const int8_t* __restrict src = q + j * w.g;
        int8_t* __restrict dst = a + j * w.gp;
        int32_t sum = 0;
        for (int64_t i = 0; i < w.g; ++i) sum += src[i];
        std::memcpy(dst, src, static_cast<size_t>(w.g));
        for (int64_t i = w.g; i < w.gp; ++i) dst[i] = 0;
        sx[j] = pow2_float(exps[(j * w.g) / act_block_]);
        if (w.int4)
          const_cast<float*>(job.op.sumx)[m * w.nseg + j] = static_cast<float>(sum);
        else
          const_cast<int32_t*>(job.op.corr)[m * w.nseg + j] = -128 * sum;
      }
    }
    if (job.op.sxt)  // pack tasks cover 16 rows each
      ScalesByTile(job.op.sx, w.nseg, r0, r1, job.rows, const_cast<float*>(job.op.sxt));
  }

  // Task i of a row step (PackRows, QuantizeOutputRows): rows [i, i + 1) * row_chunk.
  template <void (BlockMatMulKernel::*Step)(Job&, int64_t, int64_t) const>
  static void RowChunkTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    try {
      const int64_t r0 = static_cast<int64_t>(i) * job.row_chunk;
      (job.self->*Step)(job, r0, std::min(job.rows, r0 + job.row_chunk));
    } catch (const std::exception& e) {
      job.SetError(e.what());
    }
  }

  static void MatMulTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    if (!job.error.empty()) return;
    const int64_t ct = static_cast<int64_t>(i) % job.col_tiles;
    const int64_t rc = static_cast<int64_t>(i) / job.col_tiles;
    const int64_t tile = job.self->PanelsPerTask();
    const int64_t p0 = ct * tile, p1 = std::min(job.self->w_.npanel, p0 + tile);
    const int64_t m0 = rc * job.row_chunk, m1 = std::min(job.rows, m0 + job.row_chunk);
    RunTile(job.self->isa_, job.op, m0, m1, p0, p1);
  }

  // Rows [r0, r1) whole in one task: their activations, the product over every column panel,
  // the output quantization -- no synchronisation between the steps (enough rows to keep every
  // thread busy; fewer rows use the three-step split, which parallelises over columns too).
  static void RowsTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    try {
      const BlockMatMulKernel& k = *job.self;
      const int64_t r0 = static_cast<int64_t>(i) * job.row_chunk;
      const int64_t r1 = std::min(job.rows, r0 + job.row_chunk);
      k.PackRows(job, r0, r1);
      RunTile(k.isa_, job.op, r0, r1, 0, k.w_.npanel);
      if (job.yq != nullptr) k.QuantizeOutputRows(job, r0, r1);
    } catch (const std::exception& e) {
      job.SetError(e.what());
    }
  }

  void QuantizeOutputRows(Job& job, int64_t r0, int64_t r1) const {
    {
      const BlockMatMulKernel& k = *this;
      const int64_t n = k.w_.n, nb = num_blocks(n, k.out_block_);
      std::vector<int> exps(static_cast<size_t>(nb));
      std::vector<int8_t> codes;
      std::vector<float> sum;
      if (job.rq) {
        codes.resize(static_cast<size_t>(n));
        sum.resize(static_cast<size_t>(n));
      }
      const int64_t rnb = job.rq ? num_blocks(n, k.residual_block_) : 0;
      for (int64_t m = r0; m < r1; ++m) {
        const float* y = job.op.y + m * n;
        if (job.rq) {  // z = BQ(y) + residual, exactly as DequantizeLinear + Add: then BQ(z)
          QuantizeRow(k.isa_, y, n, k.out_block_, k.out_bits_, codes.data(), exps.data());
          const int8_t* rq = job.rq + m * n;
          const float* rs = job.rs + m * rnb;
          for (int64_t b0 = 0; b0 < n; b0 += k.out_block_) {  // codes * scale: exact
            const float s = pow2_float(exps[b0 / k.out_block_]);
            for (int64_t c = b0; c < std::min(n, b0 + k.out_block_); ++c)
              sum[c] = static_cast<float>(codes[c]) * s;
          }
          for (int64_t b0 = 0; b0 < n; b0 += k.residual_block_) {  // + residual, rounded once
            const float s = rs[b0 / k.residual_block_];
            for (int64_t c = b0; c < std::min(n, b0 + k.residual_block_); ++c)
              sum[c] = sum[c] + static_cast<float>(rq[c]) * s;
          }
          y = sum.data();
        }
        QuantizeRow(k.isa_, y, n, k.out_block_, k.out_bits_, job.yq + m * n, exps.data());
        for (int64_t b = 0; b < nb; ++b) job.ys[m * nb + b] = pow2_float(exps[b]);
      }
    }
  }

  int64_t PanelsPerTask() const {
    return isa_ == kAmx ? kPanelsAmx : isa_ == kAvx512 ? kNvAvx512 : 1;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const PackedWeights& w = w_;
    Ort::ConstValue x = ctx.GetInput(kX);
    Ort::ConstValue xs = ctx.GetInputCount() > kXScale ? ctx.GetInput(kXScale) : Ort::ConstValue{nullptr};
    auto xinfo = x.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> xshape = xinfo.GetShape();
    if (xshape.empty() || xshape.back() != w.k)
      Fail("x " + shape_str(xshape) + " does not end in K = " + std::to_string(w.k));
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < xshape.size(); ++i) rows *= xshape[i];

    Job job;
    job.self = this;
    job.rows = rows;
    job.x_nb = num_blocks(w.k, act_block_);
    job.xf = nullptr;
    job.xq = nullptr;
    job.xs = nullptr;
    const auto xtype = xinfo.GetElementType();
    if (xtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      if (xs != nullptr) Fail("float x is quantized by the op; x_scale must be absent");
      job.xf = x.GetTensorData<float>();
    } else if (xtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
      if (xs == nullptr) Fail("int8 x needs x_scale");
      std::vector<int64_t> want = xshape;
      want.back() = job.x_nb;
      if (ShapeOf(xs) != want)
        Fail("x_scale shape " + shape_str(ShapeOf(xs)) + " does not match x " + shape_str(xshape) +
             " with act_block_size " + std::to_string(act_block_) + " (expected " +
             shape_str(want) + ")");
      job.xq = x.GetTensorData<int8_t>();
      job.xs = xs.GetTensorData<float>();
    } else {
      Fail("x must be float32 or int8");
    }

    // bias
    std::vector<float> dyn_bias;
    const float* bias = nullptr;
    if (has_bias_) {
      if (!bias_.empty()) {
        bias = bias_.data();
      } else {
        Ort::ConstValue b = ctx.GetInput(kBias);
        CheckBias(ShapeOf(b));
        dyn_bias.assign(static_cast<size_t>(w.npad), 0.0f);
        std::memcpy(dyn_bias.data(), b.GetTensorData<float>(), sizeof(float) * w.n);
        bias = dyn_bias.data();
      }
    }

    const size_t nin = ctx.GetInputCount();
    auto optional_input = [&](size_t i) {
      return nin > i ? ctx.GetInput(i) : Ort::ConstValue{nullptr};
    };
    Ort::ConstValue ymul = optional_input(kYMul);
    if (ymul != nullptr && ymul.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      Fail("y_multiplier must hold one value");
    Ort::ConstValue res = optional_input(kResidual), res_scale = optional_input(kResidualScale);
    std::vector<int64_t> yshape = xshape;
    yshape.back() = w.n;
    job.rq = nullptr;
    job.rs = nullptr;
    if (res != nullptr) {
      if (out_block_ < 1 || residual_block_ < 1)
        Fail("a residual needs out_block_size and residual_block_size");
      if (res_scale == nullptr) Fail("residual needs residual_scale");
      if (ShapeOf(res) != yshape)
        Fail("residual " + shape_str(ShapeOf(res)) + " must have y's shape " + shape_str(yshape));
      std::vector<int64_t> want = yshape;
      want.back() = num_blocks(w.n, residual_block_);
      if (ShapeOf(res_scale) != want)
        Fail("residual_scale " + shape_str(ShapeOf(res_scale)) + ", expected " + shape_str(want));
      job.rq = res.GetTensorData<int8_t>();
      job.rs = res_scale.GetTensorData<float>();
    }

    // outputs
    Ort::UnownedValue y = ctx.GetOutput(kY, yshape);
    Ort::UnownedValue yq{nullptr}, ysc{nullptr}, seg{nullptr};
    const size_t nout = ctx.GetOutputCount();
    if (nout > kYQ) yq = ctx.GetOutput(kYQ, yshape);
    if ((yq != nullptr) && out_block_ < 1) Fail("y_q needs out_block_size >= 1");
    if (yq == nullptr && res != nullptr) Fail("a residual needs the y_q output");
    if (yq != nullptr) {
      std::vector<int64_t> sshape = yshape;
      sshape.back() = num_blocks(w.n, out_block_);
      if (nout > kYScale) ysc = ctx.GetOutput(kYScale, sshape);
      if (ysc == nullptr) Fail("y_q needs the y_scale output");
    }
    if (nout > kSegments) {
      std::vector<int64_t> sshape(xshape.begin(), xshape.end() - 1);
      sshape.push_back(w.nseg);
      sshape.push_back(w.n);
      seg = ctx.GetOutput(kSegments, sshape);
    }
    if (y == nullptr && yq == nullptr && seg == nullptr) return;

    float* ydata = y != nullptr ? y.GetTensorMutableData<float>()
                                : ThreadScratch<float>(kSlotY, static_cast<size_t>(rows * w.n));
    if (rows == 0) return;

    const int64_t lda = w.nseg * w.gp;
    job.op.w = &w;
    // AMX needs neither padded copies of int8 codes (a segment that is a whole number of
    // 4-byte groups is read where it is) nor the per-segment sums (its weights are signed)
    job.codes_in_place = isa_ == kAmx && job.xq != nullptr && w.gp == w.g;
    job.op.a = job.codes_in_place ? job.xq
                                  : ThreadScratch<int8_t>(kSlotA, static_cast<size_t>(rows * lda));
    job.op.sx = ThreadScratch<float>(kSlotSx, static_cast<size_t>(rows * w.nseg));
    job.op.sxt = isa_ == kAmx ? ThreadScratch<float>(
                                    kSlotSxTile, static_cast<size_t>((rows + 15) / 16 * 16 * w.nseg))
                              : nullptr;
    // one slot: int32 corrections (8-bit weights) or float sums (int4 weights)
    job.op.corr = w.int4 ? nullptr : ThreadScratch<int32_t>(kSlotSum, static_cast<size_t>(rows * w.nseg));
    job.op.sumx = w.int4 ? ThreadScratch<float>(kSlotSum, static_cast<size_t>(rows * w.nseg)) : nullptr;
    job.op.bias = bias;
    job.op.ymul = ymul != nullptr ? ymul.GetTensorData<float>() : nullptr;
    job.op.y = ydata;
    job.op.seg = seg != nullptr ? seg.GetTensorMutableData<int32_t>() : nullptr;
    job.op.lda = lda;
    job.yq = yq != nullptr ? yq.GetTensorMutableData<int8_t>() : nullptr;
    job.ys = ysc != nullptr ? ysc.GetTensorMutableData<float>() : nullptr;

    // Enough rows: whole-row tasks of kRowsPerTask rows (multiple of every ISA's row tile and
    // of 16 for the AMX scale layout), each doing all three steps below.
    if (rows >= 2 * kRowsPerTask && job.op.seg == nullptr) {
      job.row_chunk = kRowsPerTask;
      Parallel(ctx, &RowsTask, (rows + kRowsPerTask - 1) / kRowsPerTask, &job);
      if (!job.error.empty()) throw std::runtime_error(job.error);
      return;
    }
    // 1. activations (rows in chunks), 2. the product, 3. optional output quantization
    job.row_chunk = 16;
    const int64_t pack_tasks = (rows + job.row_chunk - 1) / job.row_chunk;
    Parallel(ctx, &RowChunkTask<&BlockMatMulKernel::PackRows>, pack_tasks, &job);
    if (!job.error.empty()) throw std::runtime_error(job.error);

    const int64_t mr = isa_ == kAmx ? kMrAmx : isa_ == kAvx512 ? kMrAvx512 : kMrAvx2;
    job.row_chunk = std::max<int64_t>(mr, std::min<int64_t>(64, (rows + mr - 1) / mr * mr));
    job.col_tiles = (w.npanel + PanelsPerTask() - 1) / PanelsPerTask();
    const int64_t row_chunks = (rows + job.row_chunk - 1) / job.row_chunk;
    Parallel(ctx, &MatMulTask, row_chunks * job.col_tiles, &job);

    if (job.yq != nullptr) {
      job.row_chunk = 16;
      Parallel(ctx, &RowChunkTask<&BlockMatMulKernel::QuantizeOutputRows>, (rows + 15) / 16, &job);
      if (!job.error.empty()) throw std::runtime_error(job.error);
    }
  }

  static void Parallel(Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t total,
                       Job* job) {
    if (total <= 0) return;
    if (total == 1) {
      fn(job, 0);
      return;
    }
    ctx.ParallelFor(fn, static_cast<size_t>(total), 0, job);
  }

  Isa isa_ = kScalar;
  int64_t act_block_ = 0, out_block_ = 0, residual_block_ = 0;
  int act_bits_ = 8, out_bits_ = 8;
  bool has_bias_ = false;
  std::vector<float> bias_;
  PackedWeights w_;
};

struct BlockMatMulOp : Ort::CustomOpBase<BlockMatMulOp, BlockMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<BlockMatMulKernel>(api, info, kernel);
  }
  const char* GetName() const { return "BlockMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kXScale:
      case kBias:
      case kYMul:
      case kResidualScale:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case kScaleBase:
      case kResidual:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default:  // x: float | int8; codes, scales, zero points: int8 | int4 | uint4
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (i == kX || i == kCodes || i == kScales) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    switch (i) {
      case kYQ:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case kSegments:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_OPTIONAL;
  }
};

// ---------------------------------------------------------------------------------------------
// BlockBatchMatMul(a: int8 [..., M, K], a_scale, b: int8 [..., N, K], b_scale, y_multiplier?)
//   -> (y?, y_q?, y_scale?): y = a @ b^T per batch, both operands block-quantized along K with
// the same block size (attention scores Q.K^T; ref_matmul.block_batch_matmul). b is packed per
// batch at run time into the weight layout above, then the BlockMatMul tiles run unchanged.
// a_transposed / b_transposed (rank 4): that operand and its scales come token-major,
// [b, M, h, K] / [b, N, h, K] -- attention's heads Transpose(0, 2, 1, 3) fused into the reads.

struct BlockBatchMatMulKernel {
  BlockBatchMatMulKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info{raw_info};
    static const int64_t k8 = 8, k0 = 0;
    block_ = int_attribute(info, "BlockBatchMatMul", "block_size", nullptr);
    out_block_ = int_attribute(info, "BlockBatchMatMul", "out_block_size", &k0);
    out_bits_ = static_cast<int>(int_attribute(info, "BlockBatchMatMul", "out_bits", &k8));
    if (block_ < 1 || out_block_ < 0) Fail("BlockBatchMatMul: block sizes must be >= 1");
    if (out_bits_ < 2 || out_bits_ > 8) Fail("BlockBatchMatMul: out_bits must be in 2..8");
    a_t_ = int_attribute(info, "BlockBatchMatMul", "a_transposed", &k0) != 0;
    b_t_ = int_attribute(info, "BlockBatchMatMul", "b_transposed", &k0) != 0;
    // at most avx512: the AMX path does not pay here (attention scores of MiniLM, 12 heads of
    // 128 x 128 x 32 per layer: 1.28 ms/run against 1.23 on avx512, one thread)
    isa_ = std::min(ChooseIsa(std::getenv("BCTONNX_ISA")), kAvx512);
  }

  struct Job {
    const BlockBatchMatMulKernel* self;
    const int8_t *a, *b;
    const float *as, *bs, *ymul;
    float* y;
    int8_t* yq;
    float* ys;
    int64_t m, n, k, nb, out_nb;
    int64_t heads = 1;  // h of rank-4 operands (token-major layouts)
    std::string error;
    std::mutex mu;
  };

  // Row r of batch bi = (b, h) of an operand with R rows and `width` values per row: offset
  // and row stride, in the standard [b, h, R, width] or the token-major [b, R, h, width] layout.
  static int64_t RowBase(const Job& job, bool token_major, int64_t bi, int64_t rows,
                         int64_t width) {
    if (!token_major) return bi * rows * width;
    const int64_t b = bi / job.heads, h = bi % job.heads;
    return (b * rows * job.heads + h) * width;
  }
  static int64_t RowStride(const Job& job, bool token_major, int64_t width) {
    return token_major ? job.heads * width : width;
  }

  static void BatchTask(void* data, size_t index) {
    Job& job = *static_cast<Job*>(data);
    try {
      job.self->RunBatch(job, static_cast<int64_t>(index));
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(job.mu);
      if (job.error.empty()) job.error = e.what();
    }
  }

  struct BatchScratch {
    PackedWeights w;
    std::vector<int8_t> a;
    std::vector<int32_t> corr;
    std::vector<float> asc, yscratch;
  };

  void RunBatch(Job& job, int64_t bi) const {
    const int64_t m = job.m, n = job.n, k = job.k, nb = job.nb;
    // b -> packed "weights": u8 = b + 128, one segment per block, scales per (block, column)
    // per-thread storage reused across batches and runs, its address taken once (every use
    // of a thread_local in a shared library is a __tls_get_addr call otherwise: 7% of the op)
    thread_local BatchScratch tls;
    BatchScratch& sc = tls;
    PackedWeights& w = sc.w;
    w.k = k;
    w.n = n;
    w.block = w.act_block = w.g = block_;
    w.nblk = w.nseg = nb;
    w.spb = 1;
    w.gp = (w.g + 3) / 4 * 4;
    w.chunks = w.gp / 4;
    w.npanel = (n + kPanel - 1) / kPanel;
    w.npad = w.npanel * kPanel;
    w.data.assign(static_cast<size_t>(w.npanel * w.panel_bytes()), 128);
    w.sw.assign(static_cast<size_t>(nb * w.npad), 0.0f);
    const int8_t* b = job.b + RowBase(job, b_t_, bi, n, k);
    const float* bs = job.bs + RowBase(job, b_t_, bi, n, nb);
    const int64_t ldb = RowStride(job, b_t_, k), ldbs = RowStride(job, b_t_, nb);
    // (locals, not w's fields, in the loops: w is thread-local, and GCC re-derives its address
    // with a __tls_get_addr call when it reloads a field after a store)
    const int64_t g = w.g, chunk_bytes = w.chunks * 64, panel_bytes = w.panel_bytes(), npad = w.npad;
    uint8_t* const packed = w.data.data();
    float* const sw = w.sw.data();
    for (int64_t c = 0; c < n; ++c) {
      uint8_t* panel = packed + (c / kPanel) * panel_bytes + (c % kPanel) * 4;
      for (int64_t j = 0; j < nb; ++j) {
        const int8_t* src = b + c * ldb + j * g;
        uint8_t* dst = panel + j * chunk_bytes;
        int64_t i = 0;
        for (; i + 4 <= g; i += 4) {  // 4 k of one column: +128 on each byte
          uint32_t four;
          std::memcpy(&four, src + i, 4);
          four ^= 0x80808080u;
          std::memcpy(dst + (i / 4) * 64, &four, 4);
        }
        for (; i < g; ++i) dst[(i / 4) * 64 + i % 4] = static_cast<uint8_t>(src[i] ^ 0x80);
        pow2_exponent(bs[c * ldbs + j]);  // pow2 scales only (throws otherwise)
        sw[j * npad + c] = bs[c * ldbs + j];
      }
    }
    // a rows: used in place when the blocks need no padding
    const int8_t* ab = job.a + RowBase(job, a_t_, bi, m, k);
    const float* as = job.as + RowBase(job, a_t_, bi, m, nb);
    const int64_t a_row = RowStride(job, a_t_, k), as_row = RowStride(job, a_t_, nb);
    const bool in_place = w.gp == w.g;
    const int64_t lda = in_place ? a_row : nb * w.gp;
    std::vector<int8_t>& a = sc.a;
    std::vector<int32_t>& corr = sc.corr;
    std::vector<float>& asc = sc.asc;  // a's scales, [m][nb] (token-major: gathered)
    if (!in_place) a.assign(static_cast<size_t>(m * lda), 0);
    corr.resize(static_cast<size_t>(m * nb));
    if (a_t_) asc.resize(static_cast<size_t>(m * nb));
    const int64_t gp = w.gp;
    int8_t* const acopy = a.data();
    int32_t* const corrp = corr.data();
    float* const ascp = asc.data();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nb; ++j) {
        pow2_exponent(as[r * as_row + j]);
        if (a_t_) ascp[r * nb + j] = as[r * as_row + j];
        const int8_t* src = ab + r * a_row + j * g;
        int32_t sum = 0;
        for (int64_t i = 0; i < g; ++i) sum += src[i];
        if (!in_place) std::memcpy(acopy + r * lda + j * gp, src, static_cast<size_t>(g));
        corrp[r * nb + j] = -128 * sum;
      }
    std::vector<float>& yscratch = sc.yscratch;
    float* y = job.y ? job.y + bi * m * n : nullptr;
    if (!y) {
      yscratch.resize(static_cast<size_t>(m * n));
      y = yscratch.data();
    }
    Operands op;
    op.w = &w;
    op.a = in_place ? ab : a.data();
    op.sx = a_t_ ? asc.data() : as;
    op.corr = corr.data();
    op.ymul = job.ymul;
    op.y = y;
    op.lda = lda;
    RunTile(isa_, op, 0, m, 0, w.npanel);
    if (job.yq) {
      std::vector<int> exps(static_cast<size_t>(job.out_nb));
      for (int64_t r = 0; r < m; ++r) {
        const int64_t row = bi * m + r;
        QuantizeRow(isa_, y + r * n, n, out_block_, out_bits_, job.yq + row * n, exps.data());
        for (int64_t o = 0; o < job.out_nb; ++o)
          job.ys[row * job.out_nb + o] = pow2_float(exps[o]);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue a = ctx.GetInput(0), as = ctx.GetInput(1), b = ctx.GetInput(2),
                    bs = ctx.GetInput(3);
    Ort::ConstValue ymul = ctx.GetInputCount() > 4 ? ctx.GetInput(4) : Ort::ConstValue{nullptr};
    std::vector<int64_t> ash = ShapeOf(a), bsh = ShapeOf(b), assh = ShapeOf(as), bssh = ShapeOf(bs);
    if (ash.size() < 2 || bsh.size() != ash.size())
      Fail("BlockBatchMatMul: a and b must have the same rank >= 2");
    // token-major operands are checked as the [b, h, rows, K] tensors they stand for
    for (auto [flag, shp, sshp] : {std::tuple{a_t_, &ash, &assh}, std::tuple{b_t_, &bsh, &bssh}}) {
      if (!flag) continue;
      if (shp->size() != 4 || sshp->size() != 4)
        Fail("BlockBatchMatMul: a_transposed / b_transposed need rank-4 operands and scales");
      std::swap((*shp)[1], (*shp)[2]);
      std::swap((*sshp)[1], (*sshp)[2]);
    }
    const int64_t m = ash[ash.size() - 2], k = ash.back(), n = bsh[bsh.size() - 2];
    if (bsh.back() != k) Fail("BlockBatchMatMul: a " + shape_str(ash) + " and b " + shape_str(bsh) + " differ in K");
    int64_t batches = 1;
    for (size_t i = 0; i + 2 < ash.size(); ++i) {
      if (ash[i] != bsh[i]) Fail("BlockBatchMatMul: batch dims differ (no broadcasting)");
      batches *= ash[i];
    }
    if (k % block_) Fail("BlockBatchMatMul: block_size must divide K = " + std::to_string(k));
    const int64_t nb = k / block_;
    std::vector<int64_t> want = ash;
    want.back() = nb;
    if (assh != want) Fail("BlockBatchMatMul: a_scale must be " + shape_str(want));
    want = bsh;
    want.back() = nb;
    if (bssh != want) Fail("BlockBatchMatMul: b_scale must be " + shape_str(want));
    if (ymul != nullptr && ymul.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      Fail("BlockBatchMatMul: y_multiplier must hold one value");
    std::vector<int64_t> yshape = ash;
    yshape.back() = n;
    Ort::UnownedValue y = ctx.GetOutput(0, yshape);
    Ort::UnownedValue yq{nullptr}, ysc{nullptr};
    const int64_t out_nb = out_block_ ? num_blocks(n, out_block_) : 0;
    if (ctx.GetOutputCount() > 1) {
      yq = ctx.GetOutput(1, yshape);
      if (yq != nullptr) {
        if (out_block_ < 1) Fail("BlockBatchMatMul: y_q needs out_block_size >= 1");
        std::vector<int64_t> sshape = yshape;
        sshape.back() = out_nb;
        ysc = ctx.GetOutputCount() > 2 ? ctx.GetOutput(2, sshape) : Ort::UnownedValue{nullptr};
        if (ysc == nullptr) Fail("BlockBatchMatMul: y_q needs y_scale");
      }
    }
    Job job;
    job.self = this;
    job.a = a.GetTensorData<int8_t>();
    job.b = b.GetTensorData<int8_t>();
    job.as = as.GetTensorData<float>();
    job.bs = bs.GetTensorData<float>();
    job.ymul = ymul != nullptr ? ymul.GetTensorData<float>() : nullptr;
    job.y = y != nullptr ? y.GetTensorMutableData<float>() : nullptr;
    job.yq = yq != nullptr ? yq.GetTensorMutableData<int8_t>() : nullptr;
    job.ys = ysc != nullptr ? ysc.GetTensorMutableData<float>() : nullptr;
    job.m = m;
    job.n = n;
    job.k = k;
    job.nb = nb;
    job.out_nb = out_nb;
    job.heads = ash.size() == 4 ? ash[1] : 1;
    if ((job.y == nullptr && job.yq == nullptr) || batches * m * n == 0) return;
    if (batches == 1)
      BatchTask(&job, 0);
    else
      ctx.ParallelFor(&BatchTask, static_cast<size_t>(batches), 0, &job);
    if (!job.error.empty()) throw std::runtime_error(job.error);
  }

  Isa isa_ = kScalar;
  bool a_t_ = false, b_t_ = false;
  int64_t block_ = 0, out_block_ = 0;
  int out_bits_ = 8;
};

struct BlockBatchMatMulOp : Ort::CustomOpBase<BlockBatchMatMulOp, BlockBatchMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<BlockBatchMatMulKernel>(api, info, kernel);
  }
  const char* GetName() const { return "BlockBatchMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 0 || i == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

int BestIsa() { return static_cast<int>(ChooseIsa(std::getenv("BCTONNX_ISA"))); }

void QuantizeRowsPow2(int isa, const float* x, int64_t rows, int64_t d, int64_t b, int bits,
                      int8_t* q, float* scales) {
  const int64_t nb = (d + b - 1) / b;
  thread_local std::vector<int> exps;
  exps.resize(static_cast<size_t>(nb));
  for (int64_t r = 0; r < rows; ++r) {
    QuantizeRow(static_cast<Isa>(isa), x + r * d, d, b, bits, q + r * d, exps.data());
    for (int64_t j = 0; j < nb; ++j) scales[r * nb + j] = pow2_float(exps[j]);
  }
}

void AddMatMulOps(Ort::CustomOpDomain& domain) {
  // static: they live as long as the process (sessions keep raw pointers)
  static BlockMatMulOp matmul;
  static BlockBatchMatMulOp batch_matmul;
  domain.Add(&matmul);
  domain.Add(&batch_matmul);
}

}  // namespace bct

// Which instruction set a BlockMatMul kernel created now would use, given a BCTONNX_ISA-style
// request (null = the environment's): 0 scalar, 1 avx2, 2 avx512, 3 amx. For tests and
// diagnostics.
extern "C" __attribute__((visibility("default"))) int bctonnx_block_matmul_isa(const char* request) {
  try {
    return static_cast<int>(bct::ChooseIsa(request ? request : std::getenv("BCTONNX_ISA")));
  } catch (const std::exception&) {
    return -1;
  }
}
