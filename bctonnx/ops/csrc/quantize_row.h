// Activation quantization shared by the kernels: BlockQuantize's rule (ref_quant.py, "Scale
// choice" and "Codes"), bit for bit, on one row.
#pragma once

#include <cstdint>

#include "platform.h"

namespace bct {

// Codes of one row of `d` floats in blocks of `b` along it: q[i] = clamp(rne(x[i] / 2^e),
// -qmax, qmax) with qmax = 2^(bits-1) - 1 and e per block the smallest in [-128, 127] with
// fl32(max|x| / qmax) <= 2^e; exps[blk] = e. Throws std::runtime_error("input contains NaN or
// infinity" / "values too large ...") without an op prefix (the caller's error adds its name).
void QuantizeRow(Isa isa, const float* x, int64_t d, int64_t b, int bits, int8_t* q, int* exps);

}  // namespace bct
