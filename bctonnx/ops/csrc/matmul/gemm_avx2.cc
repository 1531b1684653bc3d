// Block GEMM, AVX2 + FMA: vpmaddubsw (u8 x s8 -> s16 pairs, saturating) + vpmaddwd (-> s32).
//
// Exactness. vpmaddubsw saturates int16, so 8-bit weights use the sign trick: |x| (u8, <= 128)
// times sign(w, x) (s8): pairs <= 2 * 128 * 127 = 32512 < 2^15. sign(w, x) negates w where
// x < 0, which wraps for w = -128: a panel holding a weight -128 (never made by the
// quantizers, but legal input) takes the variant that splits it as -127 + -1, two products
// (MIN8 below). int4 weights need no trick: nibbles u in 0..15 times s8, pairs <= 2 * 15 * 128,
// a chunk's two products summed in int16 (<= 7680), zero points corrected per block as on
// AVX-512 (gemm.h).
//
// Segments of a block combined for free: vpmaddwd multiplies the int16 products by 2^shift
// (the segment's e - E, <= S <= 14 for blocks of 4 or more: fits int16) instead of by 1, so
// a register accumulates the block's exact shifted sum over all its segments with no extra
// instruction: each vpmaddwd result is exact (<= 2 * 32512 * 2^14 < 2^31) and the int32 sums
// wrap harmlessly (the block's sum fits, ref_matmul.py step 2). Blocks of 2 split into
// segments of 1 (S = 15) run the portable kernel.
//
// Register tile: 4 rows (one interleaved activation tile) x 16 columns (one panel, two ymm),
// all of K: 8 int32 accumulators over a weight block, weights loaded and flipped to s8 once
// per k-step for the 4 rows, |x| once per row and k-step for both halves. Per k-step of 4 k
// (128 multiply-adds per ymm pair and row... 512 in all): 2 loads, 4 broadcasts, 4 |x|, and
// per row and half vpsignb, vpmaddubsw, vpmaddwd, vpaddd. Per block the float step of
// ref_matmul.py step 3 into a 4 x 16 float tile in L1.
#include <algorithm>

#include "../simd.h"
#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

#define BCT_AVX2 __attribute__((target("avx2,fma")))

// Keeps a rounded product from being contracted into the fused multiply-add after it.
BCT_AVX2 inline __m256 Rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

BCT_AVX2 inline __m256i Load(const void* p) {
  return _mm256_load_si256(static_cast<const __m256i*>(p));
}

// Broadcast of the 4 activation bytes of row r at k-step s of a tile.
BCT_AVX2 inline __m256i ActBroadcast(const int8_t* xs, int64_t s, int r) {
  return _mm256_set1_epi32(ActDword(xs, s, r));
}

// Whether panel p holds a weight -128 (byte 0 in the unsigned form gemm.h describes).
BCT_AVX2 bool PanelHasMin8(const PackedWeights& w, int64_t p) {
  const uint8_t* d = w.data.data() + p * w.panel_bytes();
  __m256i lo = _mm256_set1_epi8(-1);
  for (int64_t i = 0; i < w.panel_bytes(); i += 64)
    lo = _mm256_min_epu8(lo, _mm256_min_epu8(Load(d + i), Load(d + i + 32)));
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, _mm256_setzero_si256())) != 0;
}

// The int16 multipliers 2^shift of a segment's 4 rows.
BCT_AVX2 inline void SegmentMultipliers(const int32_t* sh, __m256i* mul) {
  for (int r = 0; r < kRowTile; ++r)
    mul[r] = _mm256_set1_epi16(static_cast<int16_t>(1 << sh[r]));
}

// acc += madd(|x| * sign(w, x), mul): one row and half of the 8-bit tile.
#define BCT_ROW_HALF(acc, w, ax, xb, m) \
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, xb)), m))

