// The integer steps of IntSoftmax (ref_nonlinear.int_softmax) shared by its row kernels
// (softmax.cc: portable and AVX-512; softmax_avx2.cc): constants, the step-2 tables and the
// scalar per-block arithmetic of steps 1, 3 and 4.
#pragma once

#include "nonlinear.h"

namespace bct {
namespace nl {

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
inline const SoftmaxTables& softmax_tables() {
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

}  // namespace nl
}  // namespace bct
