// TokenCodes and NearestSlot (domain "bctonnx", version 1): token dropping's per-token int8
// codes and each token's most similar kept slot, in one node each instead of two chains of
// standard ops (passes/token_drop.py TokenOpsFromChains). The specification is
// bctonnx/ops/ref_tokens.py; every float step is the chain's single correctly rounded IEEE
// operation in the chain's order, so the results are bit-identical to it.
#include <cmath>
#include <string>
#include <vector>

#include "../common.h"
#include "../platform.h"
#include "../simd.h"

// a product must not be contracted into a fused multiply-add with anything after it
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace bct {
namespace {

constexpr int64_t kMaxHidden = 1040;  // 127^2 x 1040 < 2^24: norms and dots exact in float32
constexpr float kTiny = 1e-30f;

#define BCT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// ------------------------------------------------------------------------------------------
// TokenCodes (ref: token_codes)

// One row of h floats: codes, and the norm (0 and codes 0 for a row with a NaN / infinity).
float CodesRowScalar(const float* x, int64_t h, int8_t* codes) {
  float peak = 0.0f;
  bool finite = true;
  for (int64_t j = 0; j < h; ++j) {
    finite &= std::isfinite(x[j]);
    peak = std::max(peak, std::fabs(x[j]));
  }
  if (!finite) {
    std::fill(codes, codes + h, int8_t{0});
    return 0.0f;
  }
  const float step = std::max(peak, kTiny) / 127.0f;
  int32_t sum = 0;
  for (int64_t j = 0; j < h; ++j) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(x[j] / step));
    codes[j] = static_cast<int8_t>(q);
    sum += q * q;
  }
  return static_cast<float>(sum);
}

BCT_AVX512 float CodesRowAvx512(const float* x, int64_t h, int8_t* codes) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 peak = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t j = 0; j < h; j += 16) {
    const __mmask16 m = h - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (h - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    bad |= _mm512_fpclass_ps_mask(v, 0x01 | 0x08 | 0x10 | 0x80);  // NaN, +-infinity
    peak = _mm512_max_ps(peak, _mm512_andnot_ps(sign, v));
  }
  if (bad) {
    std::fill(codes, codes + h, int8_t{0});
    return 0.0f;
  }
  const float step = std::max(_mm512_reduce_max_ps(peak), kTiny) / 127.0f;
  const __m512 vstep = _mm512_set1_ps(step);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t j = 0; j < h; j += 16) {
    const __mmask16 m = h - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (h - j)) - 1);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + j), vstep);
    const __m512i i = _mm512_cvtps_epi32(
        _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm512_mask_cvtepi32_storeu_epi8(codes + j, m, i);
    sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(i, i));  // masked lanes: 0 / step = 0
  }
  return static_cast<float>(_mm512_reduce_add_epi32(sum));
}

struct TokenCodesKernel {
  static constexpr const char* kName = "TokenCodes";
  TokenCodesKernel(const OrtApi&, const OrtKernelInfo* info) {
    offset_ = has_output(info, 2);
    isa_ = ChooseIsa();
  }

  void Compute(OrtKernelContext* raw) {
    KernelArgs args(raw);
    const OrtValue* in = args.input(0);
    const Dims shape = KernelArgs::shape(in);
    if (shape.size() != 3 || shape[2] < 1 || shape[2] > kMaxHidden)
      throw std::runtime_error("bctonnx.TokenCodes: hidden must be [B, S, H] with H in 1.." +
                               std::to_string(kMaxHidden) + ", got " + shape_str(shape));
    const int64_t rows = shape[0] * shape[1], h = shape[2];
    Dims norm_shape = shape;
    norm_shape.n = 2;
    const float* x = KernelArgs::data<float>(in);
    int8_t* codes = args.output<int8_t>(0, shape);
    float* norm = args.output<float>(1, norm_shape);
    uint8_t* offset = offset_ ? args.output<uint8_t>(2, shape) : nullptr;
    const bool wide = isa_ >= kAvx512;
    parallel_rows(raw, rows, h * 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int8_t* c = codes + r * h;
        norm[r] = wide ? CodesRowAvx512(x + r * h, h, c) : CodesRowScalar(x + r * h, h, c);
        if (offset != nullptr)
          for (int64_t j = 0; j < h; ++j) offset[r * h + j] = static_cast<uint8_t>(c[j] ^ 0x80);
      }
    });
  }

  bool offset_ = false;
  Isa isa_ = kScalar;
};

