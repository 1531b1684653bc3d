// Block GEMM, AMX-INT8 (+ AVX-512 for the integer and float steps): tdpbssd (s8 x s8 -> s32)
// on 16 x 16 int32 tiles, one per K segment, stored to memory; then ref_matmul.py's steps 2-3
// on the stored sums in AVX-512: shift-add of a block's segments, one conversion per block.
//
// Weights: 8-bit ones are packed signed (PackedWeights::signed8); the 64-byte chunks of a panel
// are then exactly the rows of a B tile (4 consecutive k of the 16 columns). int4 ones stay
// packed as nibbles and each task unpacks one panel at a time to q - zp (in -15..15) into
// per-thread scratch, reused by all its row tiles. Both make tdpbssd's sums d itself: no
// correction term. Activations are row-major, rows padded to a multiple of 16 (gemm.h).
// The tile configuration is per thread, and other code on the pool threads may change or
// release it, so every task loads it (ldtilecfg, ~60 ns) and releases the tiles at its end.
// GCC's AMX intrinsics declare no memory operands for tileloadd / tilestored (and only 8 bytes
// for ldtilecfg), so the instructions are written out here with memory clobbers.
//
// Tests run this path on CPUs without AMX with the tile instructions emulated
// (BCTONNX_AMX_EMULATE=1, platform.h): only the five tile instructions differ from the real
// path, so everything else here is checked against the numpy reference on any AVX-512 CPU.
#include <algorithm>

#include "../simd.h"
#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

#define BCT_UNROLL _Pragma("GCC unroll 16")
#define BCT_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The emulated tile unit: 8 tiles of 16 rows x 64 bytes, one per thread.
struct EmuTiles {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) int8_t data[8][16][64] = {};
};
EmuTiles& Emu() {
  thread_local EmuTiles tiles;
  return tiles;
}
void EmuConfig(const AmxTileConfig& cfg) {
  for (int t = 0; t < 8; ++t) Emu().rows[t] = cfg.rows[t], Emu().colsb[t] = cfg.colsb[t];
}
void EmuZero(int t) { std::memset(Emu().data[t], 0, sizeof Emu().data[t]); }
void EmuLoad(int t, const void* base, int64_t stride) {
  EmuTiles& e = Emu();
  for (int r = 0; r < e.rows[t]; ++r)
    std::memcpy(e.data[t][r], static_cast<const int8_t*>(base) + r * stride, e.colsb[t]);
}
void EmuStore(int t, void* base, int64_t stride) {
  EmuTiles& e = Emu();
  for (int r = 0; r < e.rows[t]; ++r)
    std::memcpy(static_cast<int8_t*>(base) + r * stride, e.data[t][r], e.colsb[t]);
}
void EmuDpbssd(int c, int a, int b) {
  EmuTiles& e = Emu();
  for (int m = 0; m < e.rows[c]; ++m)
    for (int n = 0; n < e.colsb[c] / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, &e.data[c][m][4 * n], 4);
      uint32_t sum = static_cast<uint32_t>(acc);
      for (int k = 0; k < e.colsb[a] / 4; ++k)
        for (int i = 0; i < 4; ++i)
          sum += static_cast<uint32_t>(e.data[a][m][4 * k + i] * e.data[b][k][4 * n + i]);
      acc = static_cast<int32_t>(sum);
      std::memcpy(&e.data[c][m][4 * n], &acc, 4);
    }
}

#define BCT_TILE_ZERO(t)                                  \
  do {                                                    \
    if constexpr (EMU) EmuZero(t);                        \
    else asm volatile("tilezero %%tmm" #t ::);            \
  } while (0)
#define BCT_TILE_LOAD(t, base, stride)                                                   \
  do {                                                                                   \
    if constexpr (EMU) EmuLoad(t, base, stride);                                         \
    else asm volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(stride) : "memory"); \
  } while (0)
#define BCT_TILE_STORE(t, base, stride)                                                   \
  do {                                                                                    \
    if constexpr (EMU) EmuStore(t, base, stride);                                         \
    else asm volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(stride) : "memory"); \
  } while (0)
#define BCT_TDPBSSD(c, a, b)                                            \
  do {                                                                  \
    if constexpr (EMU) EmuDpbssd(c, a, b);                              \
    else asm volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::); \
  } while (0)

// K bytes per tdpbssd: the largest multiple of 4 up to 64 that divides the padded segment.
int64_t AmxKStep(int64_t gp) {
  for (int64_t kt = std::min<int64_t>(64, gp) / 4 * 4; kt > 4; kt -= 4)
    if (gp % kt == 0) return kt;
  return 4;
}

