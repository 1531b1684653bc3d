// BlockQuantize, BlockDequantize, BlockRequantize, BlockGather (domain "bctonnx", version 1).
//
// The specification of both ops is their numpy reference in bctonnx/ops/ref_quant.py; these
// kernels are bit-exact with it. Blocks run along the last axis (see common.h).
#include <algorithm>
#include <array>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "simd.h"

namespace bct {
namespace {

// ---------------------------------------------------------------------------------------------
// Exponent choice (see ref_quant.py, "Scale choice")

// fl32(M * 2^e_in / qmax) <= 2^e, decided in integers: with g = max(e - 24, -150) (half an ulp
// of float32 just above 2^e is 2^g; a tie rounds to 2^e, whose mantissa is even), this is
// M * 2^(e_in - g) <= qmax * (2^(e - g) + 1). Needs 1 <= M <= 2^31, e in [-128, 127].
// Largest intermediates: M << 31 <= 2^62, rhs << 31 < 2^62.
bool FitsFloat32Rule(int64_t m, int e_in, int e, int64_t qmax) {
  const int g = std::max(e - 24, -150);
  const int64_t rhs = qmax * ((int64_t{1} << (e - g)) + 1);  // e - g in 22..24: rhs < 2^31
  const int s = e_in - g;
  if (s >= 0) return s < 32 && (m << s) <= rhs;
  return -s >= 32 || m <= (rhs << -s);
}

// The output exponent one segment (max |v| = M >= 1 at exponent e_in) asks for: the smallest
// e in [-128, 127] with fl32(M * 2^e_in / qmax) <= 2^e. Throws when no e <= 127 will do.
int SegmentExponent(int64_t m, int e_in, int64_t qmax, const char* op) {
  // d0 = smallest d with M <= qmax * 2^d (exact); it is bl(M) - bl(qmax) or one more.
  auto bit_length = [](int64_t v) { int n = 0; while (v) { ++n; v >>= 1; } return n; };
  int d = bit_length(m) - bit_length(qmax);  // in [-6, 31]
  const bool fits = d >= 0 ? m <= (qmax << d) : (m << -d) <= qmax;
  if (!fits) ++d;
  int e = e_in + d;
  // Rounding to float32 can let the exponent below pass (only for values that are not exact
  // float32 numbers, or in the subnormal range of the scale).
  if (e - 1 >= -128 && e - 1 <= 127 && FitsFloat32Rule(m, e_in, e - 1, qmax)) --e;
  if (e < -128) e = -128;
  if (e > 127)
    throw std::runtime_error(std::string("bctonnx.") + op +
                             ": values too large for a pow2 scale (max |x| / qmax beyond 2^127)");
  return e;
}

// ---------------------------------------------------------------------------------------------
// BlockQuantize(x: float) -> (y: int8, y_scale: float)

struct BlockQuantizeKernel {
  static constexpr const char* kName = "BlockQuantize";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kRequiredInputs = 1;
  BlockQuantizeKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    block_size_ = attrs.Int("block_size", 1, kMaxBlockSize);
    bits_ = static_cast<int>(attrs.Int("bits", 2, 8, 8));
  }

  void Compute(OrtKernelContext* ctx) const {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const Dims shape = KernelArgs::shape(x);
    int64_t rows = 0, depth = 0;
    rows_and_depth("bctonnx.BlockQuantize", shape, &rows, &depth);
    int8_t* out = args.output<int8_t>(0, shape);
    float* scales = args.output<float>(1, blocked_shape(shape, block_size_));
    if (rows == 0 || depth == 0) return;
    // BlockMatMul's activation quantizer: the same rule, vectorized (bit-exact, tested)
    try {
      QuantizeRowsPow2(isa_, KernelArgs::data<float>(x), rows, depth, block_size_, bits_, out, scales);
    } catch (const std::runtime_error& e) {
      std::string what = e.what();
      const std::string from = "bctonnx.BlockMatMul: ";
      if (what.rfind(from, 0) == 0) what = "bctonnx.BlockQuantize: " + what.substr(from.size());
      throw std::runtime_error(what);
    }
  }

