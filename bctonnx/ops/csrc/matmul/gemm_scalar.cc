// Block GEMM, portable C++ (BCTONNX_ISA=scalar, and CPUs without AVX2): ref_matmul.py's
// arithmetic in its plainest form, on the interleaved activation layout.
#include <algorithm>

#include "gemm.h"

namespace bct {
namespace gemm {
namespace {

// Keeps a rounded product from being contracted into a fused multiply-add with the addition
// after it (-ffp-contract=fast is GCC's default), which would change the float32 result.
inline float Rounded(float v) {
  asm("" : "+x"(v));
  return v;
}

}  // namespace

void GemmScalar(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedWeights& w = *op.w;
  const PackedActs& x = op.x;
  for (int64_t m = m0; m < std::min(m1, op.rows); ++m) {
    const int64_t t = m / kRowTile, r = m % kRowTile;
    auto code = [&](int64_t k) -> int32_t {
      return x.interleaved ? x.a[t * x.tile_bytes + (k / 4) * 16 + r * 4 + k % 4]
                           : x.a[m * x.lda + k];
    };
    for (int64_t c = p0 * kPanel; c < std::min(w.n, p1 * kPanel); ++c) {
      float y = 0.0f;
      for (int64_t b = 0; b < w.nblk; ++b) {
        int64_t acc = 0;  // exact: |acc| <= 2^30
        for (int64_t jj = 0; jj < w.spb; ++jj) {
          const int64_t j = b * w.spb + jj;
          int64_t d = 0;
          for (int64_t kk = 0; kk < w.g; ++kk) d += code(j * w.gp + kk) * WeightAt(w, j, kk, c);
          const int32_t s = x.interleaved ? x.shift[(t * w.nseg + j) * kRowTile + r]
                                          : x.shift[m * w.nseg + j];
          acc += d * (int64_t{1} << s);
        }
        const float bscale = x.interleaved ? x.bscale[(t * w.nblk + b) * kRowTile + r]
                                           : x.bscale[m * w.nblk + b];
        const float v = Rounded(static_cast<float>(static_cast<int32_t>(acc)) *
                                w.sw[b * w.npad + c]);
        y = y + v * bscale;  // exact product
      }
      if (op.bias) y = y + op.bias[c];
      if (op.ymul) y = y * *op.ymul;
      op.y[m * op.ldy + c] = y;
    }
  }
}

}  // namespace gemm
}  // namespace bct
