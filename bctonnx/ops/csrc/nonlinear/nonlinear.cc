// The out-of-line pieces of nonlinear.h, and the registration of the three ops.
#include "nonlinear.h"

namespace bct {
namespace nl {

// (multiversioned: a definition of its own)
BCT_CLONES bool decode_pow2_exponents(const float* s, int64_t count, int16_t* e) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, s + i, sizeof bits);
    const uint32_t field = bits >> 23;  // sign must be 0
    bad |= (bits & 0x7FFFFFu) | static_cast<uint32_t>(field - 1u > 253u);
    e[i] = static_cast<int16_t>(static_cast<int32_t>(field) - 127);
  }
  return bad == 0;
}

}  // namespace nl

void AddIntGeluOp(Ort::CustomOpDomain& domain);
void AddIntSoftmaxOp(Ort::CustomOpDomain& domain);
void AddIntLayerNormOp(Ort::CustomOpDomain& domain);

void AddNonlinearOps(Ort::CustomOpDomain& domain) {
  AddIntGeluOp(domain);
  AddIntSoftmaxOp(domain);
  AddIntLayerNormOp(domain);
}

}  // namespace bct
