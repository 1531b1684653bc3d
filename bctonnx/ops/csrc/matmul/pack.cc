// Operand packing for the block GEMM (gemm.h): weights once per kernel, activations per call.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "../simd.h"
#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

[[noreturn]] void Throw(const std::string& what) { throw std::runtime_error(what); }

// S of ref_matmul.combine_span: 16 - ceil(log2(block)).
int CombineSpan(int64_t block) {
  int bits = 0;
  while ((int64_t{1} << bits) < block) ++bits;
  return 16 - bits;
}

}  // namespace

void ShapeWeights(int64_t k, int64_t n, int64_t block, int64_t act_block, bool int4, Isa isa,
                  PackedWeights* w) {
  if (k < 1 || n < 1) Throw("empty weights");
  if (block < 1 || act_block < 1) Throw("block sizes must be >= 1");
  if (k % block)
    Throw("block_size " + std::to_string(block) + " does not divide K = " + std::to_string(k));
  const int64_t lo = std::min(block, act_block), hi = std::max(block, act_block);
  if (hi % lo) Throw("block_size and act_block_size: one must divide the other");
  w->k = k;
  w->n = n;
  w->block = block;
  w->act_block = act_block;
  w->g = lo;
  w->nblk = k / block;
  w->nseg = k / lo;
  w->spb = block / lo;
  w->int4 = int4;
  w->signed8 = !int4 && isa == kAmx;
  w->gp = int4 ? (lo + 7) / 8 * 8 : (lo + 3) / 4 * 4;
  w->chunks = int4 ? w->gp / 8 : w->gp / 4;
  w->npanel = (n + kPanel - 1) / kPanel;
  w->npad = w->npanel * kPanel;
}

void PackWeights(const WeightCodes& wc, int64_t act_block, Isa isa, PackedWeights* out) {
  PackedWeights& w = *out;
  ShapeWeights(wc.k, wc.n, wc.block, act_block, wc.int4, isa, &w);
  auto zp_at = [&](int64_t b, int64_t c) {
    return wc.zero_points ? wc.zero_points[b * w.n + c] : 0;
  };
  w.sw.assign(static_cast<size_t>(w.nblk * w.npad), 0.0f);
  for (int64_t b = 0; b < w.nblk; ++b)
    for (int64_t c = 0; c < w.n; ++c) {
      const int32_t code = wc.scale_codes[b * w.n + c];
      if (code < -128 || code > 127) Throw("weight scale code out of int8 range");
      w.sw[b * w.npad + c] = decode_pow2_scale(code, static_cast<int>(wc.frac_bits));
    }
  w.data.assign(static_cast<size_t>(w.npanel * w.panel_bytes()), 0);
  const int64_t pb = w.panel_bytes(), sb = w.seg_bytes();
  if (w.int4) {
    w.zpp.assign(static_cast<size_t>(w.nblk * w.npad), 0.0f);
    w.zpi.assign(static_cast<size_t>(w.nblk * w.npad), 0);
    for (int64_t b = 0; b < w.nblk; ++b)
      for (int64_t c = 0; c < w.n; ++c) {
        w.zpi[b * w.npad + c] = zp_at(b, c) + 8;
        w.zpp[b * w.npad + c] = static_cast<float>(zp_at(b, c) + 8);
      }
    for (int64_t k = 0; k < w.k; ++k)
      for (int64_t c = 0; c < w.n; ++c) {
        const int32_t u = wc.codes[k * w.n + c] + 8;
        if (u < 0 || u > 15) Throw("int4 code out of range");
        const int64_t j = k / w.g, kk = k % w.g;
        uint8_t& byte = w.data[(c / kPanel) * pb + j * sb + (kk / 8) * 64 + (c % kPanel) * 4 +
                               kk % 4];
        byte |= static_cast<uint8_t>((kk % 8) < 4 ? u : u << 4);
      }
    // padding (k >= g, columns >= n) is nibble 0 = code -8: its activations are 0 (rows) or
    // its outputs are never stored (columns), and zpi there is 0
    return;
  }
  for (int64_t k = 0; k < w.k; ++k)
    for (int64_t c = 0; c < w.n; ++c) {
      const int32_t s = wc.codes[k * w.n + c] - zp_at(k / w.block, c);
      if (s < -128 || s > 127)
        Throw("8-bit asymmetric weights (q - zp outside int8) are not supported");
      const int64_t j = k / w.g, kk = k % w.g;
      w.data[(c / kPanel) * pb + j * sb + (kk / 4) * 64 + (c % kPanel) * 4 + kk % 4] =
          static_cast<uint8_t>(w.signed8 ? s : s + 128);
    }
  if (!w.signed8) {  // weight 0 is byte 128 in the unsigned form: padding rows and columns
    for (int64_t p = 0; p < w.npanel; ++p)
      for (int64_t j = 0; j < w.nseg; ++j)
        for (int64_t kk = 0; kk < w.gp; ++kk)
          for (int64_t lane = 0; lane < kPanel; ++lane)
            if (kk >= w.g || p * kPanel + lane >= w.n)
              w.data[p * pb + j * sb + (kk / 4) * 64 + lane * 4 + kk % 4] = 128;
  }
}

