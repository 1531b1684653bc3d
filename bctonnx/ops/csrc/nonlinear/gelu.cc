// IntGelu: integer GELU by table (ref_nonlinear.int_gelu); shared pieces in nonlinear.h.
#include "gelu_steps.h"

namespace bct {
namespace {
using namespace nl;

// ------------------------------------------------------------------------------------------
// IntGelu (ref: int_gelu, gelu_table, _phi)

// float64 table construction: the reference's operations in the reference's order.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

constexpr double kTwoOverSqrtPi = 1.1283791670955126;
constexpr double kInvSqrtPi = 0.5641895835477563;
constexpr double kInvSqrt2 = 0.7071067811865475;
constexpr double kEInv = 0.36787944117144233;
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kGeluTanhC = 0.044715;

double exp_neg(double y) {  // ref: _exp_neg, 0 <= y < 100
  const double n = std::floor(y);
  const double r = y - n;
  double s = 1.0;
  for (int k = 30; k >= 1; --k) s = 1.0 - r * s / k;
  const long ni = static_cast<long>(n);
  for (long i = 0; i < ni; ++i) s = s * kEInv;
  return s;
}

double erf_taylor(double z) {  // ref: _erf_taylor, 0 <= z < 2.5
  const double z2 = z * z;
  double term = z, s = z;
  for (int n = 1; n < 60; ++n) {
    term = term * -z2 / n;
    s = s + term / (2 * n + 1);
  }
  return s * kTwoOverSqrtPi;
}

double erfc_cf(double z) {  // ref: _erfc_cf, 2.5 <= z < 10
  double t = z;
  for (int n = 100; n >= 1; --n) t = z + (n * 0.5) / t;
  return exp_neg(z * z) * kInvSqrtPi / t;
}

double phi(double x) {  // ref: _phi
  const double z = std::fabs(x) * kInvSqrt2;
  const bool pos = x >= 0;
  if (z < 2.5) {
    const double h = erf_taylor(z);
    return pos ? 0.5 + 0.5 * h : 0.5 - 0.5 * h;
  }
  if (z < 10.0) {
    const double c = erfc_cf(z);
    return pos ? 1.0 - 0.5 * c : 0.5 * c;
  }
  return pos ? 1.0 : 0.0;
}

double phi_tanh(double x) {  // ref: _phi_tanh
  const double z = std::fabs(x);
  const double u = kSqrt2OverPi * (z + kGeluTanhC * z * z * z);
  const double y = 2.0 * u;
  double t = 1.0;
  if (y < 100.0) {
    const double e = exp_neg(y);
    t = (1.0 - e) / (1.0 + e);
  }
  return x >= 0 ? 0.5 + 0.5 * t : 0.5 - 0.5 * t;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ref: gelu_table(approximate): the erf form, or (tanh) the tanh form.
GeluTables* make_gelu_tables(bool tanh) {
  auto* g = new GeluTables;
  for (int ei = 0; ei < kGeluNE; ++ei) {
    const int e = kGeluELo + ei;
    g->negmax[ei] = 0;
    for (int q = -128; q < 128; ++q) {
      const double qs = static_cast<double>(q) * 65536.0;
      const double x = std::ldexp(static_cast<double>(q), e);
      const double v = std::nearbyint(qs * (tanh ? phi_tanh(x) : phi(x)));
      const int32_t t = static_cast<int32_t>(v);
      g->t[ei][q + 128] = t;
      if (q < 0) g->negmax[ei] = std::max(g->negmax[ei], std::abs(t));
    }
    for (int ki = 0; ki < kGeluNK; ++ki)
      for (int q = 0; q < 256; ++q)
        g->codes[ei][ki][q] = static_cast<int8_t>(
            std::clamp<int64_t>(shift_round_even(g->t[ei][q], kGeluKMin + ki), -127, 127));
    for (int ki = 0; ki < kGeluNK; ++ki)
      for (int q = 0; q < 256; ++q)
        g->diffs[ei][ki][q] =
            static_cast<int8_t>(g->codes[ei][ki][q] ^ (q % 128 >= 16 ? g->codes[ei][ki][q - 16] : 0));
  }
  return g;
}

const GeluTables& gelu_tables(bool tanh) {  // each built once, when first asked for
  if (tanh) {
    static const GeluTables* tanh_tables = make_gelu_tables(true);
    return *tanh_tables;
  }
  static const GeluTables* erf_tables = make_gelu_tables(false);
  return *erf_tables;
}

// Per row: every block's max |T| (scan), the group exponents, then every block's codes from
// its table row at the group's exponent (gbs: nb entries of scratch).
BCT_CLONES void gelu_rows_portable(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                                   const int8_t* x, const int16_t* ex, int8_t* y, float* ys,
                                   int64_t r0, int64_t r1, GeluBlock* gbs) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* xb = x + r * bl.d + b * bl.b;
      int hi = -128;
      bool anyneg = false;
      for (int i = 0; i < n; ++i) {
        hi = std::max<int>(hi, xb[i]);
        anyneg |= xb[i] < 0;
      }
      gbs[b] = gelu_block(tb, xb, n, ex[r * bl.nb + b], hi, anyneg);
    }
    gelu_group_exponents(bl, gr, gbs, ys + r * gr.ngrp);
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int64_t off = r * bl.d + b * bl.b;
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* row = gelu_codes_row(tb, gbs[b], gbs[b].eo);
      for (int i = 0; i < n; ++i)
        y[off + i] = row ? row[static_cast<uint8_t>(x[off + i]) ^ 0x80u] : int8_t{0};
    }
  }
}