  int64_t block_size_ = 0;
  int bits_ = 8;
  int isa_ = BestIsa();
};

// ---------------------------------------------------------------------------------------------
// BlockDequantize(x: int8, x_scale: float) -> y: float = x * x_scale per block (one rounding)

// y[j] = float(q[j] - z) * s, j < n (one rounding: the integer difference is exact in float)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void DequantizeBlockAvx512(
    const int8_t* q, int z, float s, int64_t n, float* y) {
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i vz = _mm512_set1_epi32(z);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask16 k = m == 16 ? 0xFFFF : static_cast<__mmask16>((1u << m) - 1);
    const __m512i v = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, q + i)), vz);
    _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void DequantizeRowsAvx512(
    const int8_t* x, const float* scales, int64_t rows, int64_t depth, int64_t block, float* y) {
  const int64_t nb = num_blocks(depth, block);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i = b * block;
      DequantizeBlockAvx512(x + r * depth + i, 0, scales[r * nb + b], std::min(block, depth - i),
                            y + r * depth + i);
    }
}

struct BlockDequantizeKernel {
  static constexpr const char* kName = "BlockDequantize";
  static constexpr std::array kInputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kRequiredInputs = 2;
  BlockDequantizeKernel(const OrtApi&, const OrtKernelInfo* info) {
    block_size_ = Attributes(info, kName).Int("block_size", 1, kMaxBlockSize);
  }

  void Compute(OrtKernelContext* ctx) const {
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const Dims shape = KernelArgs::shape(x);
    int64_t rows = 0, depth = 0;
    rows_and_depth("bctonnx.BlockDequantize", shape, &rows, &depth);
    const Dims sshape = KernelArgs::shape(x_scale);
    if (sshape != blocked_shape(shape, block_size_))
      throw std::runtime_error("bctonnx.BlockDequantize: x_scale must have shape " +
                               shape_str(blocked_shape(shape, block_size_)) + ", got " + shape_str(sshape));
    float* out = args.output<float>(0, shape);
    if (rows == 0 || depth == 0) return;
    const float* scales = KernelArgs::data<float>(x_scale);
    const int8_t* in = KernelArgs::data<int8_t>(x);
    if (isa_ >= kIsaAvx512) {
      DequantizeRowsAvx512(in, scales, rows, depth, block_size_, out);
      return;
    }
    const int64_t nb = num_blocks(depth, block_size_);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < depth; ++i)
        out[r * depth + i] = static_cast<float>(in[r * depth + i]) * scales[r * nb + i / block_size_];
  }

  int64_t block_size_ = 0;
  int isa_ = BestIsa();
};

// ---------------------------------------------------------------------------------------------
// BlockRequantize(x: int32 | int8, x_scale: float pow2) -> (y: int8, y_scale: float pow2)

// The output exponent of an int8 block with max |q| = m (0: none, INT_MIN) at exponent e_in:
// SegmentExponent(m, e_in) = e_in + SegmentExponent(m, 0) (k_of_m) while both candidate
// exponents are normal (the float32 rule only depends on e - e_in there), else computed.
inline int SegmentExponentInt8(int64_t m, int e_in, int64_t qmax, const int* k_of_m) {
  if (m == 0) return INT_MIN;
  const int e = e_in + k_of_m[m];
  return e >= -125 && e <= 127 ? e : SegmentExponent(m, e_in, qmax, "BlockRequantize");
}