// Row r of a k-step of the 8-bit tile (w0, w1: the two halves' signed weights).
#define BCT_ROW8(r, a0, a1)                                   \
  {                                                           \
    const __m256i xb = ActBroadcast(xs, s, r);                \
    const __m256i ax = _mm256_abs_epi8(xb);                   \
    BCT_ROW_HALF(a0, w0, ax, xb, mul[r]);                     \
    BCT_ROW_HALF(a1, w1, ax, xb, mul[r]);                     \
    if (MIN8) {                                               \
      BCT_ROW_HALF(a0, m0, ax, xb, mul[r]);                   \
      BCT_ROW_HALF(a1, m1, ax, xb, mul[r]);                   \
    }                                                         \
  }

// Row r of a chunk (8 k) of the int4 tile: low nibbles with k-step 2c, high with 2c + 1.
#define BCT_ROW4(r, a0, a1)                                                              \
  {                                                                                      \
    const __m256i x0 = ActBroadcast(xs, 2 * c, r), x1 = ActBroadcast(xs, 2 * c + 1, r); \
    a0 = _mm256_add_epi32(                                                               \
        a0, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo0, x0),            \
                                               _mm256_maddubs_epi16(hi0, x1)),           \
                              mul[r]));                                                  \
    a1 = _mm256_add_epi32(                                                               \
        a1, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo1, x0),            \
                                               _mm256_maddubs_epi16(hi1, x1)),           \
                              mul[r]));                                                  \
  }

// The 4 rows of row tile t times panel p over all of K, into the float tile yt [4][16]
// (zero on entry). MIN8: 8-bit weights with a -128 somewhere in the panel.
template <bool INT4, bool MIN8>
BCT_AVX2 void Tile(const Operands& op, int64_t t, int64_t p, float* yt) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const int64_t sb = w.seg_bytes(), chunks = w.chunks, gp = w.gp, spb = w.spb;
  const uint8_t* wj = w.data.data() + p * w.panel_bytes();
  const int8_t* xa = x.a + t * x.tile_bytes;
  const int32_t* sh = x.shift + t * w.nseg * kRowTile;
  const int32_t* corr = x.corr + t * w.nblk * kRowTile;
  const float* bs = x.bscale + t * w.nblk * kRowTile;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i min8 = _mm256_set1_epi8(-128);
  const __m256i max8 = _mm256_set1_epi8(-127);
  __m256i mul[kRowTile];
  for (int64_t b = 0; b < w.nblk; ++b) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00,
            a21 = a00, a30 = a00, a31 = a00;
    for (int64_t jj = 0; jj < spb; ++jj, wj += sb) {
      const int64_t j = b * spb + jj;
      const int8_t* xs = xa + j * gp * 4;  // the segment's first k-step (16 bytes each)
      SegmentMultipliers(sh + j * kRowTile, mul);
      if (!INT4) {
        for (int64_t s = 0; s < chunks; ++s) {
          __m256i w0 = _mm256_xor_si256(flip, Load(wj + s * 64));
          __m256i w1 = _mm256_xor_si256(flip, Load(wj + s * 64 + 32));
          __m256i m0 = w0, m1 = w1;
          if (MIN8) {  // w = -127 + -1 where w = -128: m = -1 there, else 0
            m0 = _mm256_cmpeq_epi8(w0, min8);
            m1 = _mm256_cmpeq_epi8(w1, min8);
            w0 = _mm256_max_epi8(w0, max8);
            w1 = _mm256_max_epi8(w1, max8);
          }
          BCT_ROW8(0, a00, a01)
          BCT_ROW8(1, a10, a11)
          BCT_ROW8(2, a20, a21)
          BCT_ROW8(3, a30, a31)
        }
      } else {
        for (int64_t c = 0; c < chunks; ++c) {
          const __m256i raw0 = Load(wj + c * 64), raw1 = Load(wj + c * 64 + 32);
          const __m256i lo0 = _mm256_and_si256(raw0, low4), lo1 = _mm256_and_si256(raw1, low4);
          const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), low4);
          const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), low4);
          BCT_ROW4(0, a00, a01)
          BCT_ROW4(1, a10, a11)
          BCT_ROW4(2, a20, a21)
          BCT_ROW4(3, a30, a31)
        }
      }
    }
    // ref_matmul.py step 3: y = y + fl(fl(acc) * sw) * 2^E (exact product by 2^E)
    const float* swb = w.sw.data() + b * w.npad + p * kPanel;
    const __m256 sw0 = _mm256_loadu_ps(swb), sw1 = _mm256_loadu_ps(swb + 8);
    __m256i zp0 = _mm256_setzero_si256(), zp1 = zp0;
    if (INT4) {
      zp0 = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w.zpi.data() + b * w.npad + p * kPanel));
      zp1 = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w.zpi.data() + b * w.npad + p * kPanel + 8));
    }
    const __m256i acc[kRowTile][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int r = 0; r < kRowTile; ++r) {
      const __m256 e = _mm256_set1_ps(bs[b * kRowTile + r]);
      const __m256i cr = _mm256_set1_epi32(corr[b * kRowTile + r]);
      for (int h = 0; h < 2; ++h) {
        __m256i a = acc[r][h];
        if (INT4)  // - (zp + 8) * X, exact in wrapping int32
          a = _mm256_sub_epi32(a, _mm256_mullo_epi32(h ? zp1 : zp0, cr));
        const __m256 u = Rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(a), h ? sw1 : sw0));
        float* yp = yt + r * kPanel + 8 * h;
        _mm256_store_ps(yp, _mm256_fmadd_ps(u, e, _mm256_load_ps(yp)));
      }
    }
  }
}

