// AttentionPV's per-head arithmetic (ref_attention.py "Arithmetic"), shared by the AttentionPV
// op (attention_pv.cc) and the fused BlockAttention op (block_attention.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"
#include "../platform.h"

namespace bct {
namespace pv {

constexpr int64_t kMaxSegment = 256;

struct PvDims {
  int64_t m, s, d, nb, block, seg, nseg, dpad, pairs;
  int p_exp;
};

// PvDims of one head: m output rows, s tokens, d columns in blocks of `block`.
PvDims MakeDims(int64_t m, int64_t s, int64_t d, int64_t block, int64_t seg, int p_exp);

// One head's prepared V: w as int16 pairs (tokens 2t, 2t+1) x dpad columns (zero padded), and
// the epilogue factors 2^(r + p_exponent) per segment x column.
struct PreparedV {
  int32_t* w;      // [pairs][dpad] dwords: low half w[2t, j], high half w[2t + 1, j]
  float* factor;   // [nseg][dpad]
};

// Per-thread storage for one head's PreparedV (valid until the thread's next call).
PreparedV HeadScratch(const PvDims& dm);

// Steps 1-2 for one head. v_row / s_row: elements between consecutive tokens of v and v_scale
// (D and nb, or h * D and h * nb when the inputs come token-major). `valid` (optional, s
// entries): tokens that take part; the others get w = 0 and no say in their segment's exponent
// r (ref_attention.block_attention: a sequence's result does not depend on padding tokens).
// `isa` >= avx512: the AVX-512 BW form, same result.
void PrepareV(Isa isa, const PvDims& dm, const int8_t* v, int64_t v_row, const float* vs,
              int64_t s_row, const uint8_t* valid, PreparedV* out);

// y row pointer for output row m of this head; columns contiguous.
struct RowOut {
  float* base;
  int64_t stride;  // between rows m
  float* row(int64_t m) const { return base + m * stride; }
};

// Steps 3-4 for one head: p [m][s] uint8 -> y rows, on the path of `isa` (avx512 and amx: the
// VNNI path).
void Head(Isa isa, const PvDims& dm, const uint8_t* p, const PreparedV& pv, const RowOut& out);

}  // namespace pv
}  // namespace bct