// int8 codes whose input blocks nest in the output blocks (in_block_size divides block_size),
// rows [r0, r1), AVX-512BW: per input block its max |q| (vector) and the output exponent it
// asks for (SegmentExponentInt8); per output block the largest of those; then every input block's
// codes shifted by n = e_out - e_in on 16-bit lanes: a left shift (n < 0; n >= -7 for a nonzero
// block, so |q| << 7 <= 2^14) or round_half_even(q / 2^n) (n capped at 15: from n = 9 on the
// result is 0 either way). No clamp: e_out >= e_in + k where fl32(m / qmax) <= 2^k, so
// |q| / 2^n <= m / 2^k <= qmax (1 + 2^-24) < qmax + 1/2 rounds to at most qmax (the
// reference's clamp never acts). Bit-exact with the general loop (tests).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void RequantizeNestedInt8Avx512(
    const int8_t* in, const int* e_in, int8_t* out, float* scales, int64_t r0, int64_t r1,
    int64_t depth, int64_t in_block, int64_t block, int64_t qmax, const int* k_of_m, int* e_seg) {
  const int64_t in_nb = num_blocks(depth, in_block), nb = num_blocks(depth, block);
  const int64_t per = block / in_block;
  const __m512i one = _mm512_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = in + r * depth;
    int8_t* orow = out + r * depth;
    const int* re = e_in + r * in_nb;
    int64_t j = 0;
    if (in_block == 32)  // two input blocks per 64-byte load: max |q| per 128-bit lane, then
                         // per lane pair
      for (; j + 2 <= in_nb && (j + 2) * 32 <= depth; j += 2) {
        __m512i v = _mm512_abs_epi8(_mm512_loadu_si512(row + j * 32));
        v = _mm512_max_epu8(v, _mm512_bsrli_epi128(v, 8));
        v = _mm512_max_epu8(v, _mm512_bsrli_epi128(v, 4));
        v = _mm512_max_epu8(v, _mm512_bsrli_epi128(v, 2));
        v = _mm512_max_epu8(v, _mm512_bsrli_epi128(v, 1));
        v = _mm512_max_epu8(v, _mm512_shuffle_i32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
        const int64_t m0 = _mm512_cvtsi512_si32(v) & 0xFF;
        const int64_t m1 = _mm_cvtsi128_si32(_mm512_extracti32x4_epi32(v, 2)) & 0xFF;
        e_seg[j] = SegmentExponentInt8(m0, re[j], qmax, k_of_m);
        e_seg[j + 1] = SegmentExponentInt8(m1, re[j + 1], qmax, k_of_m);
      }
    for (; j < in_nb; ++j) {  // max |q| of every (other) input block -> its exponent
      const int64_t begin = j * in_block, end = std::min(depth, begin + in_block);
      __m256i vmax = _mm256_setzero_si256();
      for (int64_t i = begin; i < end; i += 32) {
        const int64_t n = std::min<int64_t>(32, end - i);
        const __mmask32 k = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
        vmax = _mm256_max_epu8(vmax, _mm256_abs_epi8(_mm256_maskz_loadu_epi8(k, row + i)));
      }
      __m128i x = _mm_max_epu8(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
      x = _mm_max_epu8(x, _mm_srli_si128(x, 8));
      x = _mm_max_epu8(x, _mm_srli_si128(x, 4));
      x = _mm_max_epu8(x, _mm_srli_si128(x, 2));
      x = _mm_max_epu8(x, _mm_srli_si128(x, 1));
      const int64_t m = _mm_cvtsi128_si32(x) & 0xFF;  // |-128| = 128 as an unsigned byte
      e_seg[j] = SegmentExponentInt8(m, re[j], qmax, k_of_m);
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * per, j1 = std::min(in_nb, j0 + per);
      int e_out = -128;
      for (int64_t j = j0; j < j1; ++j) e_out = std::max(e_out, e_seg[j]);
      scales[r * nb + b] = pow2_float(e_out);
      for (int64_t j = j0; j < j1; ++j) {
        const int n = e_out - re[j];
        const int64_t begin = j * in_block, end = std::min(depth, begin + in_block);
        if (n == 0 || e_seg[j] == INT_MIN) {  // the same codes (or all zero)
          std::memcpy(orow + begin, row + begin, static_cast<size_t>(end - begin));
          continue;
        }
        const __m128i left = _mm_cvtsi32_si128(std::max(-n, 0));
        const __m512i vn = _mm512_set1_epi16(static_cast<int16_t>(std::clamp(n, 1, 15)));
        const __m512i bias = _mm512_sub_epi16(_mm512_sllv_epi16(one, _mm512_sub_epi16(vn, one)), one);
        for (int64_t i = begin; i < end; i += 32) {
          const int64_t cnt = std::min<int64_t>(32, end - i);
          const __mmask32 k = cnt == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << cnt) - 1u);
          __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, row + i));
          if (n < 0) {
            w = _mm512_sll_epi16(w, left);
          } else {
            const __m512i odd = _mm512_and_si512(_mm512_srav_epi16(w, vn), one);
            w = _mm512_srav_epi16(_mm512_add_epi16(_mm512_add_epi16(w, bias), odd), vn);
          }
          _mm256_mask_storeu_epi8(orow + i, k, _mm512_cvtepi16_epi8(w));
        }
      }
    }
  }
}