void PackRowsAsWeights(const int8_t* b, int64_t ldb, const float* bs, int64_t ldbs,
                       PackedWeights* out) {
  PackedWeights& w = *out;
  // (locals, not w's fields, in the loops: w may be thread-local, and GCC re-derives its
  // address with a __tls_get_addr call when it reloads a field after a store)
  const int64_t n = w.n, nb = w.nblk, g = w.g, chunk_bytes = w.seg_bytes(),
                panel_bytes = w.panel_bytes(), npad = w.npad;
  w.data.assign(static_cast<size_t>(w.npanel * panel_bytes), 128);
  w.sw.assign(static_cast<size_t>(nb * npad), 0.0f);
  uint8_t* const packed = w.data.data();
  float* const sw = w.sw.data();
  for (int64_t c = 0; c < n; ++c) {  // u8 = b + 128, one segment per block
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
}

ActsSizes ActsLayout(const PackedWeights& w, bool interleaved, int64_t rows) {
  ActsSizes s;
  const int64_t tile = interleaved ? kRowTile : 16;
  s.padded_rows = (rows + tile - 1) / tile * tile;
  s.lda = w.nseg * w.gp;
  s.tile_bytes = kRowTile * s.lda;
  s.a = s.padded_rows * s.lda;
  s.shift = s.padded_rows * w.nseg;
  s.block = s.padded_rows * w.nblk;
  return s;
}

namespace {

// Segment sums of one row's codes (nseg segments of g), exact: with AVX-512 by vpsadbw on the
// codes + 128 (sums of 8 unsigned bytes per qword) when g is a multiple of 8, else scalar.
__attribute__((target("avx512f,avx512bw"))) void SegmentSumsAvx512(const int8_t* q, int64_t g,
                                                                   int64_t nseg, int32_t* out) {
  const int64_t k = g * nseg;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) int64_t q8[8];
  int64_t acc = 0, filled = 0, j = 0;  // bytes of segment j summed so far
  for (int64_t i = 0; i < k; i += 64) {
    const int64_t n = std::min<int64_t>(64, k - i);
    const __mmask64 m = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    // masked-off bytes are 0 ^ 0x80 = 128 after the flip: remove them with the offset below
    const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q + i), flip);
    _mm512_store_si512(q8, _mm512_sad_epu8(u, _mm512_setzero_si512()));
    for (int64_t w = 0; w < (n + 7) / 8; ++w) {
      acc += q8[w] - 8 * 128;
      filled += 8;
      if (filled == g) {
        out[j++] = static_cast<int32_t>(acc);
        acc = 0;
        filled = 0;
      }
    }
  }
}

// SegmentSumsAvx512 with AVX2: vpsadbw on 32 bytes, then on 8 at a time for the tail.
__attribute__((target("avx2"))) void SegmentSumsAvx2(const int8_t* q, int64_t g, int64_t nseg,
                                                     int32_t* out) {
  const int64_t k = g * nseg;
  alignas(32) int64_t q8[4];
  int64_t acc = 0, filled = 0, j = 0;  // bytes of segment j summed so far
  auto add8 = [&](int64_t sum8) {
    acc += sum8 - 8 * 128;
    filled += 8;
    if (filled == g) {
      out[j++] = static_cast<int32_t>(acc);
      acc = 0;
      filled = 0;
    }
  };
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m256i u = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)), _mm256_set1_epi8(static_cast<char>(0x80)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q8), _mm256_sad_epu8(u, _mm256_setzero_si256()));
    for (int64_t v : q8) add8(v);
  }
  for (; i < k; i += 8) {  // k is a multiple of 8 here
    const __m128i u = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)),
                                    _mm_set1_epi8(static_cast<char>(0x80)));
    add8(_mm_cvtsi128_si64(_mm_sad_epu8(u, _mm_setzero_si128())));
  }
}


