// N:M-sparse weights (bctonnx/blockformat.py, "N:M sparsity"): expanded to dense codes once,
// when a kernel is created. Self-contained: it needs only the values the kernel has read
// from its constant inputs (ConstInts), so it can be called from any weight-loading code.
#pragma once

#include <cstdint>
#include <vector>

namespace bct {

// Dense weight codes [K, N] (row-major, int32 holding int8 / int4 values) from N:M storage,
// exactly as blockformat.nm_expand:
//   kept         [K * n / m, N]  the kept codes of every group of m along K, n per group, in
//                                position order
//   pattern      [K / m, N]      per group, the index of its kept positions among the
//                                C(m, n) position sets in lexicographic order
//   zero_points  [K / block, N]  or empty: what a pruned position holds (its block's zero
//                                point; 0 when empty)
// Throws std::runtime_error (the message starts "bctonnx.BlockMatMul: N:M ...") on shapes or
// pattern indices that do not fit. *dense_shape receives {K, N}.
std::vector<int32_t> ExpandNMCodes(const std::vector<int32_t>& kept,
                                   const std::vector<int64_t>& kept_shape,
                                   const std::vector<int32_t>& pattern,
                                   const std::vector<int64_t>& pattern_shape, int64_t n, int64_t m,
                                   const std::vector<int32_t>& zero_points, int64_t block,
                                   std::vector<int64_t>* dense_shape);

}  // namespace bct