template <bool EMU>
class AmxTiles {  // the tile configuration of one task: loaded now, released at the end
 public:
  explicit AmxTiles(int64_t kt) {
    AmxTileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // int32 sums
    for (int t = 4; t < 8; t += 2) {
      cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(kt);             // activations
      cfg.rows[t + 1] = static_cast<uint8_t>(kt / 4), cfg.colsb[t + 1] = 64;  // weights
    }
    if constexpr (EMU)
      EmuConfig(cfg);
    else
      asm volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  ~AmxTiles() {
    if constexpr (!EMU) asm volatile("tilerelease" ::: "memory");
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// The int4 weights of panel p as signed bytes q - zp in the int8 layout (B tiles).
BCT_AMX_TARGET void UnpackInt4Panel(const PackedWeights& w, int64_t p, int8_t* dst) {
  const uint8_t* src = w.data.data() + p * w.panel_bytes();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < w.nblk; ++b) {
    // zp + 8 of the 16 columns, in each byte of their 4-byte group
    const __m512i zp = _mm512_mullo_epi32(
        _mm512_loadu_si512(reinterpret_cast<const void*>(w.zpi.data() + b * w.npad + p * kPanel)),
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

// Rows [m0, m1) x panels [p0, p1). The unit of work is a 16 x 16 tile (one row tile x one
// panel) over all of K; tiles go panel by panel (int4 weights: each panel unpacked once, for all
// its row tiles), and inside a tile the segments go in groups of four through tmm0-3 (four
// independent tdpbssd in flight, so the tile unit pipelines them), their operands alternating
// between tmm4/5 and tmm6/7 (activations: 16 rows x kt bytes, kt a divisor of the padded
// segment, at most 64; weights: kt/4 rows x 64 bytes). The int32 sums of a group are stored to
// memory and their epilogue runs one step later, after the tile instructions of the next group
// -- of the same tile or of the next one -- are issued: its loads do not wait for a tile store
// just issued, and the tile unit does not drain between tiles.
// Epilogue (ref_matmul.py steps 2-3): blocks of one segment: y += fl(fl(d) * sw) * 2^E, y in
// 16 registers; blocks of several: the block's int32 sum s += d << shift in 16 registers, then
// y += fl(fl(s) * sw) * 2^E with y in memory (L1).
template <bool SPB1, bool EMU>
BCT_AMX_TARGET void RunAmx(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  const int64_t lda = x.lda, gp = w.gp, kt = AmxKStep(gp), ksteps = gp / kt;
  const int64_t nseg = w.nseg, spb = w.spb;
  // int4: two unpacked panels (the next one is written while tile loads of the last may be in
  // flight)
  const int64_t panel_elems = nseg * gp * kPanel;
  int8_t* unpacked =
      w.int4 ? ThreadScratch<int8_t>(kSlotB, static_cast<size_t>(2 * panel_elems)) : nullptr;
  const int64_t nrt = (m1 - m0 + 15) / 16;
  auto panel_weights = [&](int64_t pi) {
    return w.int4 ? unpacked + (pi & 1) * panel_elems
                  : reinterpret_cast<const int8_t*>(w.data.data() + (p0 + pi) * w.panel_bytes());
  };

  alignas(64) int32_t buf[2][4][16][kPanel];  // [step parity][segment in group]
  alignas(64) float fm[SPB1 ? 1 : 16][kPanel];
  __m512 acc[16];    // SPB1: y
  __m512i sacc[16];  // !SPB1: the block's int32 sums
  BCT_UNROLL for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps(), sacc[r] = _mm512_setzero_si512();
  if (!SPB1) std::memset(fm, 0, sizeof fm);

#define BCT_AMX_SEGMENT(C, A, B, j)        \
  do {                                      \
    BCT_TILE_ZERO(C);                       \
    for (int64_t s = 0; s < ksteps; ++s) {  \
      const int64_t ko = (j) * gp + s * kt; \
      BCT_TILE_LOAD(A, a + ko, lda);        \
      BCT_TILE_LOAD(B, wb + ko * 16, int64_t{64}); \
      BCT_TDPBSSD(C, A, B);                 \
    }                                       \
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

  AmxTiles<EMU> tiles(kt);
  // position of the step being issued (pi, rt, g) and of the one in the epilogue (e*); the
  // epilogue's weight block b and segment jb in it (no divisions in the loop)
  const int64_t ngroups = (nseg + 3) / 4, steps = (p1 - p0) * nrt * ngroups;
  int64_t pi = 0, rt = 0, g = 0, epi = 0, ert = 0, eg = 0, b = 0, jb = 0;
  for (int64_t step = 0; step <= steps; ++step) {
    if (step < steps) {  // issue group g of tile (rt, pi)
      prefetch(pi + 1, (rt * ngroups + g) * pf_lines, pf_lines);
      if (w.int4 && g == 0 && rt == 0)
        UnpackInt4Panel(w, p0 + pi, unpacked + (pi & 1) * panel_elems);
      const int8_t* wb = panel_weights(pi);
      const int8_t* a = x.a + (m0 + 16 * rt) * lda;
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
    // steps 2-3 of the previous step's segments
    const int64_t prev = step - 1;
    const int64_t m = m0 + 16 * ert, col0 = (p0 + epi) * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, w.n - col0);
    const int64_t j0 = 4 * eg, cnt = std::min<int64_t>(4, nseg - j0);
    for (int64_t q = 0; q < cnt; ++q) {
      const int64_t j = j0 + q;
      const int32_t(*d)[kPanel] = buf[prev & 1][q];
      const __m512 sw = _mm512_loadu_ps(w.sw.data() + b * w.npad + col0);
      if (SPB1) {
        BCT_UNROLL for (int r = 0; r < 16; ++r) {
          // (maskz with all lanes: the same instruction, without GCC 12's
          // -Wmaybe-uninitialized false positive on _mm512_undefined_ps in the unmasked one)
          const __m512 dv = _mm512_maskz_cvtepi32_ps(
              0xFFFF, _mm512_load_si512(reinterpret_cast<const void*>(d[r])));
          const __m512 e = _mm512_set1_ps(x.bscale[(m + r) * w.nblk + b]);
          acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dv, sw), e, acc[r]);  // exact product by 2^E
        }
        ++b;
      } else {
        BCT_UNROLL for (int r = 0; r < 16; ++r) {
          const __m512i dv = _mm512_sllv_epi32(
              _mm512_load_si512(reinterpret_cast<const void*>(d[r])),
              _mm512_set1_epi32(x.shift[(m + r) * nseg + j]));
          sacc[r] = jb == 0 ? dv : _mm512_add_epi32(sacc[r], dv);
        }
        if (++jb == spb) {  // y = y + fl(fl(s) * sw) * 2^E
          jb = 0;
          BCT_UNROLL for (int r = 0; r < 16; ++r) {
            const __m512 u = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, sacc[r]), sw);
            const __m512 e = _mm512_set1_ps(x.bscale[(m + r) * w.nblk + b]);
            _mm512_store_ps(fm[r], _mm512_fmadd_ps(u, e, _mm512_load_ps(fm[r])));
          }
          ++b;
        }
      }
    }
    if (++eg == ngroups) {  // the tile is done: y = (y + bias) * multiplier; restart from 0
      eg = 0;
      b = 0;
      const __mmask16 mask =
          valid >= kPanel ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      const __m512 bias = op.bias ? _mm512_loadu_ps(op.bias + col0) : _mm512_setzero_ps();
      const __m512 ymul = op.ymul ? _mm512_set1_ps(*op.ymul) : _mm512_setzero_ps();
      const int rows = static_cast<int>(std::min<int64_t>(16, std::min(m1, op.rows) - m));
      BCT_UNROLL for (int r = 0; r < 16; ++r) {
        __m512 out = SPB1 ? acc[r] : _mm512_load_ps(fm[r]);
        if (op.bias) out = _mm512_add_ps(out, bias);
        if (op.ymul) out = _mm512_mul_ps(out, ymul);
        if (r < rows && valid > 0) _mm512_mask_storeu_ps(op.y + (m + r) * op.ldy + col0, mask, out);
        acc[r] = _mm512_setzero_ps();
        if (!SPB1) _mm512_store_ps(fm[r], acc[r]);
      }
      if (++ert == nrt) ert = 0, ++epi;
    }
  }
#undef BCT_AMX_SEGMENT
}

}  // namespace

void GemmAmx(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const bool spb1 = op.w->spb == 1;
  if (op.amx_emulated)
    spb1 ? RunAmx<true, true>(op, m0, m1, p0, p1) : RunAmx<false, true>(op, m0, m1, p0, p1);
  else
    spb1 ? RunAmx<true, false>(op, m0, m1, p0, p1) : RunAmx<false, false>(op, m0, m1, p0, p1);
}

}  // namespace gemm
}  // namespace bct