// The codes of four rows (one row tile; a null row is zeros) to the interleaved layout, K bytes
// each (K = nseg * g with g == gp, a multiple of 4): per 64 bytes of the rows, a 4 x 16 dword
// transpose (in-lane 4 x 4 transposes, then the 128-bit lanes).
__attribute__((target("avx512f,avx512bw"))) void InterleaveTile(const int8_t* const rows[4],
                                                                int64_t k, int8_t* tile) {
  for (int64_t i = 0; i < k; i += 64) {
    const int64_t n = std::min<int64_t>(64, k - i);
    const __mmask64 m = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    __m512i v[4];
    for (int r = 0; r < 4; ++r)
      v[r] = rows[r] ? _mm512_maskz_loadu_epi8(m, rows[r] + i) : _mm512_setzero_si512();
    const __m512i ab_lo = _mm512_unpacklo_epi32(v[0], v[1]), ab_hi = _mm512_unpackhi_epi32(v[0], v[1]);
    const __m512i cd_lo = _mm512_unpacklo_epi32(v[2], v[3]), cd_hi = _mm512_unpackhi_epi32(v[2], v[3]);
    // per 128-bit lane L (dwords 4L..4L+3 of each row): t0 = k-step 4L, t1 = 4L + 1, ...
    const __m512i t0 = _mm512_unpacklo_epi64(ab_lo, cd_lo), t1 = _mm512_unpackhi_epi64(ab_lo, cd_lo);
    const __m512i t2 = _mm512_unpacklo_epi64(ab_hi, cd_hi), t3 = _mm512_unpackhi_epi64(ab_hi, cd_hi);
    // out vector L: lanes (t0.L, t1.L, t2.L, t3.L): k-steps 4L..4L+3 of the four rows
    const __m512i u0 = _mm512_shuffle_i32x4(t0, t1, 0x44), u1 = _mm512_shuffle_i32x4(t2, t3, 0x44);
    const __m512i u2 = _mm512_shuffle_i32x4(t0, t1, 0xEE), u3 = _mm512_shuffle_i32x4(t2, t3, 0xEE);
    const __m512i o0 = _mm512_shuffle_i32x4(u0, u1, 0x88), o1 = _mm512_shuffle_i32x4(u0, u1, 0xDD);
    const __m512i o2 = _mm512_shuffle_i32x4(u2, u3, 0x88), o3 = _mm512_shuffle_i32x4(u2, u3, 0xDD);
    const __m512i out[4] = {o0, o1, o2, o3};
    const int64_t steps = (n + 3) / 4;  // k-steps in this slice: 16 bytes of the tile each
    for (int o = 0; o < 4 && o * 4 < steps; ++o) {
      const int64_t left = steps - o * 4;
      const __mmask16 sm = left >= 4 ? 0xFFFF : static_cast<__mmask16>((1u << (4 * left)) - 1);
      _mm512_mask_storeu_epi32(tile + (i / 4 + o * 4) * 16, sm, out[o]);
    }
  }
}

