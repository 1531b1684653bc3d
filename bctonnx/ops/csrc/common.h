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

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <mutex>
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

// A pow2 block scale code's scale, fl32(2^(code / 2^frac_bits)) correctly rounded
// (= blockformat.decode_scales; exhaustively equal over the int8 codes and frac_bits 0..4).
inline float decode_pow2_scale(int code, int frac_bits) {
  return static_cast<float>(std::exp2(static_cast<double>(code) / static_cast<double>(1 << frac_bits)));
}

// "[d0,d1,...]", for error messages.
template <class Shape>  // std::vector<int64_t> or Dims
std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// ------------------------------------------------------------------------------------------
// Attributes and constant inputs, checked where each kernel reads them: when onnxruntime creates
// the kernel, i.e. at session creation. A value outside the op's spec is refused with a message
// naming the op and the attribute (or input); create_kernel adds the node's name.

// The largest block size of any op: num_blocks cannot overflow, and the block GEMM's exact int32
// sums hold (ref_matmul.combine_span: block_size * 2^14 * 2^S <= 2^30 needs S >= 0). The
// nonlinear ops and BlockAttention allow 1..4096 (their kernels' limit).
constexpr int64_t kMaxBlockSize = 65536;

// A kernel's attributes, each read once with its spec: a range, a boolean, a fallback when it
// is absent. An attribute present with another type (e.g. a float block_size) is an error, not
// an absent one.
class Attributes {
 public:
  Attributes(const OrtKernelInfo* info, const char* op) : info_(info), op_(op) {}

  // "bctonnx.<op>: <what>"
  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("bctonnx." + op_ + ": " + what);
  }
  const OrtKernelInfo* info() const { return info_; }

  // An int attribute in [lo, hi] (checked before any narrowing), required.
  int64_t Int(const char* name, int64_t lo, int64_t hi) const {
    int64_t v = 0;
    if (!ReadInt(name, &v)) Fail(std::string("attribute '") + name + "' is required");
    return InRange(name, v, lo, hi);
  }
  // ... or `fallback` when absent.
  int64_t Int(const char* name, int64_t lo, int64_t hi, int64_t fallback) const {
    int64_t v = 0;
    return ReadInt(name, &v) ? InRange(name, v, lo, hi) : fallback;
  }
  // A boolean: exactly 0 or 1 (no other value means true), `fallback` when absent.
  bool Bool(const char* name, bool fallback) const {
    int64_t v = 0;
    if (!ReadInt(name, &v)) return fallback;
    if (v != 0 && v != 1) Fail(std::string(name) + " must be 0 or 1, got " + std::to_string(v));
    return v == 1;
  }
  // A float attribute (its range is the caller's), `fallback` when absent.
  float Float(const char* name, float fallback) const {
    float v = 0.0f;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info_, name, &v);
    if (st == nullptr) return v;
    Ort::GetApi().ReleaseStatus(st);
    if (Present(name)) Fail(std::string("attribute '") + name + "' must be a float");
    return fallback;
  }
  // A string attribute, `fallback` when absent.
  std::string String(const char* name, const std::string& fallback) const {
    size_t size = 0;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_string(info_, name, nullptr, &size);
    if (st != nullptr) {
      Ort::GetApi().ReleaseStatus(st);
      if (Present(name)) Fail(std::string("attribute '") + name + "' must be a string");
      return fallback;
    }
    std::string v(size, '\0');
    Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttribute_string(info_, name, v.data(), &size));
    v.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    return v;
  }

 private:
  int64_t InRange(const char* name, int64_t v, int64_t lo, int64_t hi) const {
    if (v < lo || v > hi)
      Fail(std::string(name) + " must be in " + std::to_string(lo) + ".." + std::to_string(hi) +
           ", got " + std::to_string(v));
    return v;
  }
  // true: *v holds the attribute; false: absent; an error when present with another type.
  bool ReadInt(const char* name, int64_t* v) const {
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info_, name, v);
    if (st == nullptr) return true;
    Ort::GetApi().ReleaseStatus(st);
    if (Present(name)) Fail(std::string("attribute '") + name + "' must be an int");
    return false;
  }
  // Whether the node has the attribute with any type the kernel API can read (the API tells a
  // missing attribute from a mistyped one only in its message text).
  bool Present(const char* name) const {
    const OrtApi& api = Ort::GetApi();
    size_t size = 0;
    int64_t i = 0;
    float f = 0.0f;
    OrtStatus* probes[] = {
        api.KernelInfoGetAttribute_int64(info_, name, &i),
        api.KernelInfoGetAttribute_float(info_, name, &f),
        api.KernelInfoGetAttribute_string(info_, name, nullptr, &size),
        api.KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size),
        api.KernelInfoGetAttributeArray_float(info_, name, nullptr, &size),
    };
    bool present = false;
    for (OrtStatus* st : probes) {
      present |= st == nullptr;
      if (st != nullptr) api.ReleaseStatus(st);
    }
    return present;
  }

  const OrtKernelInfo* info_;
  std::string op_;
};

