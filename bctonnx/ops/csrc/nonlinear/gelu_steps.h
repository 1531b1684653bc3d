// The table and per-block steps of IntGelu (ref_nonlinear.int_gelu) shared by its row kernels
// (gelu.cc: portable and AVX-512 VBMI; gelu_avx2.cc): the table layout, each block's max |T|
// and table row, and the output exponents of a row's groups of blocks.
#pragma once

#include "nonlinear.h"

namespace bct {
namespace nl {

constexpr int kGeluF = 16;
constexpr int kGeluELo = -30;
constexpr int kGeluEHi = 3;
constexpr int kGeluNE = kGeluEHi - kGeluELo + 1;
constexpr int kGeluKMin = -6;  // |T| >= 1 -> k >= -6
constexpr int kGeluKMax = 24;  // |T| < 2^23 -> k > 24 gives zeros
constexpr int kGeluNK = kGeluKMax - kGeluKMin + 1;

struct GeluTables {
  int32_t t[kGeluNE][256];                         // T[e][q + 128]
  int32_t negmax[kGeluNE];                         // max |T| over q < 0
  alignas(64) int8_t codes[kGeluNE][kGeluNK][256];  // clamp(shift_round_even(T, k), -127, 127)
  // The AVX2 kernel's form of each codes row: in each half (codes -128..-1, 0..127) the XOR of
  // each entry with the one 16 before it (the first 16 of a half as they are), so the XOR of a
  // half's 16-entry chunks 0..i is chunk i (gelu_avx2.cc).
  alignas(64) int8_t diffs[kGeluNE][kGeluNK][256];
};

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

// The code table row of a block at output exponent eo >= its own, as its shift index k -
// kGeluKMin (-1: all codes 0). The shift k = eo - g is at least the block's own, so >=
// kGeluKMin; beyond kGeluKMax every code rounds to 0.
inline int gelu_shift_index(const GeluBlock& gb, int eo) {
  const int k = eo - gb.g;
  return gb.m == 0 || k > kGeluKMax ? -1 : k - kGeluKMin;
}
inline const int8_t* gelu_codes_row(const GeluTables& tb, const GeluBlock& gb, int eo) {
  const int ki = gelu_shift_index(gb, eo);
  return ki < 0 ? nullptr : tb.codes[gb.ei][ki];
}

// Output blocks of `per` input blocks (ref: reblock_grouped; per = 1: reblock).
struct GeluGrouping {
  int64_t per, ngrp;
};

// Each block's output exponent: the largest of its group's (gbs[b].eo is overwritten), and
// the group scales of one row.
inline void gelu_group_exponents(const Blocking& bl, GeluGrouping gr, GeluBlock* gbs, float* ys) {
  if (gr.per == 1) {  // each block its own group
    for (int64_t b = 0; b < bl.nb; ++b) ys[b] = pow2_float(gbs[b].eo);
    return;
  }
  for (int64_t gi = 0; gi < gr.ngrp; ++gi) {
    const int64_t b0 = gi * gr.per, b1 = std::min(bl.nb, b0 + gr.per);
    int eo = -128;
    for (int64_t b = b0; b < b1; ++b) eo = std::max(eo, gbs[b].eo);
    for (int64_t b = b0; b < b1; ++b) gbs[b].eo = eo;
    ys[gi] = pow2_float(eo);
  }
}

// The AVX2 kernel of IntGelu's rows [r0, r1) (gelu_avx2.cc; x86 only, bl.b % 16 == 0): the
// same arguments and bits as gelu.cc's portable kernel.
void gelu_rows_avx2(const GeluTables& tb, const Blocking& bl, GeluGrouping gr, const int8_t* x,
                    const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1,
                    GeluBlock* gbs);

}  // namespace nl
}  // namespace bct