#undef BCT_ROW4
#undef BCT_ROW8
#undef BCT_ROW_HALF

// The 8-bit tile (no -128 in the panel) in inline assembly: GCC keeps the four multipliers in
// registers and spills the accumulators instead (measured: ~7 instructions per 32
// multiply-adds, against 5.4 here). Registers: accumulators ymm0-7 (row r: ymm2r, ymm2r+1),
// weights ymm8-9, the flip constant ymm10, activation broadcast ymm11 and |x| ymm12, products
// ymm13-14, ymm15 the multiplier seed 0x00010001. The segment's multipliers 2^shift per row
// are kept in memory after the float tile: 256 + 32 r (%[yt]).
//
// Row r of one k-step (activation bytes at xo + 4 r, multiplier 256 + 32 r):
#define BCT_ROW8_ASM(r, acc0, acc1, xo)                                   \
  "vpbroadcastd " #xo "+4*" #r "(%[x]), %%ymm11\n\t"                      \
  "vpabsb %%ymm11, %%ymm12\n\t"                                           \
  "vpsignb %%ymm11, %%ymm8, %%ymm13\n\t"                                  \
  "vpsignb %%ymm11, %%ymm9, %%ymm14\n\t"                                  \
  "vpmaddubsw %%ymm13, %%ymm12, %%ymm13\n\t"                              \
  "vpmaddubsw %%ymm14, %%ymm12, %%ymm14\n\t"                              \
  "vpmaddwd 256+32*" #r "(%[yt]), %%ymm13, %%ymm13\n\t"                   \
  "vpmaddwd 256+32*" #r "(%[yt]), %%ymm14, %%ymm14\n\t"                   \
  "vpaddd %%ymm13, %%ymm" #acc0 ", %%ymm" #acc0 "\n\t"                    \
  "vpaddd %%ymm14, %%ymm" #acc1 ", %%ymm" #acc1 "\n\t"