template <typename T>
struct BlockRequantizeKernel {
  static constexpr const char* kName = "BlockRequantize";  // one kernel per x type
  static constexpr std::array kInputs{Ort::TypeToTensorType<T>::type, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kRequiredInputs = 2;
  BlockRequantizeKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    in_block_size_ = attrs.Int("in_block_size", 0, kMaxBlockSize);  // 0: one scale for x
    block_size_ = attrs.Int("block_size", 1, kMaxBlockSize);
    bits_ = static_cast<int>(attrs.Int("bits", 2, 8, 8));
    const int64_t qmax = (int64_t{1} << (bits_ - 1)) - 1;
    for (int64_t m = 1; m <= 128; ++m) k_of_m_[m] = SegmentExponent(m, 0, qmax, "BlockRequantize");
  }

  void Compute(OrtKernelContext* ctx) const {
    static const char* kOp = "BlockRequantize";
    const KernelArgs args(ctx);
    const OrtValue* x = args.input(0);
    const OrtValue* x_scale = args.input(1);
    const Dims shape = KernelArgs::shape(x);
    int64_t rows = 0, depth = 0;
    rows_and_depth(std::string("bctonnx.") + kOp, shape, &rows, &depth);

    // Input exponents: one for the tensor, or one per input block.
    const Dims sshape = KernelArgs::shape(x_scale);
    const int64_t n_scales = sshape.count();
    int64_t in_nb = 1;
    if (in_block_size_ == 0) {
      if (n_scales != 1)
        throw std::runtime_error(std::string("bctonnx.BlockRequantize: in_block_size=0 needs a "
                                             "single x_scale, got shape ") + shape_str(sshape));
    } else {
      in_nb = num_blocks(depth, in_block_size_);
      if (sshape != blocked_shape(shape, in_block_size_))
        throw std::runtime_error(
            "bctonnx.BlockRequantize: x_scale shape " + shape_str(sshape) + " does not match x " +
            shape_str(shape) + " with in_block_size " + std::to_string(in_block_size_) +
            " (expected " + shape_str(blocked_shape(shape, in_block_size_)) + ")");
    }
    std::vector<int> e_in(static_cast<size_t>(n_scales));
    const float* sdata = KernelArgs::data<float>(x_scale);
    for (int64_t i = 0; i < n_scales; ++i) e_in[i] = pow2_exponent(sdata[i]);

    const int64_t nb = num_blocks(depth, block_size_);
    int8_t* out = args.output<int8_t>(0, shape);
    float* scales = args.output<float>(1, blocked_shape(shape, block_size_));
    if (rows == 0 || depth == 0) return;
    const T* in = KernelArgs::data<T>(x);
    const int64_t qmax = (int64_t{1} << (bits_ - 1)) - 1;
    if constexpr (std::is_same_v<T, int8_t>) {
      if (isa_ >= kIsaAvx512 && in_block_size_ > 0 && block_size_ % in_block_size_ == 0) {
        // exponents are validated (pow2_exponent above); only SegmentExponent can still
        // throw (values beyond 2^127 * qmax): caught in the task, reported after
        std::string error;
        std::mutex mu;
        parallel_rows(ctx, rows, depth, [&](int64_t r0, int64_t r1) {
          try {
            std::vector<int> e_seg(static_cast<size_t>(num_blocks(depth, in_block_size_)));
            RequantizeNestedInt8Avx512(in, e_in.data(), out, scales, r0, r1, depth, in_block_size_,
                                       block_size_, qmax, k_of_m_.data(), e_seg.data());
          } catch (const std::exception& e) {
            std::lock_guard<std::mutex> lock(mu);
            if (error.empty()) error = e.what();
          }
        });
        if (!error.empty()) throw std::runtime_error(error);
        return;
      }
    }

    for (int64_t r = 0; r < rows; ++r) {
      const T* row = in + r * depth;
      int8_t* orow = out + r * depth;
      const int* row_e = in_block_size_ == 0 ? e_in.data() : e_in.data() + r * in_nb;
      auto exponent_at = [&](int64_t i) { return in_block_size_ == 0 ? row_e[0] : row_e[i / in_block_size_]; };
      auto segment_end = [&](int64_t i, int64_t end) {
        return in_block_size_ == 0 ? end : std::min(end, (i / in_block_size_ + 1) * in_block_size_);
      };
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t begin = b * block_size_, end = std::min(depth, begin + block_size_);
        // Output exponent: the largest any input segment of this block asks for.
        int e_out = -128;
        for (int64_t i = begin; i < end;) {
          const int64_t seg_end = segment_end(i, end);
          int64_t m = 0;  // max |v| of the segment, <= 2^31
          for (int64_t j = i; j < seg_end; ++j) {
            const int64_t v = row[j];
            m = std::max(m, v < 0 ? -v : v);
          }
          if (m > 0) e_out = std::max(e_out, SegmentExponent(m, exponent_at(i), qmax, kOp));
          i = seg_end;
        }
        scales[r * nb + b] = pow2_float(e_out);
        for (int64_t i = begin; i < end;) {
          const int64_t seg_end = segment_end(i, end);
          // v * 2^e_in / 2^e_out = v / 2^n; n >= -7 whenever v != 0 (so v << 7 <= 2^38).
          const int n = e_out - exponent_at(i);
          for (int64_t j = i; j < seg_end; ++j) {
            const int64_t v = row[j];
            int64_t q = v == 0 ? 0 : shift_round_even(v, n);
            q = std::min(std::max(q, -qmax), qmax);
            orow[j] = static_cast<int8_t>(q);
          }
          i = seg_end;
        }
      }
    }
  }

  int64_t in_block_size_ = 0;
  int64_t block_size_ = 0;
  int bits_ = 8;
  int isa_ = BestIsa();
  std::array<int, 129> k_of_m_{};  // SegmentExponent(m, 0, qmax) of int8 maxima m
};

