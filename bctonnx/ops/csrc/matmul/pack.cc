// Operand packing for the block GEMM (gemm.h): weights once per kernel, activations per call.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../common.h"
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
  const double frac = static_cast<double>(int64_t{1} << wc.frac_bits);
  for (int64_t b = 0; b < w.nblk; ++b)
    for (int64_t c = 0; c < w.n; ++c) {
      const int32_t code = wc.scale_codes[b * w.n + c];
      if (code < -128 || code > 127) Throw("weight scale code out of int8 range");
      // correctly rounded 2^(code / 2^F) (= blockformat.decode_scales)
      w.sw[b * w.npad + c] = static_cast<float>(std::exp2(static_cast<double>(code) / frac));
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

void PackActRow(const PackedWeights& w, const ActsSizes& sz, bool interleaved, const int8_t* q,
                const int* exps, int64_t m, const ActsBuffers& buf) {
  const int64_t g = w.g, gp = w.gp, spb = w.spb;
  const int64_t t = m / kRowTile, r = m % kRowTile;
  // codes of segment j (g of them, then zeros up to gp): in 4-byte groups 16 bytes apart
  // (interleaved) or contiguous (row-major)
  auto put = [&](int64_t j, const int8_t* src) {
    if (!interleaved) {
      int8_t* dst = buf.a + m * sz.lda + j * gp;
      std::memcpy(dst, src, static_cast<size_t>(g));
      std::memset(dst + g, 0, static_cast<size_t>(gp - g));
      return;
    }
    int8_t* dst = buf.a + t * sz.tile_bytes + (j * gp / 4) * 16 + r * 4;
    int64_t kk = 0;
    for (; kk + 4 <= g; kk += 4) std::memcpy(dst + kk * 4, src + kk, 4);
    if (kk < gp) {
      int8_t last[4] = {0, 0, 0, 0};
      for (int64_t i = kk; i < g; ++i) last[i - kk] = src[i];
      std::memcpy(dst + kk * 4, last, 4);
      for (kk += 4; kk < gp; kk += 4) std::memset(dst + kk * 4, 0, 4);
    }
  };
  auto shift_at = [&](int64_t j) -> int32_t& {
    return interleaved ? buf.shift[(t * w.nseg + j) * kRowTile + r] : buf.shift[m * w.nseg + j];
  };
  const int span = CombineSpan(w.block);
  int8_t lowered[256];  // a re-quantized segment (on the heap when longer)
  std::vector<int8_t> lowered_heap;
  for (int64_t b = 0; b < w.nblk; ++b) {
    // E: the block's exponent (ref_matmul.py step 2)
    int top = -1000;
    for (int64_t jj = 0; jj < spb; ++jj)
      top = std::max(top, exps[((b * spb + jj) * g) / w.act_block]);
    const int big_e = spb > 1 ? top - span : top;
    int64_t x_sum = 0;
    for (int64_t jj = 0; jj < spb; ++jj) {
      const int64_t j = b * spb + jj;
      const int e = exps[(j * g) / w.act_block];
      const int8_t* src = q + j * g;
      int32_t seg_sum = 0;
      if (e >= big_e) {
        for (int64_t kk = 0; kk < g; ++kk) seg_sum += src[kk];
        put(j, src);
        shift_at(j) = e - big_e;
        x_sum += static_cast<int64_t>(seg_sum) * (int64_t{1} << (e - big_e));  // exact
      } else {  // more than S binades below the block's largest: re-quantized to E
        int8_t* low = lowered;
        if (g > 256) {
          lowered_heap.resize(static_cast<size_t>(g));
          low = lowered_heap.data();
        }
        for (int64_t kk = 0; kk < g; ++kk) {
          low[kk] = static_cast<int8_t>(shift_round_even(src[kk], big_e - e));
          seg_sum += low[kk];
        }
        put(j, low);
        shift_at(j) = 0;
        x_sum += seg_sum;
      }
    }
    const int64_t bi = interleaved ? (t * w.nblk + b) * kRowTile + r : m * w.nblk + b;
    buf.corr[bi] = static_cast<int32_t>(w.int4 ? x_sum : (w.signed8 ? 0 : -128 * x_sum));
    buf.bscale[bi] = pow2_float(big_e);
  }
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
