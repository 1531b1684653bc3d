// IntSoftmax's row kernels (softmax.cc), also run by the fused BlockAttention op.
#pragma once

#include "nonlinear.h"

namespace bct {
namespace nl {

// Mask information per distinct mask row: unmasked flags, per block any/all, per row any.
struct MaskRows {
  bool present = false;
  int64_t padded = 0;               // nb * B rounded up to 16
  std::vector<uint8_t> flags;       // [mask rows, padded], 1 = unmasked (padding: 0)
  std::vector<uint16_t> bits;       // the same as 16-bit lane masks
  std::vector<uint8_t> block_any;   // [mask rows, nb]
  std::vector<uint8_t> row_any;     // [mask rows]
  std::vector<int64_t> row_of;      // x row -> mask row (empty: one mask row for all)
  int64_t steps = 0;                // 32-lane steps per row
  std::vector<uint32_t> valid32;    // [steps]: lanes inside the row
  std::vector<uint32_t> k32;        // [mask rows, steps]: valid and unmasked lanes
};

// Fills `mr` for rows of x (shape `xshape`, blocked as `bl`) and an additive mask of shape
// *mshape (numpy-broadcastable to x) with values md; mshape null: no mask. Throws on a mask value
// that is neither 0 nor < -1000. `mr` keeps its memory across calls.
void build_mask(const Blocking& bl, const Dims& xshape, const Dims* mshape, const float* md,
                MaskRows& mr);

// The calling thread's MaskRows, reused by every call on it.
MaskRows& mask_rows_buffer();

// The row kernels of IntSoftmax: the portable one (any block size), AVX2 (softmax_avx2.cc)
// and AVX-512 (softmax.cc), both for block sizes that are multiples of 16.
enum class SoftmaxPath { kPortable, kAvx2, kAvx512 };

// The kernel for instruction set `isa` (ChooseIsa(), or kScalar for the portable kernel) and
// block size b: AVX-512 or AVX2 when the block size is a multiple of 16, else portable.
SoftmaxPath softmax_path(Isa isa, int64_t b);

// Steps 1-4 of ref_nonlinear.int_softmax for rows [r0, r1): codes x [rows][d], block exponents ex
// [rows][nb] (with 16 readable entries after the last row: the AVX-512 path gathers them),
// probabilities y [rows][d], by kernel `path` (softmax_path). Row r reads mask row
// mr.row_of[r] (or row 0). Never throws.
void softmax_rows(const Blocking& bl, const int8_t* x, const int16_t* ex, const MaskRows& mr,
                  SoftmaxPath path, uint8_t* y, int64_t r0, int64_t r1);

// The AVX2 kernel of softmax_rows (softmax_avx2.cc; x86 only, bl.b % 16 == 0).
void softmax_rows_avx2(const Blocking& bl, const int8_t* x, const int16_t* ex, const MaskRows& mr,
                       uint8_t* y, int64_t r0, int64_t r1);

}  // namespace nl
}  // namespace bct