#if BCT_X86
// AVX-512 VBMI: the 256-entry byte table lives in four zmm registers; two vpermi2b pick from
// its halves and the index's top bit chooses.
BCT_AVX512VBMI void gelu_rows_avx512(const GeluTables& tb, const Blocking& bl, GeluGrouping gr,
                                     const int8_t* x, const int16_t* ex, int8_t* y, float* ys,
                                     int64_t r0, int64_t r1, GeluBlock* gbs) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lowest = _mm512_set1_epi8(-128);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* xb = x + r * bl.d + b * bl.b;
      __m512i mx = lowest;
      __mmask64 neg = 0;
      for (int i = 0; i < n; i += 64) {
        const __mmask64 k = n - i >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (n - i)) - 1);
        const __m512i v = _mm512_mask_loadu_epi8(lowest, k, xb + i);
        mx = _mm512_max_epi8(mx, v);
        neg |= _mm512_movepi8_mask(v) & k;
      }
      __m256i m256 = _mm256_max_epi8(_mm512_castsi512_si256(mx), _mm512_extracti64x4_epi64(mx, 1));
      const int hi = hmax_epi8(
          _mm_max_epi8(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1)));
      gbs[b] = gelu_block(tb, xb, n, ex[r * bl.nb + b], hi, neg != 0);
    }
    gelu_group_exponents(bl, gr, gbs, ys + r * gr.ngrp);
    for (int64_t b = 0; b < bl.nb; ++b) {
      const int64_t off = r * bl.d + b * bl.b;
      const int n = static_cast<int>(std::min(bl.b, bl.d - b * bl.b));
      const int8_t* row = gelu_codes_row(tb, gbs[b], gbs[b].eo);
      if (!row) {
        std::memset(y + off, 0, n);
        continue;
      }
      const __m512i t0 = _mm512_loadu_si512(row);
      const __m512i t1 = _mm512_loadu_si512(row + 64);
      const __m512i t2 = _mm512_loadu_si512(row + 128);
      const __m512i t3 = _mm512_loadu_si512(row + 192);
      for (int i = 0; i < n; i += 64) {
        const __mmask64 k = n - i >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (n - i)) - 1);
        const __m512i idx = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, x + off + i), flip);
        const __m512i lo = _mm512_permutex2var_epi8(t0, idx, t1);
        const __m512i hv = _mm512_permutex2var_epi8(t2, idx, t3);
        const __m512i res = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hv);
        _mm512_mask_storeu_epi8(y + off + i, k, res);
      }
    }
  }
}
#endif

struct IntGeluKernel {
  int64_t block_size = 0;
  int64_t out_block_size = 0;  // a multiple of block_size (attribute 0 or absent: the same)
  Isa isa = kScalar;
  bool tanh = false;  // attribute approximate: "none" (erf GELU, the default) or "tanh"
  static constexpr const char* kName = "IntGelu";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs = kInputs;  // y, y_scale
  static constexpr size_t kRequiredInputs = 2;
  IntGeluKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    block_size = attrs.Int("block_size", 1, kMaxNonlinearBlock);
    isa = read_isa(attrs);
    out_block_size = attrs.Int("out_block_size", 0, kMaxBlockSize, 0);
    if (out_block_size == 0) out_block_size = block_size;
    if (out_block_size % block_size)
      attrs.Fail("out_block_size must be a multiple of block_size " + std::to_string(block_size) +
                 ", got " + std::to_string(out_block_size));
    const std::string approximate = attrs.String("approximate", "none");  // absent: the erf form
    if (approximate != "none" && approximate != "tanh")
      attrs.Fail("approximate must be \"none\" or \"tanh\", got \"" + approximate + "\"");
    tanh = approximate == "tanh";
    gelu_tables(tanh);
  }
  void Compute(OrtKernelContext* ctx) {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const Dims xshape = KernelArgs::shape(x);
    const Blocking bl = check_blocked(xshape, KernelArgs::shape(x_scale), block_size, "IntGelu");
    int8_t* yo = args.output<int8_t>(0, xshape);
    const GeluGrouping gr{out_block_size / block_size, num_blocks(bl.d, out_block_size)};
    float* so = args.output<float>(1, blocked_shape(xshape, out_block_size));
    if (bl.rows == 0 || bl.d == 0) return;
    const int16_t* ex = input_exponents(KernelArgs::data<float>(x_scale), bl.rows * bl.nb);
    const GeluTables& tb = gelu_tables(tanh);
    const int8_t* xi = KernelArgs::data<int8_t>(x);
    const bool fast = isa >= kAvx512 && cpu_avx512vbmi();
    const bool avx2 = !fast && isa >= kAvx2 && bl.b % 16 == 0;
    parallel_rows(ctx, bl.rows, bl.d, [&](int64_t r0, int64_t r1) {
      GeluBlock* gbs = scratch<GeluBlock, 1>(static_cast<size_t>(bl.nb));  // one row's blocks
#if BCT_X86
      if (fast) return gelu_rows_avx512(tb, bl, gr, xi, ex, yo, so, r0, r1, gbs);
      if (avx2) return gelu_rows_avx2(tb, bl, gr, xi, ex, yo, so, r0, r1, gbs);
#else
      (void)fast;
      (void)avx2;
#endif
      gelu_rows_portable(tb, bl, gr, xi, ex, yo, so, r0, r1, gbs);
    });
  }
};

}  // namespace

void AddIntGeluOp(Ort::CustomOpDomain& domain) {
  static KernelOp<IntGeluKernel> op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
