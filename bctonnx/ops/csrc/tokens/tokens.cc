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

// AVX-512: the kept tokens' codes packed per batch row as [T/16][H4/4][16 slots][4 bytes]
// (zeros beyond T and H), so that one VNNI step (u8 (code + 128) x int8) adds 4 bytes of a
// token to 16 slots' dot products: dot = sum u * c - 128 * sum c.
constexpr int64_t kTokens = 8;  // tokens per block: independent accumulator chains

struct Packed {
  std::vector<int8_t> codes;  // [B][groups][h4 / 4][16][4]
  std::vector<int32_t> sums;  // [B][groups * 16]
  int64_t groups = 0, h4 = 0;
};

Packed PackKept(const int8_t* codes, const int64_t* index, int64_t b, int64_t seq, int64_t t,
                int64_t h) {
  Packed p;
  p.groups = (t + 15) / 16;
  p.h4 = (h + 3) / 4 * 4;
  const int64_t per_row = p.groups * p.h4 * 16;
  p.codes.assign(static_cast<size_t>(b * per_row), 0);
  p.sums.assign(static_cast<size_t>(b * p.groups * 16), 0);
  for (int64_t r = 0; r < b; ++r)
    for (int64_t slot = 0; slot < t; ++slot) {
      const int8_t* kept = codes + (r * seq + index[r * t + slot]) * h;
      int8_t* out = p.codes.data() + r * per_row + (slot / 16) * p.h4 * 16 + (slot % 16) * 4;
      int32_t sum = 0;
      for (int64_t j = 0; j < h; ++j) sum += kept[j];
      for (int64_t j = 0; j + 4 <= h; j += 4) std::memcpy(out + j * 16, kept + j, 4);
      for (int64_t j = h / 4 * 4; j < h; ++j) out[(j / 4) * 64 + j % 4] = kept[j];
      p.sums[static_cast<size_t>(r * p.groups * 16 + slot)] = sum;
    }
  return p;
}

// codes + 128 as uint8, zeros from h to h4.
BCT_AVX512 void OffsetRow(const int8_t* codes, int64_t h, int64_t h4, uint8_t* u) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < h4; j += 64) {
    const int64_t left = h - j, room = h4 - j;
    const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const __mmask64 w = room >= 64 ? ~__mmask64{0} : (__mmask64{1} << room) - 1;
    const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, codes + j), flip);
    _mm512_mask_storeu_epi8(u + j, w, _mm512_maskz_mov_epi8(m, v));
  }
}

// Tokens rows[0..n) (n <= kTokens) of one batch row; u: their codes + 128, [kTokens][h4].
BCT_AVX512 void NearestAvx512(const Slots& s, const Packed& p, int64_t batch_row,
                              const uint8_t* u, const float* n, int64_t count, int64_t* out) {
  const int64_t per_row = p.groups * p.h4 * 16;
  const int8_t* packed = p.codes.data() + batch_row * per_row;
  const int32_t* sums = p.sums.data() + batch_row * p.groups * 16;
  __m512 best[kTokens];
  __m512i best_t[kTokens];
  for (int64_t k = 0; k < kTokens; ++k) {
    best[k] = _mm512_set1_ps(-INFINITY);
    best_t[k] = _mm512_setzero_si512();
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int8_t* col = packed + g * p.h4 * 16;
    __m512i acc[kTokens];
    for (int64_t k = 0; k < kTokens; ++k) acc[k] = _mm512_setzero_si512();
    for (int64_t j = 0; j < p.h4; j += 4) {
      const __m512i c = _mm512_loadu_si512(col + j * 16);
      for (int64_t k = 0; k < kTokens; ++k) {
        int32_t four;
        std::memcpy(&four, u + k * p.h4 + j, 4);
        acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_set1_epi32(four), c);
      }
    }
    const int64_t left = s.t - g * 16;
    const __mmask16 in = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512i slot = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(g * 16)));
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(sums + g * 16), 7);
    // the kept tokens' norms, and whether each slot is valid
    alignas(64) float kept_norm[16] = {};
    __mmask16 valid = 0;
    for (int64_t l = 0; l < std::min<int64_t>(left, 16); ++l) {
      kept_norm[l] = s.norm[s.index[g * 16 + l]];
      valid |= static_cast<__mmask16>(s.valid[g * 16 + l] ? 1u << l : 0u);
    }
    const __m512 kn = _mm512_load_ps(kept_norm);
    for (int64_t k = 0; k < kTokens; ++k) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[k], shift));  // exact
      const __m512 norms = _mm512_max_ps(_mm512_mul_ps(_mm512_set1_ps(n[k]), kn), _mm512_set1_ps(1.0f));
      __m512 cos = _mm512_div_ps(dot, _mm512_sqrt_ps(norms));
      cos = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-2.0f), cos);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(in, cos, best[k], _CMP_GT_OQ);
      best[k] = _mm512_mask_mov_ps(best[k], gt, cos);
      best_t[k] = _mm512_mask_mov_epi32(best_t[k], gt, slot);
    }
  }
  for (int64_t k = 0; k < count; ++k) {  // the first slot of the largest value
    const float top = _mm512_reduce_max_ps(best[k]);
    const __mmask16 at = _mm512_cmp_ps_mask(best[k], _mm512_set1_ps(top), _CMP_EQ_OQ);
    out[k] = _mm512_mask_reduce_min_epi32(at, best_t[k]);
  }
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
    if (isa_ < kAvx512) {
      parallel_rows(raw, b * seq, t * h, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t row_b = r / seq;
          const Slots s{codes + row_b * seq * h, index + row_b * t, valid + row_b * t,
                        norm + row_b * seq, t, h};
          out[r] = NearestScalar(s, codes + r * h, norm[r]);
        }
      });
      return;
    }
    const Packed packed = PackKept(codes, index, b, seq, t, h);
    const int64_t blocks = (seq + kTokens - 1) / kTokens;  // per batch row
    parallel_rows(raw, b * blocks, kTokens * t * h, [&](int64_t k0, int64_t k1) {
      alignas(64) uint8_t u[kTokens * ((kMaxHidden + 3) / 4 * 4)];
      float n[kTokens];
      for (int64_t block = k0; block < k1; ++block) {
        const int64_t row_b = block / blocks, first = (block % blocks) * kTokens;
        const int64_t count = std::min(kTokens, seq - first);
        for (int64_t k = 0; k < kTokens; ++k) {  // a short block repeats its last token
          const int64_t r = row_b * seq + first + std::min(k, count - 1);
          OffsetRow(codes + r * h, h, packed.h4, u + k * packed.h4);
          n[k] = norm[r];
        }
        const Slots s{codes + row_b * seq * h, index + row_b * t, valid + row_b * t,
                      norm + row_b * seq, t, h};
        NearestAvx512(s, packed, row_b, u, n, count, out + row_b * seq + first);
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
