// Block GEMM, AVX-512 VNNI: vpdpbusd (u8 weights x s8 activations -> s32, never saturating),
// 16 columns per register, register tiles of 4 rows x up to 3 panels (48 columns).
//
// Signedness: 8-bit weights are stored as u8 = (q - zp) + 128, so sum((w + 128) * x) = d + 128
// * sum(x); int4 weights as nibbles u = q + 8 in 0..15, d = sum(u * x) - (zp + 8) * sum(x). The
// int32 sums of a block's segments are shifted and added as they come (wrapping int32
// arithmetic: the exact result fits, so the wrapped intermediate values do not matter), and the
// block's correction is applied once: + corr (= -128 * X) for 8-bit weights, - (zp + 8) * X for
// int4, X the shifted sum of the activations (gemm.h, PackedActs).
//
// Speed: the full 4 x 48 tile of 8-bit weights (every linear layer of the presets) runs all of
// K in inline assembly: segment sums in zmm0-11, block sums in zmm12-23, weights zmm28-30, the
// activation broadcast zmm31; per segment a shift-add per register, per weight block one
// conversion, one product by the weight scales and one fused multiply-add by 2^E into a 4 x 48
// float tile in L1. Measured on one Zen 4 core (K = 768, N = 3072, blocks of 128 with
// activation segments of 32): ~80% of vpdpbusd's peak, against ~42% for the previous kernel's
// float step per segment. Other tiles (int4 weights, the last column tile) use intrinsics.
#include <algorithm>

#include "../simd.h"
#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

constexpr int kNv = 3;  // panels per column tile

#define BCT_UNROLL _Pragma("GCC unroll 16")
#define BCT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

// Dpbusd and Rounded: simd.h.


// One column tile of NV panels (any weights): the intrinsics form of the arithmetic.
template <int NV, bool INT4>
BCT_AVX512 void TileIntrinsics(const Operands& op, int64_t t, int64_t p0, float* yt) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const int64_t pb = w.panel_bytes(), sb = w.seg_bytes();
  const uint8_t* wp = w.data.data() + p0 * pb;
  const int8_t* xa = x.a + t * x.tile_bytes;
  const int32_t* sh = x.shift + t * w.nseg * kRowTile;
  const int32_t* corr = x.corr + t * w.nblk * kRowTile;
  const float* bs = x.bscale + t * w.nblk * kRowTile;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 yacc[kRowTile][NV];
  BCT_UNROLL for (int r = 0; r < kRowTile; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
    yacc[r][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.nblk; ++b) {
    __m512i blk[kRowTile][NV];
    for (int64_t jj = 0; jj < w.spb; ++jj) {
      const int64_t j = b * w.spb + jj;
      const uint8_t* wj = wp + j * sb;
      const int64_t s0 = j * w.gp / 4;  // first k-step of the segment
      __m512i acc[kRowTile][NV];
      BCT_UNROLL for (int r = 0; r < kRowTile; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_setzero_si512();
#pragma GCC unroll 1
      for (int64_t c = 0; c < w.chunks; ++c) {
        if (!INT4) {
          __m512i wv[NV];
          BCT_UNROLL for (int v = 0; v < NV; ++v)
            wv[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(wj + v * pb + c * 64));
          BCT_UNROLL for (int r = 0; r < kRowTile; ++r) {
            const __m512i xb = _mm512_set1_epi32(ActDword(xa, s0 + c, r));
            BCT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Dpbusd(acc[r][v], wv[v], xb);
          }
        } else {
          __m512i lo[NV], hi[NV];
          BCT_UNROLL for (int v = 0; v < NV; ++v) {
            const __m512i raw =
                _mm512_loadu_si512(reinterpret_cast<const void*>(wj + v * pb + c * 64));
            lo[v] = _mm512_and_si512(raw, low4);
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          }
          BCT_UNROLL for (int r = 0; r < kRowTile; ++r) {
            const __m512i xb0 = _mm512_set1_epi32(ActDword(xa, s0 + 2 * c, r));
            const __m512i xb1 = _mm512_set1_epi32(ActDword(xa, s0 + 2 * c + 1, r));
            BCT_UNROLL for (int v = 0; v < NV; ++v) {
              acc[r][v] = Dpbusd(acc[r][v], lo[v], xb0);
              acc[r][v] = Dpbusd(acc[r][v], hi[v], xb1);
            }
          }
        }
      }
      BCT_UNROLL for (int r = 0; r < kRowTile; ++r) {
        const __m512i s = _mm512_set1_epi32(sh[j * kRowTile + r]);
        BCT_UNROLL for (int v = 0; v < NV; ++v) {
          const __m512i shifted = _mm512_sllv_epi32(acc[r][v], s);
          blk[r][v] = jj == 0 ? shifted : _mm512_add_epi32(blk[r][v], shifted);
        }
      }
    }
    const float* swb = w.sw.data() + b * w.npad + p0 * kPanel;
    BCT_UNROLL for (int r = 0; r < kRowTile; ++r) {
      const __m512i cr = _mm512_set1_epi32(corr[b * kRowTile + r]);
      const __m512 e = _mm512_set1_ps(bs[b * kRowTile + r]);
      BCT_UNROLL for (int v = 0; v < NV; ++v) {
        __m512i a = blk[r][v];
        if (INT4) {  // - (zp + 8) * X, exact in wrapping int32
          const __m512i zp = _mm512_loadu_si512(
              reinterpret_cast<const void*>(w.zpi.data() + b * w.npad + (p0 + v) * kPanel));
          a = _mm512_sub_epi32(a, _mm512_mullo_epi32(zp, cr));
        } else {
          a = _mm512_add_epi32(a, cr);
        }
        const __m512 u = Rounded(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(swb + v * kPanel)));
        yacc[r][v] = _mm512_fmadd_ps(u, e, yacc[r][v]);  // exact product by 2^E
      }
    }
  }
  BCT_UNROLL for (int r = 0; r < kRowTile; ++r) BCT_UNROLL for (int v = 0; v < NV; ++v)
    _mm512_store_ps(yt + r * kNv * kPanel + v * kPanel, yacc[r][v]);
}

