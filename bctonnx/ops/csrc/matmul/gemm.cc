// Block GEMM dispatch: the kernel of each instruction set and its grain (gemm.h).
#include "gemm.h"

namespace bct {
namespace gemm {

int64_t RowTile(Isa isa) { return isa == kAmx ? 16 : kRowTile; }

int64_t PanelTile(Isa isa) {
  switch (isa) {
    case kAmx: return 4;
    case kAvx512: return 3;
    default: return 1;
  }
}

void Gemm(Isa isa, const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  switch (isa) {
    case kAmx: return GemmAmx(op, m0, m1, p0, p1);
    case kAvx512: return GemmAvx512(op, m0, m1, p0, p1);
    case kAvx2: return GemmAvx2(op, m0, m1, p0, p1);
    default: return GemmScalar(op, m0, m1, p0, p1);
  }
}

}  // namespace gemm
}  // namespace bct
