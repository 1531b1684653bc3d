// IntGelu, IntSoftmax, IntLayerNorm (placeholder until the kernels land).
#include "common.h"

namespace bct {
void AddNonlinearOps(Ort::CustomOpDomain& /*domain*/) {}
}  // namespace bct
