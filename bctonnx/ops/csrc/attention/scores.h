// BlockAttention's scores of one head, fused (AVX-512 VNNI): Q.K^T by the block GEMM's
// arithmetic, the multiplier and key bias, dropped keys zeroed, and BlockQuantize of every
// score block, straight from the token-major Q and K codes into the int8 score codes and
// their exponents that IntSoftmax reads. The same result, bit for bit, as block_attention.cc's
// general path (pack K as GEMM weights, pack Q as activations, gemm::Gemm, QuantizeRow per
// row), which stays for the shapes this one does not take (FastScoresApply).
//
// Arithmetic per query row r, key c (ref_matmul.py with one segment per block, both scales
// pow2): per block b of d, acc = sum of q * k over the block in int32 (vpdpbusd on k + 128,
// then + corr = -128 * sum of the block's q), u = fl(fl(acc) * sk[c, b]), y = fma(u, 2^Eq[r, b],
// y) from y = 0 in block order; then y * multiplier, + key bias, 0 for a dropped key; then per
// block of 32 keys: e = BlockExponent(max |y|, 127), codes = clamp(rne(y / 2^e)).
#pragma once

#include <cstdint>

#include "../platform.h"

namespace bct {
namespace attn {

struct ScoresArgs {
  const int8_t* q = nullptr;  // row r of the head's Q codes at q + r * q_row
  int64_t q_row = 0;
  const float* qs = nullptr;  // its block scales at qs + r * qs_row
  int64_t qs_row = 0;
  const int8_t* k = nullptr;  // the same for K
  int64_t k_row = 0;
  const float* ks = nullptr;
  int64_t ks_row = 0;
  int64_t s = 0, d = 0, block = 0;  // tokens, head width, block size along d
  const float* ymul = nullptr;      // scalar multiplier or null
  const float* bias = nullptr;      // key bias: bias_s (1 or s) values, or null
  int64_t bias_s = 0;
  const uint8_t* keep = nullptr;  // [s] kept keys, or null (all kept)
  int8_t* codes = nullptr;        // [s][s] score codes
  int16_t* ex = nullptr;          // [s][ceil(s / 32)] their exponents
};

// Whether ScoresAvx512 takes this head: an AVX-512 VNNI kernel, score blocks of 32, blocks of
// d a multiple of 4 that divide d, d <= 256.
bool FastScoresApply(Isa isa, int64_t d, int64_t block, int64_t score_block);

// Throws std::runtime_error with the messages of the general path (non-pow2 scales, NaN or
// infinite scores, exponents beyond 2^127).
void ScoresAvx512(const ScoresArgs& a);

}  // namespace attn
}  // namespace bct