// One k-step (4 k of 16 columns x 3 panels, 4 rows) of the 8-bit 4 x 48 tile.
#define BCT_INT8_KSTEP                                   \
  "vmovdqu64 (%[w]), %%zmm28\n\t"                        \
  "vmovdqu64 (%[w],%[pb]), %%zmm29\n\t"                  \
  "vmovdqu64 (%[w],%[pb],2), %%zmm30\n\t"                \
  "vpbroadcastd (%[x]), %%zmm31\n\t"                     \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm0\n\t"                \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm1\n\t"                \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm2\n\t"                \
  "vpbroadcastd 4(%[x]), %%zmm31\n\t"                    \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm3\n\t"                \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm4\n\t"                \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm5\n\t"                \
  "vpbroadcastd 8(%[x]), %%zmm31\n\t"                    \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm6\n\t"                \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm7\n\t"                \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm8\n\t"                \
  "vpbroadcastd 12(%[x]), %%zmm31\n\t"                   \
  "vpdpbusd %%zmm31, %%zmm28, %%zmm9\n\t"                \
  "vpdpbusd %%zmm31, %%zmm29, %%zmm10\n\t"               \
  "vpdpbusd %%zmm31, %%zmm30, %%zmm11\n\t"               \
  "add $64, %[w]\n\t"                                    \
  "add $16, %[x]\n\t"

#define BCT_ZERO_SEGMENT                    \
  "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"       \
  "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"       \
  "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"       \
  "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"       \
  "vpxord %%zmm4, %%zmm4, %%zmm4\n\t"       \
  "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"       \
  "vpxord %%zmm6, %%zmm6, %%zmm6\n\t"       \
  "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"       \
  "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"       \
  "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"       \
  "vpxord %%zmm10, %%zmm10, %%zmm10\n\t"    \
  "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"

// The segment's K loop (chunks k-steps, two per iteration when even).
#define BCT_SEGMENT_LOOP(L)                 \
  "mov %[chunks], %[k]\n\t"                 \
  L ":\n\t"                                 \
  BCT_INT8_KSTEP                            \
  "dec %[k]\n\t"                            \
  "jnz " L "b\n\t"

// First segment of a block: block sums = segment sums << shift (row r's shift at 4r(sh)).
#define BCT_SHIFT_FIRST(i, f, off) \
  "vpsllvd " #off "(%[sh])%{1to16%}, %%zmm" #i ", %%zmm" #f "\n\t"