// Whether the node wires its optional input / output `index` (present, with a name).
inline bool has_input(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo ki(info);
  return index < ki.GetInputCount() && !ki.GetInputName(index).empty();
}
inline bool has_output(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo ki(info);
  return index < ki.GetOutputCount() && !ki.GetOutputName(index).empty();
}

// Input `index` of a kernel being created when it is a constant initializer of the session (its
// value fixed for every run), else nullptr (absent, or computed at run time).
inline const OrtValue* constant_input(const OrtKernelInfo* info, size_t index) {
  if (!has_input(info, index)) return nullptr;
  int is_constant = 0;
  const OrtValue* v = nullptr;
  OrtStatus* st = Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_constant, &v);
  if (st != nullptr) {
    Ort::GetApi().ReleaseStatus(st);
    return nullptr;
  }
  return is_constant ? v : nullptr;
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

// Tasks [0, n) over ORT's intra-op pool (inline when n is 1); `f(i)` may throw. Returns the
// first task's error message ("" when none): every task still runs, the caller reports it.
template <class F>
inline std::string run_tasks(const Ort::KernelContext& ctx, size_t n, F&& f) {
  struct Job {
    F* f;
    std::string error;
    std::mutex mu;
  } job{&f, {}, {}};
  auto task = [](void* p, size_t i) {
    auto* j = static_cast<Job*>(p);
    try {
      (*j->f)(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(j->mu);
      if (j->error.empty()) j->error = e.what();
    }
  };
  if (n == 1)
    task(&job, 0);
  else if (n > 1)
    ctx.ParallelFor(task, n, 0, &job);
  return job.error;
}

// The instruction set of a kernel created now (platform.h: the CPU's best, capped by
// BCTONNX_ISA), as an int: 0 scalar, 1 avx2, 2 avx512 (VNNI), 3 amx.
int BestIsa();
constexpr int kIsaAvx512 = 2;

// BlockQuantize's rule (ref_quant.py) on `rows` rows of `d` floats, blocks of `b` along each
// row: int8 codes and float32 pow2 scales [rows, ceil(d / b)]. `isa` from BestIsa(). Throws
// std::runtime_error ("bctonnx.BlockQuantize: ...") on NaN / infinity or a scale beyond 2^127.
void QuantizeRowsPow2(int isa, const float* x, int64_t rows, int64_t d, int64_t b, int bits,
                      int8_t* q, float* scales);

// ------------------------------------------------------------------------------------------
// Kernel arguments, read through the C API with no objects of our own per call (onnxruntime's
// lite custom-op wrapper built a heap object and a shape vector per argument per call: about a
// microsecond of every small op's time).

constexpr size_t kMaxRank = 8;

// A tensor's shape, on the stack (rank <= kMaxRank).
struct Dims {
  std::array<int64_t, kMaxRank> d{};
  size_t n = 0;
  size_t size() const { return n; }
  bool empty() const { return n == 0; }
  int64_t operator[](size_t i) const { return d[i]; }
  int64_t& operator[](size_t i) { return d[i]; }
  int64_t back() const { return d[n - 1]; }
  int64_t& back() { return d[n - 1]; }
  const int64_t* data() const { return d.data(); }
  int64_t count() const {
    int64_t c = 1;
    for (size_t i = 0; i < n; ++i) c *= d[i];
    return c;
  }
  bool operator==(const Dims& o) const { return n == o.n && std::equal(d.begin(), d.begin() + n, o.d.begin()); }
  bool operator!=(const Dims& o) const { return !(*this == o); }
};

// Rows (the product of the leading dims) and the last-axis length of a rank >= 1 tensor; a
// scalar is refused with "<op>: input must have rank >= 1 (blocks run along the last axis)".
inline void rows_and_depth(const std::string& op, const Dims& shape, int64_t* rows, int64_t* depth) {
  if (shape.empty())
    throw std::runtime_error(op + ": input must have rank >= 1 (blocks run along the last axis), "
                             "got a scalar");
  *rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) *rows *= shape[i];
  *depth = shape.back();
}

// The last axis cut into blocks: `shape` with its last dimension ceil(D / block_size).
inline Dims blocked_shape(Dims shape, int64_t block_size) {
  shape.back() = num_blocks(shape.back(), block_size);
  return shape;
}

