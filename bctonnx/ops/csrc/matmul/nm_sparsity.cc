// N:M-sparse weight codes -> dense codes (see nm_sparsity.h; the specification is
// bctonnx/blockformat.py nm_expand, and ref_matmul.block_matmul applies it first of all).
#include "nm_sparsity.h"

#include <stdexcept>
#include <string>

namespace bct {
namespace {

[[noreturn]] void NMFail(const std::string& what) {
  throw std::runtime_error("bctonnx.BlockMatMul: N:M " + what);
}

std::string Dims(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

// Every n-subset of {0..m-1} in lexicographic order (itertools.combinations' order), n per row.
std::vector<int32_t> Patterns(int64_t n, int64_t m) {
  std::vector<int32_t> rows, pick(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pick[i] = static_cast<int32_t>(i);
  while (true) {
    rows.insert(rows.end(), pick.begin(), pick.end());
    int64_t i = n - 1;
    while (i >= 0 && pick[i] == m - n + i) --i;
    if (i < 0) break;
    ++pick[i];
    for (int64_t j = i + 1; j < n; ++j) pick[j] = pick[j - 1] + 1;
  }
  return rows;
}

}  // namespace

std::vector<int32_t> ExpandNMCodes(const std::vector<int32_t>& kept,
                                   const std::vector<int64_t>& kept_shape,
                                   const std::vector<int32_t>& pattern,
                                   const std::vector<int64_t>& pattern_shape, int64_t n, int64_t m,
                                   const std::vector<int32_t>& zero_points, int64_t block,
                                   std::vector<int64_t>* dense_shape) {
  if (!(0 < n && n < m && m <= 8)) NMFail("needs 0 < nm_n < nm_m <= 8");
  if (kept_shape.size() != 2 || kept_shape[0] % n)
    NMFail("kept codes must be [K * n / m, N], got " + Dims(kept_shape));
  const int64_t groups = kept_shape[0] / n, cols = kept_shape[1], k = groups * m;
  if (pattern_shape != std::vector<int64_t>{groups, cols})
    NMFail("pattern must be " + Dims({groups, cols}) + ", got " + Dims(pattern_shape));
  if (block < 1 || block % m || k % block) NMFail("m must divide the block size, which divides K");
  if (!zero_points.empty() && zero_points.size() != static_cast<size_t>(k / block * cols))
    NMFail("zero points do not match the weight blocks");
  const std::vector<int32_t> table = Patterns(n, m);
  const int64_t count = static_cast<int64_t>(table.size()) / n;
  std::vector<int32_t> dense(static_cast<size_t>(k * cols));
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < cols; ++c)
      dense[r * cols + c] = zero_points.empty() ? 0 : zero_points[(r / block) * cols + c];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t p = pattern[g * cols + c];
      if (p < 0 || p >= count)
        NMFail("pattern index " + std::to_string(p) + " out of range (C(m, n) = " +
               std::to_string(count) + ")");
      for (int64_t j = 0; j < n; ++j)
        dense[(g * m + table[p * n + j]) * cols + c] = kept[(g * n + j) * cols + c];
    }
  *dense_shape = {k, cols};
  return dense;
}

}  // namespace bct