struct TokenCodesOp : Ort::CustomOpBase<TokenCodesOp, StatusKernel<TokenCodesKernel>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<StatusKernel<TokenCodesKernel>>(api, info, kernel);
  }
  const char* GetName() const { return "TokenCodes"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
           : i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// ------------------------------------------------------------------------------------------
// NearestSlot (ref: nearest_slot)

struct Slots {  // one batch row's kept tokens
  const int8_t* codes;  // [S, H] of the batch row
  const int64_t* index;  // [T]
  const bool* valid;  // [T]
  const float* norm;  // [S]
  const int32_t* sums;  // [T]: the sum of each kept token's codes (AVX-512: u8 offset)
  int64_t t, h;
};

// The chain's value of slot t for a token of norm `n` and dot product `dot`, then ArgMax.
inline float Cosine(int32_t dot, float n, float kept) {
  return static_cast<float>(dot) / std::sqrt(std::max(n * kept, 1.0f));
}

int64_t NearestScalar(const Slots& s, const int8_t* row, float n) {
  int64_t best_t = 0;
  float best = 0.0f;
  for (int64_t t = 0; t < s.t; ++t) {
    float v = -2.0f;
    if (s.valid[t]) {
      const int64_t k = s.index[t];
      const int8_t* kept = s.codes + k * s.h;
      int32_t dot = 0;
      for (int64_t j = 0; j < s.h; ++j) dot += int32_t{row[j]} * int32_t{kept[j]};
      v = Cosine(dot, n, s.norm[k]);
    }
    if (t == 0 || v > best) best = v, best_t = t;
  }
  return best_t;
}

// u8 (code + 128) x int8 with VNNI: dot = sum u * c - 128 * sum c.
BCT_AVX512 int64_t NearestAvx512(const Slots& s, const int8_t* row, float n, uint8_t* u) {
  const int64_t chunks = (s.h + 63) / 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t left = s.h - c * 64;
    const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(m, row + c * 64);
    // beyond H: 0 (times the kept codes' zeros there)
    _mm512_store_si512(u + c * 64, _mm512_maskz_mov_epi8(m, _mm512_xor_si512(v, flip)));
  }
  int64_t best_t = 0;
  float best = 0.0f;
  for (int64_t t = 0; t < s.t; ++t) {
    float v = -2.0f;
    if (s.valid[t]) {
      const int64_t k = s.index[t];
      const int8_t* kept = s.codes + k * s.h;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t left = s.h - c * 64;
        const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
        acc = _mm512_dpbusd_epi32(acc, _mm512_load_si512(u + c * 64),
                                  _mm512_maskz_loadu_epi8(m, kept + c * 64));
      }
      const int32_t dot = _mm512_reduce_add_epi32(acc) - 128 * s.sums[t];
      v = Cosine(dot, n, s.norm[k]);
    }
    if (t == 0 || v > best) best = v, best_t = t;
  }
  return best_t;
}

[[noreturn]] void FailNearest(const std::string& what) {
  throw std::runtime_error("bctonnx.NearestSlot: " + what);
}

struct NearestSlotKernel {
  static constexpr const char* kName = "NearestSlot";
  static constexpr std::array<ONNXTensorElementDataType, 4> kInputs = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL};
  static constexpr std::array<ONNXTensorElementDataType, 1> kOutputs = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
  static constexpr size_t kRequiredInputs = 4;

  NearestSlotKernel(const OrtApi&, const OrtKernelInfo*) { isa_ = ChooseIsa(); }

  void Compute(OrtKernelContext* raw) {
    KernelArgs args(raw);
    const OrtValue *codes_v = args.input(0), *norm_v = args.input(1), *index_v = args.input(2),
                   *valid_v = args.input(3);
    const Dims cs = KernelArgs::shape(codes_v), ns = KernelArgs::shape(norm_v),
               is = KernelArgs::shape(index_v), vs = KernelArgs::shape(valid_v);
    if (cs.size() != 3 || cs[2] < 1 || cs[2] > kMaxHidden)
      FailNearest("codes must be [B, S, H] with H in 1.." + std::to_string(kMaxHidden) +
                  ", got " + shape_str(cs));
    const int64_t b = cs[0], seq = cs[1], h = cs[2];
    if (ns.size() != 2 || ns[0] != b || ns[1] != seq)
      FailNearest("norm must be [B, S] = " + shape_str(std::vector<int64_t>{b, seq}) + ", got " +
                  shape_str(ns));
    if (is.size() != 2 || is[0] != b || vs != is)
      FailNearest("index and valid must both be [B, T] with B = " + std::to_string(b) +
                  ", got " + shape_str(is) + " and " + shape_str(vs));
    const int64_t t = is[1];
    Dims out_shape = ns;
    int64_t* out = args.output<int64_t>(0, out_shape);
    if (b * seq == 0) return;
    if (t == 0) FailNearest("no slots (T = 0) for " + std::to_string(seq) + " tokens");
    const int8_t* codes = KernelArgs::data<int8_t>(codes_v);
    const float* norm = KernelArgs::data<float>(norm_v);
    const int64_t* index = KernelArgs::data<int64_t>(index_v);
    const bool* valid = KernelArgs::data<bool>(valid_v);
    for (int64_t i = 0; i < b * t; ++i)
      if (index[i] < 0 || index[i] >= seq)
        FailNearest("index " + std::to_string(index[i]) + " is out of range 0.." +
                    std::to_string(seq - 1));
    std::vector<int32_t> sums(static_cast<size_t>(b * t));
    for (int64_t i = 0; i < b * t; ++i) {
      const int8_t* kept = codes + ((i / t) * seq + index[i]) * h;
      int32_t sum = 0;
      for (int64_t j = 0; j < h; ++j) sum += kept[j];
      sums[static_cast<size_t>(i)] = sum;
    }
    const bool wide = isa_ >= kAvx512;
    parallel_rows(raw, b * seq, t * h, [&](int64_t r0, int64_t r1) {
      alignas(64) uint8_t u[(kMaxHidden + 63) / 64 * 64];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row_b = r / seq;
        const Slots s{codes + row_b * seq * h, index + row_b * t, valid + row_b * t,
                      norm + row_b * seq, sums.data() + row_b * t, t, h};
        const int8_t* row = codes + r * h;
        out[r] = wide ? NearestAvx512(s, row, norm[r], u) : NearestScalar(s, row, norm[r]);
      }
    });
  }

  Isa isa_ = kScalar;
};

}  // namespace

void AddTokenOps(Ort::CustomOpDomain& domain) {
  static TokenCodesOp codes;
  static KernelOp<NearestSlotKernel> nearest;
  domain.Add(&codes);
  domain.Add(&nearest);
}

}  // namespace bct