// One k-step: 4 k of 16 columns (weights at wo) for the 4 rows (activations at xo).
#define BCT_KSTEP8_ASM(wo, xo)                        \
  "vpxor " #wo "(%[w]), %%ymm10, %%ymm8\n\t"          \
  "vpxor " #wo "+32(%[w]), %%ymm10, %%ymm9\n\t"       \
  BCT_ROW8_ASM(0, 0, 1, xo)                           \
  BCT_ROW8_ASM(1, 2, 3, xo)                           \
  BCT_ROW8_ASM(2, 4, 5, xo)                           \
  BCT_ROW8_ASM(3, 6, 7, xo)

// Block epilogue of row r: y = y + fl(fl(acc) * sw) * 2^E, sw of the two halves in ymm8-9.
#define BCT_BLOCK_ROW_ASM(r, acc0, acc1)                                  \
  "vbroadcastss 4*" #r "(%[bs]), %%ymm11\n\t"                             \
  "vcvtdq2ps %%ymm" #acc0 ", %%ymm" #acc0 "\n\t"                          \
  "vcvtdq2ps %%ymm" #acc1 ", %%ymm" #acc1 "\n\t"                          \
  "vmulps %%ymm8, %%ymm" #acc0 ", %%ymm" #acc0 "\n\t"                     \
  "vmulps %%ymm9, %%ymm" #acc1 ", %%ymm" #acc1 "\n\t"                     \
  "vfmadd213ps 64*" #r "(%[yt]), %%ymm11, %%ymm" #acc0 "\n\t"            \
  "vfmadd213ps 64*" #r "+32(%[yt]), %%ymm11, %%ymm" #acc1 "\n\t"         \
  "vmovaps %%ymm" #acc0 ", 64*" #r "(%[yt])\n\t"                          \
  "vmovaps %%ymm" #acc1 ", 64*" #r "+32(%[yt])\n\t"

// Multiplier of row r for the segment: 0x00010001 << shift (two int16 2^shift).
#define BCT_MULTIPLIER_ASM(r)                          \
  "vpbroadcastd 4*" #r "(%[sh]), %%ymm11\n\t"          \
  "vpsllvd %%ymm11, %%ymm15, %%ymm11\n\t"              \
  "vmovdqa %%ymm11, 256+32*" #r "(%[yt])\n\t"

// Rows of tile t x panel p, 8-bit weights without -128, all of K; yt: [4][16] floats (zero on
// entry) then 4 x 32 bytes of multipliers, 32-byte aligned.
BCT_AVX2 void Tile8Asm(const Operands& op, int64_t t, int64_t p, float* yt) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const uint8_t* wp = w.data.data() + p * w.panel_bytes();
  const int8_t* xa = x.a + t * x.tile_bytes;
  const int32_t* sh = x.shift + t * w.nseg * kRowTile;
  const float* bs = x.bscale + t * w.nblk * kRowTile;
  const float* swp = w.sw.data() + p * kPanel;
  const int64_t chunks = w.chunks, spb = w.spb, sw_step = w.npad * 4;
  const int32_t flip = static_cast<int32_t>(0x80808080u), seed = 0x00010001;
  int64_t nb = w.nblk, k = 0, s = 0;
  asm volatile(
      "vpbroadcastd %[flip], %%ymm10\n\t"
      "vpbroadcastd %[seed], %%ymm15\n\t"
      "1:\n\t"  // weight blocks
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"
      "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"
      "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"
      "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
      "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
      "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
      "mov %[spb], %[s]\n\t"
      "2:\n\t"  // segments of the block
      BCT_MULTIPLIER_ASM(0)
      BCT_MULTIPLIER_ASM(1)
      BCT_MULTIPLIER_ASM(2)
      BCT_MULTIPLIER_ASM(3)
      "add $16, %[sh]\n\t"
      "mov %[chunks], %[k]\n\t"
      "test $1, %[k]\n\t"
      "jz 4f\n\t"
      BCT_KSTEP8_ASM(0, 0)
      "add $64, %[w]\n\t"
      "add $16, %[x]\n\t"
      "dec %[k]\n\t"
      "jz 5f\n\t"
      "4:\n\t"  // k-steps two at a time
      BCT_KSTEP8_ASM(0, 0)
      BCT_KSTEP8_ASM(64, 16)
      "add $128, %[w]\n\t"
      "add $32, %[x]\n\t"
      "sub $2, %[k]\n\t"
      "jnz 4b\n\t"
      "5:\n\t"
      "dec %[s]\n\t"
      "jnz 2b\n\t"
      "vmovups (%[swp]), %%ymm8\n\t"
      "vmovups 32(%[swp]), %%ymm9\n\t"
      BCT_BLOCK_ROW_ASM(0, 0, 1)
      BCT_BLOCK_ROW_ASM(1, 2, 3)
      BCT_BLOCK_ROW_ASM(2, 4, 5)
      BCT_BLOCK_ROW_ASM(3, 6, 7)
      "add $16, %[bs]\n\t"
      "add %[sw_step], %[swp]\n\t"
      "dec %[nb]\n\t"
      "jnz 1b\n\t"
      : [w] "+r"(wp), [x] "+r"(xa), [sh] "+r"(sh), [bs] "+r"(bs), [swp] "+r"(swp),
        [nb] "+r"(nb), [k] "+r"(k), [s] "+r"(s)
      : [yt] "r"(yt), [chunks] "m"(chunks), [spb] "m"(spb), [sw_step] "m"(sw_step),
        [flip] "m"(flip), [seed] "m"(seed)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}