// InterleaveTile with AVX2: per 32 bytes of the rows, a 4 x 8 dword transpose (in-lane 4 x 4
// transposes, then the 128-bit lanes); a last slice under 32 bytes through a zero-padded copy.
__attribute__((target("avx2"))) void InterleaveTileAvx2(const int8_t* const rows[4], int64_t k,
                                                        int8_t* tile) {
  for (int64_t i = 0; i < k; i += 32) {
    const int64_t n = std::min<int64_t>(32, k - i);
    __m256i v[4];
    for (int r = 0; r < 4; ++r) {
      if (!rows[r]) {
        v[r] = _mm256_setzero_si256();
      } else if (n == 32) {
        v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + i));
      } else {
        alignas(32) int8_t part[32] = {};
        std::memcpy(part, rows[r] + i, static_cast<size_t>(n));
        v[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
      }
    }
    const __m256i ab_lo = _mm256_unpacklo_epi32(v[0], v[1]), ab_hi = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i cd_lo = _mm256_unpacklo_epi32(v[2], v[3]), cd_hi = _mm256_unpackhi_epi32(v[2], v[3]);
    // per 128-bit lane L: t0 = k-step 4L, t1 = 4L + 1, t2 = 4L + 2, t3 = 4L + 3 of the 4 rows
    const __m256i t0 = _mm256_unpacklo_epi64(ab_lo, cd_lo), t1 = _mm256_unpackhi_epi64(ab_lo, cd_lo);
    const __m256i t2 = _mm256_unpacklo_epi64(ab_hi, cd_hi), t3 = _mm256_unpackhi_epi64(ab_hi, cd_hi);
    const __m256i out[4] = {_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t2, t3, 0x20),
                            _mm256_permute2x128_si256(t0, t1, 0x31), _mm256_permute2x128_si256(t2, t3, 0x31)};
    const int64_t steps = (n + 3) / 4;  // k-steps in this slice: 16 bytes of the tile each
    alignas(32) int8_t last[128];
    int8_t* dst = steps == 8 ? tile + (i / 4) * 16 : last;
    for (int o = 0; o < 4; ++o) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + o * 32), out[o]);
    if (steps < 8) std::memcpy(tile + (i / 4) * 16, last, static_cast<size_t>(steps * 16));
  }
}

}  // namespace

void RowSegmentSums(const int8_t* q, int64_t g, int64_t nseg, Isa isa, int32_t* out) {
  if (isa >= kAvx512 && g % 8 == 0) return SegmentSumsAvx512(q, g, nseg, out);
  if (isa == kAvx2 && g % 8 == 0) return SegmentSumsAvx2(q, g, nseg, out);
  for (int64_t j = 0; j < nseg; ++j) {
    int32_t s = 0;
    for (int64_t kk = 0; kk < g; ++kk) s += q[j * g + kk];
    out[j] = s;
  }
}

void PackActRows(const PackedWeights& w, const ActsSizes& sz, bool interleaved, Isa isa,
                 const int8_t* q, int64_t ldq, const int* exps, int64_t lde, int64_t m0,
                 int64_t m1, const ActsBuffers& buf) {
  const int64_t g = w.g, gp = w.gp, spb = w.spb, nseg = w.nseg;
  const Isa simd = isa >= kAvx512 ? kAvx512 : isa;  // (AMX packs as AVX-512)
  const bool fast_copy = simd >= kAvx2 && interleaved && gp == g && m0 % kRowTile == 0;
  const int span = CombineSpan(w.block);
  thread_local std::vector<int8_t> lowered_rows;  // rows with a re-quantized segment
  thread_local std::vector<int32_t> sums;
  sums.resize(static_cast<size_t>(nseg));
  if (fast_copy) lowered_rows.resize(static_cast<size_t>(kRowTile * nseg * g));
  for (int64_t t0 = m0; t0 < m1; t0 += fast_copy ? kRowTile : 1) {
    const int8_t* tile_rows[kRowTile] = {nullptr, nullptr, nullptr, nullptr};
    for (int64_t m = t0; m < std::min(m1, t0 + (fast_copy ? kRowTile : 1)); ++m) {
      const int8_t* row = q + (m - m0) * ldq;
      const int* ex = exps + (m - m0) * lde;
      const int64_t t = m / kRowTile, r = m % kRowTile;
      RowSegmentSums(row, g, nseg, simd, sums.data());
      int8_t* low = nullptr;  // this row's codes with its re-quantized segments, if any
      for (int64_t b = 0; b < w.nblk; ++b) {
        // E: the block's exponent (ref_matmul.py step 2)
        int top = -1000;
        for (int64_t jj = 0; jj < spb; ++jj) top = std::max(top, ex[((b * spb + jj) * g) / w.act_block]);
        const int big_e = spb > 1 ? top - span : top;
        int64_t x_sum = 0;
        for (int64_t jj = 0; jj < spb; ++jj) {
          const int64_t j = b * spb + jj;
          const int e = ex[(j * g) / w.act_block];
          int32_t& shift = interleaved ? buf.shift[(t * nseg + j) * kRowTile + r] : buf.shift[m * nseg + j];
          if (e >= big_e) {
            shift = e - big_e;
            x_sum += static_cast<int64_t>(sums[j]) * (int64_t{1} << shift);  // exact
            continue;
          }
          // more than S binades below the block's largest: re-quantized to E
          if (low == nullptr) {
            if (!fast_copy) lowered_rows.resize(static_cast<size_t>(nseg * g));
            low = lowered_rows.data() + (fast_copy ? r * nseg * g : 0);
            std::memcpy(low, row, static_cast<size_t>(nseg * g));
          }
          int32_t seg = 0;
          for (int64_t kk = 0; kk < g; ++kk) {
            low[j * g + kk] = static_cast<int8_t>(shift_round_even(row[j * g + kk], big_e - e));
            seg += low[j * g + kk];
          }
          shift = 0;
          x_sum += seg;
        }
        const int64_t bi = interleaved ? (t * w.nblk + b) * kRowTile + r : m * w.nblk + b;
        buf.corr[bi] = static_cast<int32_t>(w.int4 ? x_sum : (w.signed8 ? 0 : -128 * x_sum));
        buf.bscale[bi] = pow2_float(big_e);
      }
      const int8_t* src = low ? low : row;
      if (fast_copy) {
        tile_rows[r] = src;
        continue;
      }
      for (int64_t j = 0; j < nseg; ++j) {  // segment j: g codes, then zeros up to gp
        if (!interleaved) {
          int8_t* dst = buf.a + m * sz.lda + j * gp;
          std::memcpy(dst, src + j * g, static_cast<size_t>(g));
          std::memset(dst + g, 0, static_cast<size_t>(gp - g));
          continue;
        }
        int8_t* dst = buf.a + t * sz.tile_bytes + (j * gp / 4) * 16 + r * 4;  // 4-byte groups
        for (int64_t kk = 0; kk < gp; kk += 4) {
          int8_t four[4] = {0, 0, 0, 0};
          for (int64_t i = kk; i < std::min(g, kk + 4); ++i) four[i - kk] = src[j * g + i];
          std::memcpy(dst + kk * 4, four, 4);
        }
      }
    }
    if (fast_copy && simd == kAvx2)
      InterleaveTileAvx2(tile_rows, nseg * g, buf.a + (t0 / kRowTile) * sz.tile_bytes);
    else if (fast_copy)
      InterleaveTile(tile_rows, nseg * g, buf.a + (t0 / kRowTile) * sz.tile_bytes);
  }
}