// ---------------------------------------------------------------------------------------------
// BlockGather(table, scale_codes, ids[, zero_points]) -> y: float [ids..., H], the rows of a
// block-quantized embedding table dequantized (ref_quant.block_gather): bits 8: table int8
// [V, H], zero points int8 [V, nb]; bits 4: table uint8 [V, H / 2] (two's complement nibbles,
// low first), zero points packed the same way [V, ceil(nb / 2)]. The tables' element types are
// checked here (declared any type), at session creation when they are initializers.

// Packed int4 pairs (two's complement nibbles, low first) -> int8 codes, `bytes` bytes.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void UnpackNibblesAvx512(
    const uint8_t* src, int64_t bytes, int8_t* out) {
  for (int64_t i = 0; i < bytes; i += 32) {
    const int64_t m = std::min<int64_t>(32, bytes - i);
    const __mmask32 k = m == 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << m) - 1);
    // each byte in a 16-bit lane: low nibble = (w << 12) >> 12, high = (w << 8) >> 12 (arith)
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, src + i));
    const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(w, 12), 12);
    const __m512i hi = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 12);
    // pairs (lo, hi) per byte: 16-bit lanes lo | hi << 8 are the two codes in order
    const __m512i pairs = _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi16(0xFF)),
                                          _mm512_slli_epi16(hi, 8));
    _mm512_mask_storeu_epi16(out + 2 * i, k, pairs);
  }
}

