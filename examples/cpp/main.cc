// bct_run: run a bctonnx-compressed BERT-family model with the ONNX Runtime C++ API.
//
//   bct_run MODEL.onnx LIBBCTONNX_OPS.so TOKEN_ID [TOKEN_ID ...]
//
// Registers bctonnx's op library on the session options (needed by models compressed with
// --mode integer, harmless for the portable QDQ form), feeds one sequence of token ids
// (attention_mask all ones, token_type_ids zeros, for the inputs the model has) and prints
// the first output's name and shape and its first 16 values:
//
//   output: last_hidden_state [1, 5, 384]
//   values: 0.1234 -0.5678 ...
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx LIBBCTONNX_OPS.so TOKEN_ID [TOKEN_ID ...]\n";
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "bct_run");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    // The library's RegisterCustomOps adds the "bctonnx" op domain (IntGelu, IntSoftmax, ...).
    options.RegisterCustomOpsLibrary(argv[2]);
    Ort::Session session(env, argv[1], options);

    std::vector<int64_t> ids;
    for (int i = 3; i < argc; ++i) ids.push_back(std::strtoll(argv[i], nullptr, 10));
    const std::vector<int64_t> shape{1, static_cast<int64_t>(ids.size())};
    std::vector<int64_t> mask(ids.size(), 1), types(ids.size(), 0);

    Ort::AllocatorWithDefaultOptions allocator;
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<std::string> input_names;
    std::vector<Ort::Value> inputs;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      std::string name = session.GetInputNameAllocated(i, allocator).get();
      std::vector<int64_t>* data = name == "attention_mask"   ? &mask
                                   : name == "token_type_ids" ? &types
                                                              : &ids;
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, data->data(), data->size(),
                                                         shape.data(), shape.size()));
      input_names.push_back(name);
    }
    std::string output_name = session.GetOutputNameAllocated(0, allocator).get();

    std::vector<const char*> in_ptrs, out_ptrs{output_name.c_str()};
    for (const auto& n : input_names) in_ptrs.push_back(n.c_str());
    auto outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), inputs.data(),
                               inputs.size(), out_ptrs.data(), out_ptrs.size());

    auto info = outputs[0].GetTensorTypeAndShapeInfo();
    std::vector<int64_t> out_shape = info.GetShape();
    std::cout << "output: " << output_name << " [";
    for (size_t i = 0; i < out_shape.size(); ++i) std::cout << (i ? ", " : "") << out_shape[i];
    std::cout << "]\nvalues:";
    const float* values = outputs[0].GetTensorData<float>();
    size_t n = std::min<size_t>(16, info.GetElementCount());
    std::cout.precision(9);
    for (size_t i = 0; i < n; ++i) std::cout << " " << values[i];
    std::cout << "\n";
  } catch (const Ort::Exception& e) {
    std::cerr << "bct_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