void PackActRow(const PackedWeights& w, const ActsSizes& sz, bool interleaved, const int8_t* q,
                const int* exps, int64_t m, const ActsBuffers& buf) {
  PackActRows(w, sz, interleaved, kScalar, q, 0, exps, 0, m, m + 1, buf);
}

void PackActPadding(const PackedWeights& w, const ActsSizes& sz, bool interleaved, int64_t rows,
                    const ActsBuffers& buf) {
  for (int64_t m = rows; m < sz.padded_rows; ++m) {
    const int64_t t = m / kRowTile, r = m % kRowTile;
    for (int64_t k = 0; k < sz.lda; ++k)
      (interleaved ? buf.a[t * sz.tile_bytes + (k / 4) * 16 + r * 4 + k % 4]
                   : buf.a[m * sz.lda + k]) = 0;
    for (int64_t j = 0; j < w.nseg; ++j)
      buf.shift[interleaved ? (t * w.nseg + j) * kRowTile + r : m * w.nseg + j] = 0;
    for (int64_t b = 0; b < w.nblk; ++b) {
      const int64_t bi = interleaved ? (t * w.nblk + b) * kRowTile + r : m * w.nblk + b;
      buf.corr[bi] = 0;
      buf.bscale[bi] = 0.0f;
    }
  }
}

void SegmentSums(const Operands& op, int32_t* out) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  for (int64_t m = 0; m < op.rows; ++m) {
    const int64_t t = m / kRowTile, r = m % kRowTile;
    for (int64_t j = 0; j < w.nseg; ++j)
      for (int64_t c = 0; c < w.n; ++c) {
        int64_t d = 0;
        for (int64_t kk = 0; kk < w.g; ++kk) {
          const int64_t k = j * w.gp + kk;
          const int32_t a = x.interleaved ? x.a[t * x.tile_bytes + (k / 4) * 16 + r * 4 + k % 4]
                                          : x.a[m * x.lda + k];
          d += static_cast<int64_t>(a) * WeightAt(w, j, kk, c);
        }
        out[(m * w.nseg + j) * w.n + c] = static_cast<int32_t>(d);
      }
  }
}

}  // namespace gemm
}  // namespace bct