struct BlockGatherKernel {
  static constexpr const char* kName = "BlockGather";
  static constexpr std::array kInputs{
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
  static constexpr std::array kOutputs{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kRequiredInputs = 3;

  BlockGatherKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, kName);
    const int64_t bits = attrs.Int("bits", 4, 8);
    if (bits != 4 && bits != 8) Fail("attribute 'bits' must be 4 or 8, got " + std::to_string(bits));
    int4_ = bits == 4;
    block_size_ = attrs.Int("block_size", 1, kMaxBlockSize);
    const int frac = static_cast<int>(attrs.Int("frac_bits", 0, 4, 0));
    for (int c = -128; c < 128; ++c) scale_of_[c + 128] = decode_pow2_scale(c, frac);
    const OrtValue* table = constant_input(info, 0);
    const OrtValue* codes = constant_input(info, 1);
    const OrtValue* zps = constant_input(info, 3);
    if (table != nullptr && codes != nullptr && (zps != nullptr || !has_input(info, 3)))
      Check(table, codes, zps);
  }

  [[noreturn]] static void Fail(const std::string& what) {
    throw std::runtime_error(std::string("bctonnx.BlockGather: ") + what);
  }
  static ONNXTensorElementDataType TypeOf(const OrtValue* v) {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* info = nullptr;
    Ort::ThrowOnError(api.GetTensorTypeAndShape(v, &info));
    ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    OrtStatus* st = api.GetTensorElementType(info, &t);
    api.ReleaseTensorTypeAndShapeInfo(info);
    Ort::ThrowOnError(st);
    return t;
  }

  // The tables' types and shapes; returns (V, H).
  std::pair<int64_t, int64_t> Check(const OrtValue* table, const OrtValue* codes,
                                    const OrtValue* zps) const {
    const ONNXTensorElementDataType want =
        int4_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    const char* want_name = int4_ ? "uint8 (packed int4 pairs, bits 4)" : "int8 (bits 8)";
    if (TypeOf(table) != want) Fail(std::string("table must be ") + want_name);
    if (TypeOf(codes) != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) Fail("scale codes must be int8");
    const Dims tshape = KernelArgs::shape(table), sshape = KernelArgs::shape(codes);
    if (tshape.size() != 2) Fail("table must be [V, H" + std::string(int4_ ? " / 2]" : "]") + ", got " + shape_str(tshape));
    const int64_t vocab = tshape[0], hidden = tshape[1] * (int4_ ? 2 : 1);
    if (hidden % block_size_)
      Fail("block_size " + std::to_string(block_size_) + " must divide H = " + std::to_string(hidden));
    const int64_t nb = hidden / block_size_;
    if (sshape.size() != 2 || sshape[0] != vocab || sshape[1] != nb)
      Fail("scale codes must be [V, H / B] = [" + std::to_string(vocab) + "," + std::to_string(nb) +
           "], got " + shape_str(sshape));
    if (zps != nullptr) {
      if (TypeOf(zps) != want) Fail(std::string("zero points must be ") + want_name);
      const Dims zshape = KernelArgs::shape(zps);
      const int64_t cols = int4_ ? (nb + 1) / 2 : nb;
      if (zshape.size() != 2 || zshape[0] != vocab || zshape[1] != cols)
        Fail("zero points must be [V, " + std::to_string(cols) + "], got " + shape_str(zshape));
    }
    return {vocab, hidden};
  }

  static int Nibble(uint8_t byte, int64_t i) {  // code i of a packed pair, -8..7
    return (i & 1) ? static_cast<int8_t>(byte) >> 4 : static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4;
  }

