// Library entry point: RegisterCustomOps adds every bctonnx op to the "bctonnx" domain.
#include <memory>
#include <mutex>

#include "common.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    static std::mutex mu;
    static std::unique_ptr<Ort::CustomOpDomain> domain;
    std::lock_guard<std::mutex> lock(mu);
    if (!domain) {
      domain = std::make_unique<Ort::CustomOpDomain>(bct::kDomain);
      bct::AddQuantOps(*domain);
      bct::AddNonlinearOps(*domain);
      bct::AddBlockMatMulOp(*domain);
      bct::AddBlockBatchMatMulOp(*domain);
      bct::AddAttentionOps(*domain);
      bct::AddBlockAttentionOp(*domain);
      bct::AddTokenOps(*domain);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