// Later segments: block sums += segment sums << shift.
#define BCT_SHIFT_ADD(i, f, off)                                   \
  "vpsllvd " #off "(%[sh])%{1to16%}, %%zmm" #i ", %%zmm" #i "\n\t" \
  "vpaddd %%zmm" #i ", %%zmm" #f ", %%zmm" #f "\n\t"
#define BCT_ALL_ROWS(OP)                                                      \
  OP(0, 12, 0) OP(1, 13, 0) OP(2, 14, 0) OP(3, 15, 4) OP(4, 16, 4) OP(5, 17, 4) \
  OP(6, 18, 8) OP(7, 19, 8) OP(8, 20, 8) OP(9, 21, 12) OP(10, 22, 12) OP(11, 23, 12)

// Block epilogue of one row: + corr, to float, * sw (zmm24-26), y = fma(u, 2^E, y) in the
// float tile (row stride 192 bytes).
#define BCT_BLOCK_ROW(f0, f1, f2, off)                                \
  "vpaddd " #off "(%[corr])%{1to16%}, %%zmm" #f0 ", %%zmm" #f0 "\n\t" \
  "vpaddd " #off "(%[corr])%{1to16%}, %%zmm" #f1 ", %%zmm" #f1 "\n\t" \
  "vpaddd " #off "(%[corr])%{1to16%}, %%zmm" #f2 ", %%zmm" #f2 "\n\t" \
  "vcvtdq2ps %%zmm" #f0 ", %%zmm" #f0 "\n\t"                          \
  "vcvtdq2ps %%zmm" #f1 ", %%zmm" #f1 "\n\t"                          \
  "vcvtdq2ps %%zmm" #f2 ", %%zmm" #f2 "\n\t"                          \
  "vmulps %%zmm24, %%zmm" #f0 ", %%zmm" #f0 "\n\t"                    \
  "vmulps %%zmm25, %%zmm" #f1 ", %%zmm" #f1 "\n\t"                    \
  "vmulps %%zmm26, %%zmm" #f2 ", %%zmm" #f2 "\n\t"                    \
  "vbroadcastss " #off "(%[bs]), %%zmm27\n\t"                         \
  "vfmadd213ps " #off "*48(%[yt]), %%zmm27, %%zmm" #f0 "\n\t"        \
  "vfmadd213ps " #off "*48+64(%[yt]), %%zmm27, %%zmm" #f1 "\n\t"     \
  "vfmadd213ps " #off "*48+128(%[yt]), %%zmm27, %%zmm" #f2 "\n\t"    \
  "vmovaps %%zmm" #f0 ", " #off "*48(%[yt])\n\t"                      \
  "vmovaps %%zmm" #f1 ", " #off "*48+64(%[yt])\n\t"                   \
  "vmovaps %%zmm" #f2 ", " #off "*48+128(%[yt])\n\t"