  void Compute(OrtKernelContext* ctx) const {
    const KernelArgs args(ctx);
    const OrtValue* table = args.input(0);
    const OrtValue* codes = args.input(1);
    const OrtValue* ids = args.input(2);
    const OrtValue* zps = args.input(3);
    const auto [vocab, hidden] = Check(table, codes, zps);
    const int64_t nb = hidden / block_size_;
    const Dims ishape = KernelArgs::shape(ids);
    if (ishape.size() + 1 > kMaxRank) Fail("ids rank too high");
    Dims oshape = ishape;
    oshape.n = ishape.n + 1;
    oshape.back() = hidden;
    const int64_t n = ishape.count();
    const ONNXTensorElementDataType id_type = TypeOf(ids);
    if (id_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && id_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      Fail("ids must be int64 or int32 (as Gather's indices)");
    std::vector<int64_t> id32;  // int32 ids (onnxruntime's optimized graphs) widened
    const int64_t* id = nullptr;
    if (id_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
      const int32_t* raw = KernelArgs::data<int32_t>(ids);
      id32.assign(raw, raw + n);
      id = id32.data();
    } else {
      id = KernelArgs::data<int64_t>(ids);
    }
    for (int64_t i = 0; i < n; ++i)
      if (id[i] < -vocab || id[i] >= vocab)
        Fail("id " + std::to_string(id[i]) + " is outside [-" + std::to_string(vocab) + ", " +
             std::to_string(vocab) + ")");
    float* out = args.output<float>(0, oshape);
    if (n == 0 || hidden == 0) return;
    const uint8_t* tab = KernelArgs::data<uint8_t>(table);
    const int8_t* sc = KernelArgs::data<int8_t>(codes);
    const uint8_t* zp = zps != nullptr ? KernelArgs::data<uint8_t>(zps) : nullptr;
    const int64_t row_bytes = int4_ ? hidden / 2 : hidden;
    const int64_t zp_cols = int4_ ? (nb + 1) / 2 : nb;
    const bool simd = isa_ >= kIsaAvx512;
    parallel_rows(ctx, n, hidden, [&](int64_t i0, int64_t i1) {
      std::vector<int8_t> unpacked(int4_ ? static_cast<size_t>(hidden) : 0);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = id[i] < 0 ? id[i] + vocab : id[i];
        const uint8_t* src = tab + r * row_bytes;
        const int8_t* q = reinterpret_cast<const int8_t*>(src);
        if (int4_ && simd) {
          UnpackNibblesAvx512(src, row_bytes, unpacked.data());
          q = unpacked.data();
        } else if (int4_) {  // sign-extended nibbles, low first
          for (int64_t k = 0; k < 2 * row_bytes; ++k) unpacked[k] = static_cast<int8_t>(Nibble(src[k / 2], k));
          q = unpacked.data();
        }
        float* y = out + i * hidden;
        for (int64_t b = 0; b < nb; ++b) {
          const float s = scale_of_[sc[r * nb + b] + 128];
          int z = 0;
          if (zp != nullptr)
            z = int4_ ? Nibble(zp[r * zp_cols + b / 2], b) : static_cast<int8_t>(zp[r * zp_cols + b]);
          const int8_t* qb = q + b * block_size_;
          float* yb = y + b * block_size_;
          if (simd) {
            DequantizeBlockAvx512(qb, z, s, block_size_, yb);
          } else {
            for (int64_t j = 0; j < block_size_; ++j) yb[j] = static_cast<float>(qb[j] - z) * s;
          }
        }
      }
    });
  }

  bool int4_ = false;
  int64_t block_size_ = 0;
  int isa_ = BestIsa();
  std::array<float, 256> scale_of_{};
};

}  // namespace

void AddQuantOps(Ort::CustomOpDomain& domain) {
  // static: they live as long as the process (sessions keep raw pointers)
  static KernelOp<BlockQuantizeKernel> quantize;
  static KernelOp<BlockDequantizeKernel> dequantize;
  // Two kernels under one name: onnxruntime picks the one matching x's element type.
  static KernelOp<BlockRequantizeKernel<int32_t>> requantize_int32;
  static KernelOp<BlockRequantizeKernel<int8_t>> requantize_int8;
  domain.Add(&quantize);
  domain.Add(&dequantize);
  domain.Add(&requantize_int32);
  domain.Add(&requantize_int8);
  static KernelOp<BlockGatherKernel> gather;
  domain.Add(&gather);
}

}  // namespace bct