#undef BCT_MULTIPLIER_ASM
#undef BCT_BLOCK_ROW_ASM
#undef BCT_KSTEP8_ASM
#undef BCT_ROW8_ASM

// Valid rows and columns of a float tile into y: + bias, * multiplier.
BCT_AVX2 void StoreTile(const Operands& op, int64_t t, int64_t m0, int64_t m1, int64_t p,
                        const float* yt) {
  const int64_t col0 = p * kPanel, valid = std::min<int64_t>(kPanel, op.w->n - col0);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < kRowTile; ++r) {
    const int64_t m = t * kRowTile + r;
    if (m < m0 || m >= m1) continue;
    float* yr = op.y + m * op.ldy + col0;
    for (int h = 0; h < 2 && 8 * h < valid; ++h) {
      __m256 v = _mm256_load_ps(yt + r * kPanel + 8 * h);
      if (op.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(op.bias + col0 + 8 * h));
      if (op.ymul) v = _mm256_mul_ps(v, _mm256_set1_ps(*op.ymul));
      if (valid - 8 * h >= 8) {
        _mm256_storeu_ps(yr + 8 * h, v);
      } else {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - 8 * h)), lane);
        _mm256_maskstore_ps(yr + 8 * h, mask, v);
      }
    }
  }
}

}  // namespace

BCT_AVX2 void GemmAvx2(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  if (w.spb > 1 && w.block <= 2) return GemmScalar(op, m0, m1, p0, p1);  // shifts up to 15
  alignas(32) float yt[kRowTile * kPanel + 32];  // the float tile, then Tile8Asm's multipliers
  const int64_t last = std::min(m1, op.rows);
  const int64_t t0 = m0 / kRowTile, t1 = (last + kRowTile - 1) / kRowTile;
  for (int64_t p = std::max<int64_t>(p0, 0); p < std::min(p1, w.npanel); ++p) {
    const bool min8 = !w.int4 && PanelHasMin8(w, p);
    for (int64_t t = t0; t < t1; ++t) {
      std::memset(yt, 0, sizeof(float) * kRowTile * kPanel);
      if (w.int4)
        Tile<true, false>(op, t, p, yt);
      else if (min8)
        Tile<false, true>(op, t, p, yt);
      else
        Tile8Asm(op, t, p, yt);
      StoreTile(op, t, m0, last, p, yt);
    }
  }
}

}  // namespace gemm
}  // namespace bct