// The full 4 x 48 tile of 8-bit weights over all of K (see the file comment). yt: the float
// tile [4][48], zero on entry.
BCT_AVX512 void Tile8Asm(const Operands& op, int64_t t, int64_t p0, float* yt) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const uint8_t* wp = w.data.data() + p0 * w.panel_bytes();
  const int8_t* xa = x.a + t * x.tile_bytes;
  const int32_t* sh = x.shift + t * w.nseg * kRowTile;
  const int32_t* corr = x.corr + t * w.nblk * kRowTile;
  const float* bs = x.bscale + t * w.nblk * kRowTile;
  const float* swp = w.sw.data() + p0 * kPanel;
  const int64_t pb = w.panel_bytes(), chunks = w.chunks, later = w.spb - 1;
  const int64_t sw_step = w.npad * 4;
  int64_t nb = w.nblk, k = 0, s = 0;
  asm volatile(
      "3:\n\t"
      BCT_ZERO_SEGMENT
      BCT_SEGMENT_LOOP("1")
      BCT_ALL_ROWS(BCT_SHIFT_FIRST)
      "add $16, %[sh]\n\t"
      "mov %[later], %[s]\n\t"
      "test %[s], %[s]\n\t"
      "jz 4f\n\t"
      "2:\n\t"
      BCT_ZERO_SEGMENT
      BCT_SEGMENT_LOOP("5")
      BCT_ALL_ROWS(BCT_SHIFT_ADD)
      "add $16, %[sh]\n\t"
      "dec %[s]\n\t"
      "jnz 2b\n\t"
      "4:\n\t"
      "vmovups (%[swp]), %%zmm24\n\t"
      "vmovups 64(%[swp]), %%zmm25\n\t"
      "vmovups 128(%[swp]), %%zmm26\n\t"
      BCT_BLOCK_ROW(12, 13, 14, 0)
      BCT_BLOCK_ROW(15, 16, 17, 4)
      BCT_BLOCK_ROW(18, 19, 20, 8)
      BCT_BLOCK_ROW(21, 22, 23, 12)
      "add $16, %[corr]\n\t"
      "add $16, %[bs]\n\t"
      "add %[sw_step], %[swp]\n\t"
      "dec %[nb]\n\t"
      "jnz 3b\n\t"
      : [w] "+r"(wp), [x] "+r"(xa), [sh] "+r"(sh), [corr] "+r"(corr), [bs] "+r"(bs),
        [swp] "+r"(swp), [nb] "+r"(nb), [k] "+r"(k), [s] "+r"(s)
      : [pb] "r"(pb), [yt] "r"(yt), [chunks] "m"(chunks), [later] "m"(later),
        [sw_step] "m"(sw_step)
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10",
        "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "zmm19", "zmm20",
        "zmm21", "zmm22", "zmm23", "zmm24", "zmm25", "zmm26", "zmm27", "zmm28", "zmm29", "zmm30",
        "zmm31", "memory", "cc");
}

// y rows of a tile: + bias, * multiplier, the valid rows and columns stored.
BCT_AVX512 void StoreTile(const Operands& op, int64_t t, int64_t m0, int64_t m1, int64_t p0,
                          int64_t nv, const float* yt) {
  const PackedWeights& w = *op.w;
  for (int r = 0; r < kRowTile; ++r) {
    const int64_t m = t * kRowTile + r;
    if (m < m0 || m >= std::min(m1, op.rows)) continue;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t col0 = (p0 + v) * kPanel;
      const int64_t valid = std::min<int64_t>(kPanel, w.n - col0);
      if (valid <= 0) break;
      __m512 out = _mm512_load_ps(yt + r * kNv * kPanel + v * kPanel);
      if (op.bias) out = _mm512_add_ps(out, _mm512_loadu_ps(op.bias + col0));
      if (op.ymul) out = _mm512_mul_ps(out, _mm512_set1_ps(*op.ymul));
      const __mmask16 mask = valid >= kPanel ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      _mm512_mask_storeu_ps(op.y + m * op.ldy + col0, mask, out);
    }
  }
}

template <bool INT4>
BCT_AVX512 void TileAny(const Operands& op, int64_t t, int64_t p, int64_t nv, float* yt) {
  switch (nv) {
    case 3: return TileIntrinsics<3, INT4>(op, t, p, yt);
    case 2: return TileIntrinsics<2, INT4>(op, t, p, yt);
    default: return TileIntrinsics<1, INT4>(op, t, p, yt);
  }
}

}  // namespace

BCT_AVX512 void GemmAvx512(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  alignas(64) float yt[kRowTile * kNv * kPanel];
  const int64_t t0 = m0 / kRowTile, t1 = (m1 + kRowTile - 1) / kRowTile;
  for (int64_t p = p0; p < p1; p += kNv) {
    const int64_t nv = std::min<int64_t>(kNv, p1 - p);
    for (int64_t t = t0; t < t1; ++t) {
      if (!w.int4 && nv == kNv) {
        // (zmm stores: a memset of these 768 bytes is a `rep stos`, ~3% of the kernel's time)
        for (int i = 0; i < kRowTile * kNv; ++i) _mm512_store_ps(yt + i * kPanel, _mm512_setzero_ps());
        Tile8Asm(op, t, p, yt);
      } else if (w.int4) {
        TileAny<true>(op, t, p, nv, yt);
      } else {
        TileAny<false>(op, t, p, nv, yt);
      }
      StoreTile(op, t, m0, m1, p, nv, yt);
    }
  }
}

}  // namespace gemm
}  // namespace bct