// One kernel call's inputs and outputs.
class KernelArgs {
 public:
  explicit KernelArgs(OrtKernelContext* ctx) : ctx_(ctx) {}
  // Input i (nullptr: an absent optional input).
  const OrtValue* input(size_t i) const {
    const OrtValue* v = nullptr;
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetInput(ctx_, i, &v));
    return v;
  }
  static Dims shape(const OrtValue* v) {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* info = nullptr;
    Ort::ThrowOnError(api.GetTensorTypeAndShape(v, &info));
    Dims s;
    OrtStatus* st = api.GetDimensionsCount(info, &s.n);
    if (st == nullptr && s.n > kMaxRank) {
      api.ReleaseTensorTypeAndShapeInfo(info);
      throw std::runtime_error("bctonnx: tensors of rank > " + std::to_string(kMaxRank) +
                               " are not supported");
    }
    if (st == nullptr) st = api.GetDimensions(info, s.d.data(), s.n);
    api.ReleaseTensorTypeAndShapeInfo(info);
    Ort::ThrowOnError(st);
    return s;
  }
  template <class T>
  static const T* data(const OrtValue* v) {
    void* p = nullptr;
    Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(v), &p));
    return static_cast<const T*>(p);
  }
  // Output i with `shape`, allocated by onnxruntime.
  template <class T>
  T* output(size_t i, const Dims& shape) const {
    OrtValue* v = nullptr;
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetOutput(ctx_, i, shape.data(), shape.n, &v));
    void* p = nullptr;
    Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(v, &p));
    return static_cast<T*>(p);
  }

 private:
  OrtKernelContext* ctx_;
};

// The checks of the ops with a scalar y_multiplier input and the optional quantized outputs
// (y_q, y_scale): a constant multiplier must hold one value; y_q needs out_block_size >= 1 and
// comes with y_scale.
inline void check_one_value_if_constant(const Attributes& attrs, size_t index, const char* name) {
  const OrtValue* v = constant_input(attrs.info(), index);
  if (v == nullptr) return;
  const Dims shape = KernelArgs::shape(v);
  if (shape.count() != 1) attrs.Fail(std::string(name) + " must hold one value, got " + shape_str(shape));
}
inline void check_quantized_outputs(const Attributes& attrs, size_t y_q, size_t y_scale,
                                    int64_t out_block_size) {
  if (has_output(attrs.info(), y_q) && out_block_size < 1)
    attrs.Fail("the y_q output needs out_block_size >= 1");
  if (has_output(attrs.info(), y_q) != has_output(attrs.info(), y_scale))
    attrs.Fail("the y_q and y_scale outputs go together");
}

// "<what> (node '<name>')": onnxruntime's message for a kernel it could not create names
// neither the node nor its op; ours name the op (and the attribute), this adds the node.
inline std::string with_node_name(const OrtKernelInfo* info, const std::string& what) {
  try {
    const std::string name = Ort::ConstKernelInfo(info).GetNodeName();
    return what + (name.empty() ? " (a node without a name)" : " (node '" + name + "')");
  } catch (const std::exception&) {
    return what;
  }
}

// An Ort::CustomOpBase's CreateKernelV2: the kernel, or its constructor's error as a status
// naming the node (an onnxruntime error keeps its code; any other is an invalid argument).
template <class K>
OrtStatusPtr create_kernel(const OrtApi& api, const OrtKernelInfo* info, void** kernel) {
  try {
    *kernel = new K(api, info);
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), with_node_name(info, e.what()).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, with_node_name(info, e.what()).c_str());
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

// The custom op of a kernel class K that declares itself:
//   static constexpr const char* kName;
//   static constexpr std::array<ONNXTensorElementDataType, N> kInputs, kOutputs;
//   static constexpr size_t kRequiredInputs;  // inputs from this index on are optional
//   K(const OrtApi&, const OrtKernelInfo*);   // throws on bad attributes
//   void Compute(OrtKernelContext*);          // throws on bad inputs
// One static instance per op lives for the process (sessions keep raw pointers to it).
template <class K>
struct StatusKernel : K {
  using K::K;
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return status_of([&] { this->Compute(ctx); });
  }
};

template <class K>
struct KernelOp : Ort::CustomOpBase<KernelOp<K>, StatusKernel<K>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<StatusKernel<K>>(api, info, kernel);
  }
  // onnxruntime calls these through the base's function pointers
  const char* GetName() const { return K::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return K::kInputs.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::kInputs[i]; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < K::kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return K::kOutputs.size(); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return K::kOutputs[i]; }
};

// Registration hooks: each source file adds its ops to the one domain.
void AddQuantOps(Ort::CustomOpDomain& domain);
void AddNonlinearOps(Ort::CustomOpDomain& domain);
void AddBlockMatMulOp(Ort::CustomOpDomain& domain);
void AddBlockBatchMatMulOp(Ort::CustomOpDomain& domain);
void AddAttentionOps(Ort::CustomOpDomain& domain);
void AddBlockAttentionOp(Ort::CustomOpDomain& domain);
void AddTokenOps(Ort::CustomOpDomain& domain);

}  // namespace bct
