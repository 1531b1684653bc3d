// BlockQuantize, BlockRequantize.
#include "common.h"

namespace bct {

// Smoke op for the build check: Pow2Exponent(scale float) -> int32 exponents.
static void Pow2ExponentKernel(const Ort::Custom::Tensor<float>& s, Ort::Custom::Tensor<int32_t>& e) {
  const auto shape = s.Shape();
  int32_t* out = e.Allocate(shape);
  const float* in = s.Data();
  for (int64_t i = 0; i < s.NumberOfElement(); ++i) out[i] = pow2_exponent(in[i]);
}

void AddQuantOps(Ort::CustomOpDomain& domain) {
  std::unique_ptr<OrtCustomOp> op{
      Ort::Custom::CreateLiteCustomOp("Pow2Exponent", "CPUExecutionProvider", Pow2ExponentKernel)};
  domain.Add(op.get());
  KeepAlive(std::move(op));
}

}  // namespace bct
