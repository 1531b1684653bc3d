// The integer steps of IntLayerNorm (ref_nonlinear.int_layernorm) shared by its row kernels
// (layernorm.cc: portable and AVX-512; layernorm_avx2.cc): the op's prepared gamma / beta and
// the scalar row constants of steps 2-4.
#pragma once

#include "nonlinear.h"

namespace bct {
namespace nl {

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
inline unsigned __int128 eps_int(uint32_t mant, int ex, int e_c) {
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

// Steps 1-5 for rows [r0, r1), scalar (layernorm.cc).
void layernorm_rows_portable(const Blocking& bl, const LnParams& pp, const int8_t* x,
                             const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1);

// Steps 1-5 with AVX2 for block sizes that are multiples of 16 (layernorm_avx2.cc, x86 only).
void layernorm_rows_avx2(const Blocking& bl, const LnParams& pp, const int8_t* x,
                         const int16_t* ex, int8_t* y, float* ys, int64_t r0, int64_t r1);

}  // namespace nl
}  // namespace bct
