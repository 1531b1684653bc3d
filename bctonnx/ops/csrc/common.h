// bctonnx op library: shared helpers for every kernel.
//
// Block convention (the same as bctonnx/blockformat.py with scale_kind="pow2", frac_bits=0):
// a tensor is cut along its LAST axis into blocks of `block_size` elements (the last block may
// be partial); its scale tensor has the same shape with the last axis ceil(D / block_size).
// Every scale is an exact power of two stored as float32 (so standard DequantizeLinear with
// block_size reads it unchanged); kernels work on the integer exponent only.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace bct {

constexpr const char* kDomain = "bctonnx";
constexpr int kDomainVersion = 1;

// Exponent e of a float32 power of two s = 2^e (normal or subnormal). Throws if s is not an
// exact positive power of two: the integer kernels never guess a scale.
inline int pow2_exponent(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t exp_field = (bits >> 23) & 0xFFu;
  const uint32_t mant = bits & 0x7FFFFFu;
  if ((bits >> 31) == 0 && exp_field != 0 && exp_field != 0xFFu && mant == 0)
    return static_cast<int>(exp_field) - 127;
  if ((bits >> 31) == 0 && exp_field == 0 && mant != 0 && (mant & (mant - 1)) == 0) {
    int e = -149;  // subnormal: 2^-149 * mant
    while (mant >> (e + 149) != 1u) ++e;
    return e;
  }
  throw std::runtime_error("bctonnx: scale " + std::to_string(s) +
                           " is not a power of two (integer ops need pow2 block scales)");
}

// 2^e as float32 (e in [-149, 127]).
inline float pow2_float(int e) {
  if (e >= -126) {
    uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  uint32_t bits = 1u << (e + 149);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// round_half_even(v / 2^n) for n >= 0, exact integer arithmetic (n up to 62).
inline int64_t shift_round_even(int64_t v, int n) {
  // a left shift of a negative value is undefined before C++20: shift the two's complement bits
  if (n <= 0) return static_cast<int64_t>(static_cast<uint64_t>(v) << (-n));
  if (n > 62) return 0;
  const int64_t q = v >> n;  // floor
  const int64_t r = v & ((int64_t{1} << n) - 1);  // v - q * 2^n, in [0, 2^n)
  const int64_t half = int64_t{1} << (n - 1);
  if (r > half || (r == half && (q & 1))) return q + 1;
  return q;
}

inline int64_t num_blocks(int64_t d, int64_t block_size) { return (d + block_size - 1) / block_size; }

// "[d0,d1,...]", for error messages.
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// An int64 attribute of a kernel: its value, else *fallback, else an error naming the op.
inline int64_t int_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                             const int64_t* fallback) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status == nullptr) return value;
  Ort::GetApi().ReleaseStatus(status);
  if (fallback != nullptr) return *fallback;
  throw std::runtime_error(std::string("bctonnx.") + op + ": attribute '" + name + "' is required");
}

// Rows [0, rows) in up to 16 chunks of >= ~16K units of work over ORT's intra-op pool (inline
// when there is one chunk). `f(r0, r1)` must not throw (catch inside and report after).
template <class F>
inline void parallel_rows(OrtKernelContext* ctx, int64_t rows, int64_t work_per_row, F&& f) {
  const int64_t work = rows * std::max<int64_t>(1, work_per_row);
  const int64_t want = std::clamp<int64_t>(work / 16384, 1, std::min<int64_t>(rows, 16));
  const int64_t per_chunk = (rows + want - 1) / want;
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  if (chunks <= 1) {
    f(int64_t{0}, rows);
    return;
  }
  struct Job {
    F* f;
    int64_t rows, per_chunk;
  } job{&f, rows, per_chunk};
  Ort::KernelContext(ctx).ParallelFor(
      [](void* p, size_t i) {
        auto* j = static_cast<Job*>(p);
        const int64_t r0 = static_cast<int64_t>(i) * j->per_chunk;
        (*j->f)(r0, std::min(j->rows, r0 + j->per_chunk));
      },
      static_cast<size_t>(chunks), 0, &job);
}

// An Ort::CustomOpBase's CreateKernelV2: the kernel, or its constructor's error as a status
// (an onnxruntime error keeps its code; any other is an invalid argument).
template <class K>
OrtStatusPtr create_kernel(const OrtApi& api, const OrtKernelInfo* info, void** kernel) {
  try {
    *kernel = new K(api, info);
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
  return nullptr;
}

// The ComputeV2 of an Ort::CustomOpBase kernel: runs `compute`, exceptions become the status.
template <class F>
OrtStatusPtr status_of(F&& compute) {
  try {
    compute();
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
  return nullptr;
}

// BlockQuantize's rule (ref_quant.py) on `rows` rows of `d` floats, blocks of `b` along each
// row: int8 codes and float32 pow2 scales [rows, ceil(d / b)]. `isa` from BestIsa() (the best
// instruction set, capped by BCTONNX_ISA). Implemented with BlockMatMul's activation quantizer
// (matmul_ops.cc); throws std::runtime_error on NaN / infinity or a scale beyond 2^127.
int BestIsa();
constexpr int kIsaAvx512 = 2;  // BestIsa() levels: 0 scalar, 1 avx2, 2 avx512 (VNNI), 3 amx
void QuantizeRowsPow2(int isa, const float* x, int64_t rows, int64_t d, int64_t b, int bits,
                      int8_t* q, float* scales);

// Registration hooks: each source file adds its ops to the one domain.
void AddQuantOps(Ort::CustomOpDomain& domain);
void AddNonlinearOps(Ort::CustomOpDomain& domain);
void AddMatMulOps(Ort::CustomOpDomain& domain);
void AddAttentionOps(Ort::CustomOpDomain& domain);

// Keeps custom-op objects alive for the process lifetime (sessions hold raw pointers).
void KeepAlive(OrtCustomOp* op);

}  // namespace bct
