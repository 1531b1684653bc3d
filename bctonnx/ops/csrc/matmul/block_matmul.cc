// BlockMatMul (domain "bctonnx", version 1): a linear layer on block-quantized operands. The
// specification is the numpy reference bctonnx/ops/ref_matmul.py (signature, arithmetic, float
// order). Activations are quantized on the fly exactly as BlockQuantize does (or arrive as int8
// codes + pow2 scales); weights stay in their stored block format and are re-packed once, when
// the kernel is created, for the GEMM kernels (gemm.h) -- never dequantized to float.
//
// Threading: Ort::KernelContext::ParallelFor (OrtApi::KernelContext_ParallelFor, API 17+) runs
// tasks on the session's intra-op thread pool, so intra_op_num_threads is respected and no
// threads of our own are created. Each output element is computed by exactly one task in a
// fixed order, so results depend neither on the thread count nor on the other rows.
#include <algorithm>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "../quantize_row.h"
#include "../simd.h"
#include "gemm.h"
#include "nm_sparsity.h"

namespace bct {
namespace {

using gemm::ActsBuffers;
using gemm::ActsSizes;
using gemm::PackedWeights;
using gemm::ThreadScratch;

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.BlockMatMul: " + what);
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetShape();
}

// An element type's ONNX name, for error messages.
std::string TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4: return "int4";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT4: return "uint4";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    default: return "element type " + std::to_string(t);
  }
}

// The values of a constant int8 / int4 / uint4 tensor, unpacked to int32, with its shape and
// element type; an error naming the input unless it is a constant of one of `types`.
std::vector<int32_t> ConstInts(const Ort::ConstKernelInfo& info, size_t index, const char* name,
                               std::initializer_list<ONNXTensorElementDataType> types,
                               std::vector<int64_t>* shape, ONNXTensorElementDataType* type_out,
                               bool required) {
  if (!has_input(info, index)) {
    if (required) Fail(std::string(name) + " is required");
    return {};
  }
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) Fail(std::string(name) + " must be a constant initializer");
  auto ti = v.GetTensorTypeAndShapeInfo();
  *shape = ti.GetShape();
  const size_t count = ti.GetElementCount();
  const auto type = ti.GetElementType();
  if (std::find(types.begin(), types.end(), type) == types.end()) {
    std::string allowed;
    for (auto t : types) allowed += (allowed.empty() ? "" : " or ") + TypeName(t);
    Fail(std::string(name) + " must be " + allowed + ", got " + TypeName(type));
  }
  if (type_out != nullptr) *type_out = type;
  std::vector<int32_t> out(count);
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
    const int8_t* p = static_cast<const int8_t*>(v.GetTensorRawData());
    for (size_t i = 0; i < count; ++i) out[i] = p[i];
  } else {  // int4 / uint4, two per byte, element 2i in the low nibble
    const uint8_t* p = static_cast<const uint8_t*>(v.GetTensorRawData());
    const bool is_signed = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;
    for (size_t i = 0; i < count; ++i) {
      int32_t nib = (i % 2 == 0) ? (p[i / 2] & 0x0F) : (p[i / 2] >> 4);
      if (is_signed && nib > 7) nib -= 16;
      out[i] = nib;
    }
  }
  return out;
}

constexpr auto kInt8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr auto kInt4 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;
constexpr auto kUInt4 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT4;

enum Input : size_t {
  kX = 0, kXScale, kCodes, kScales, kScaleBase, kZeroPoints, kBias, kYMul, kResidual,
  kResidualScale, kMultipliers, kNMPattern, kNumInputs
};
enum Output : size_t { kY = 0, kYQ, kYScale, kSegments, kNumOutputs };

constexpr int64_t kMinRowsPerTask = 32;   // whole-row tasks: enough rows for every thread
constexpr int64_t kMaxRowsPerTask = 128;  // ... and few enough tasks to stream the weights

struct BlockMatMulKernel {
  BlockMatMulKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info{raw_info};
    const Attributes attrs(raw_info, "BlockMatMul");
    const int64_t block = attrs.Int("block_size", 1, kMaxBlockSize);
    const int64_t frac_bits = attrs.Int("frac_bits", 0, 4);
    act_block_ = attrs.Int("act_block_size", 1, kMaxBlockSize);
    act_bits_ = static_cast<int>(attrs.Int("act_bits", 2, 8, 8));
    out_block_ = attrs.Int("out_block_size", 0, kMaxBlockSize, 0);
    out_bits_ = static_cast<int>(attrs.Int("out_bits", 2, 8, 8));
    residual_block_ = attrs.Int("residual_block_size", 0, kMaxBlockSize, 0);
    const int64_t superblock = attrs.Int("superblock", 0, kMaxBlockSize, 0);
    if (superblock > 0 && (superblock <= block || superblock % block))
      Fail("superblock must be 0 or a multiple (> 1) of block_size " + std::to_string(block) +
           ", got " + std::to_string(superblock));
    nm_n_ = attrs.Int("nm_n", 0, 7, 0);
    nm_m_ = attrs.Int("nm_m", 0, 8, 0);
    if ((nm_n_ > 0) != (nm_m_ > 0) || (nm_m_ > 0 && nm_n_ >= nm_m_))
      Fail("nm_n / nm_m must both be 0 (dense) or 0 < nm_n < nm_m <= 8, got " +
           std::to_string(nm_n_) + " / " + std::to_string(nm_m_));
    if ((nm_m_ > 0) != has_input(raw_info, kNMPattern))
      Fail("w_nm_pattern goes with nm_n / nm_m > 0");
    // the optional inputs and outputs the node wires must go together
    check_quantized_outputs(attrs, kYQ, kYScale, out_block_);
    const bool residual = has_input(raw_info, kResidual);
    if (residual != has_input(raw_info, kResidualScale))
      Fail("residual and residual_scale go together");
    if (residual && (out_block_ < 1 || residual_block_ < 1 || !has_output(raw_info, kYQ)))
      Fail("a residual needs out_block_size, residual_block_size and the y_q output");
    check_one_value_if_constant(attrs, kYMul, "y_multiplier");
    try {
      isa_ = ChooseIsa();
      amx_emulated_ = isa_ == kAmx && AmxEmulated();
      Pack(info, block, frac_bits, superblock);
    } catch (const Ort::Exception&) {
      throw;
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      if (what.rfind("bctonnx.", 0) == 0) throw;
      Fail(what);
    }
    // a constant bias is padded once; otherwise it is read at run time
    if (has_input(raw_info, kBias)) {
      has_bias_ = true;
      if (const OrtValue* b = constant_input(raw_info, kBias)) {
        CheckBias(KernelArgs::shape(b));
        bias_.assign(static_cast<size_t>(w_.npad), 0.0f);
        std::memcpy(bias_.data(), KernelArgs::data<float>(b), sizeof(float) * w_.n);
      }
    }
  }

  template <class Shape>
  void CheckBias(const Shape& shape) const {
    if (shape.size() != 1 || shape[0] != w_.n)
      Fail("bias must have shape [N] = [" + std::to_string(w_.n) + "], got " + shape_str(shape));
  }

  // Superblock weights (blockformat.widen_superblocks): the codes become m * (q - zp), int8, in
  // blocks of the superblock, without zero points; from here on 8-bit weights.
  static void WidenSuperblocks(const Ort::ConstKernelInfo& info, int64_t block,
                               const std::vector<int64_t>& cshape, std::vector<int32_t>& codes,
                               std::vector<int32_t>& zps, const std::vector<int64_t>& zshape) {
    std::vector<int64_t> mshape;
    const std::vector<int32_t> mult =
        ConstInts(info, kMultipliers, "w_multipliers", {kUInt4}, &mshape, nullptr, true);
    if (cshape[0] % block)
      Fail("block_size " + std::to_string(block) + " does not divide K = " +
           std::to_string(cshape[0]));
    const std::vector<int64_t> blocked{cshape[0] / block, cshape[1]};
    if (mshape != blocked)
      Fail("w_multipliers must be " + shape_str(blocked) + ", got " + shape_str(mshape));
    if (!zps.empty() && zshape != blocked)
      Fail("w_zero_points must be " + shape_str(blocked) + ", got " + shape_str(zshape));
    for (int32_t m : mult)
      if (m < 1 || m > 15) Fail("w_multipliers must be in 1..15, got " + std::to_string(m));
    const int64_t n = cshape[1];
    for (int64_t k = 0; k < cshape[0]; ++k)
      for (int64_t c = 0; c < n; ++c) {
        const int64_t b = (k / block) * n + c;
        const int32_t v = mult[b] * (codes[k * n + c] - (zps.empty() ? 0 : zps[b]));
        if (v < -128 || v > 127) Fail("superblock weights: m * (q - zp) outside int8");
        codes[k * n + c] = v;
      }
    zps.clear();
  }

  void Pack(const Ort::ConstKernelInfo& info, int64_t block, int64_t frac_bits,
            int64_t superblock) {
    std::vector<int64_t> cshape, sshape, bshape, zshape;
    ONNXTensorElementDataType ctype{}, stype{}, ztype{};
    std::vector<int32_t> codes =
        ConstInts(info, kCodes, "w_codes", {kInt8, kInt4}, &cshape, &ctype, true);
    std::vector<int32_t> scodes =
        ConstInts(info, kScales, "w_scales", {kInt8, kUInt4}, &sshape, &stype, true);
    const std::vector<int32_t> base =
        ConstInts(info, kScaleBase, "w_scale_base", {kInt8}, &bshape, nullptr, false);
    std::vector<int32_t> zps =
        ConstInts(info, kZeroPoints, "w_zero_points", {kInt8, kInt4}, &zshape, &ztype, false);
    if (cshape.size() != 2) Fail("w_codes must be [K, N], got " + shape_str(cshape));
    if (nm_m_ > 0) {  // N:M storage (nm_sparsity.h): kept codes + patterns -> dense codes, once
      std::vector<int64_t> pshape;
      const std::vector<int32_t> pattern =
          ConstInts(info, kNMPattern, "w_nm_pattern", {kUInt4, kInt8}, &pshape, nullptr, true);
      codes = ExpandNMCodes(codes, cshape, pattern, pshape, nm_n_, nm_m_, zps, block, &cshape);
    }
    if (!zps.empty() && ztype != ctype)
      Fail("w_zero_points must have w_codes' element type " + TypeName(ctype) + ", got " +
           TypeName(ztype));
    if (stype == kUInt4 && base.empty()) Fail("4-bit w_scales (offsets) need w_scale_base");
    if (superblock == 0 && has_input(info, kMultipliers)) Fail("w_multipliers without superblock");
    if (superblock > 0) {
      WidenSuperblocks(info, block, cshape, codes, zps, zshape);
      block = superblock;
    }
    const int64_t k = cshape[0], n = cshape[1];
    if (k < 1 || n < 1) Fail("empty weights " + shape_str(cshape));
    if (k % block)
      Fail("block_size " + std::to_string(block) + " does not divide K = " + std::to_string(k));
    const std::vector<int64_t> blocked{k / block, n};
    if (sshape != blocked)
      Fail("w_scales must be " + shape_str(blocked) + ", got " + shape_str(sshape));
    if (!base.empty()) {
      if (bshape != std::vector<int64_t>{1, n}) Fail("w_scale_base must be [1, N]");
      for (int64_t b = 0; b < k / block; ++b)
        for (int64_t c = 0; c < n; ++c) scodes[b * n + c] += base[c];
    }
    if (!zps.empty() && zshape != blocked)
      Fail("w_zero_points must be " + shape_str(blocked) + ", got " + shape_str(zshape));
    gemm::WeightCodes wc;
    wc.k = k;
    wc.n = n;
    wc.block = block;
    wc.frac_bits = frac_bits;
    wc.int4 = superblock == 0 && ctype == kInt4;
    wc.codes = codes.data();
    wc.scale_codes = scodes.data();
    wc.zero_points = zps.empty() ? nullptr : zps.data();
    gemm::PackWeights(wc, act_block_, isa_, &w_);
  }

  // One call's state, shared by its tasks.
  struct Job {
    const BlockMatMulKernel* self;
    gemm::Operands op;
    ActsSizes sz;
    ActsBuffers buf;
    const float* xf;   // float input or null
    const int8_t* xq;  // int8 input or null
    const float* xs;   // its scales
    int64_t rows, row_chunk, col_tiles, x_nb;
    int8_t* yq;
    float* ys;
    const int8_t* rq;  // residual codes [rows][n] or null
    const float* rs;   // residual scales [rows][ceil(n / residual_block)]
    std::string error;
    std::mutex mu;
    void SetError(const std::string& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = e;
    }
  };

  // Activations of rows [r0, r1): quantized (float input) or taken as they are (int8 input),
  // then packed with their blocks' exponents; the padding rows of the last tile with them.
  void PackRows(Job& job, int64_t r0, int64_t r1) const {
    const PackedWeights& w = w_;
    const int64_t n = r1 - r0;
    int* exps = ThreadScratch<int>(gemm::kSlotRowExp, static_cast<size_t>(n * job.x_nb));
    const int8_t* q = nullptr;
    if (job.xf) {
      int8_t* codes = ThreadScratch<int8_t>(gemm::kSlotRow, static_cast<size_t>(n * w.k));
      for (int64_t m = r0; m < r1; ++m) {
        try {
          QuantizeRow(isa_, job.xf + m * w.k, w.k, act_block_, act_bits_, codes + (m - r0) * w.k,
                      exps + (m - r0) * job.x_nb);
        } catch (const std::runtime_error& e) {
          Fail(e.what());
        }
      }
      q = codes;
    } else {
      q = job.xq + r0 * w.k;
      for (int64_t i = 0; i < n * job.x_nb; ++i) exps[i] = pow2_exponent(job.xs[r0 * job.x_nb + i]);
    }
    gemm::PackActRows(w, job.sz, job.op.x.interleaved, isa_, q, w.k, exps, job.x_nb, r0, r1,
                      job.buf);
    if (r1 == job.rows) gemm::PackActPadding(w, job.sz, job.op.x.interleaved, job.rows, job.buf);
  }

  template <void (BlockMatMulKernel::*Step)(Job&, int64_t, int64_t) const>
  static void RowChunkTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    try {
      const int64_t r0 = static_cast<int64_t>(i) * job.row_chunk;
      (job.self->*Step)(job, r0, std::min(job.rows, r0 + job.row_chunk));
    } catch (const std::exception& e) {
      job.SetError(e.what());
    }
  }

  static void MatMulTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    if (!job.error.empty()) return;
    const BlockMatMulKernel& k = *job.self;
    const int64_t ct = static_cast<int64_t>(i) % job.col_tiles;
    const int64_t rc = static_cast<int64_t>(i) / job.col_tiles;
    const int64_t tile = gemm::PanelTile(k.isa_);
    const int64_t p0 = ct * tile, p1 = std::min(k.w_.npanel, p0 + tile);
    const int64_t m0 = rc * job.row_chunk, m1 = std::min(job.rows, m0 + job.row_chunk);
    gemm::Gemm(k.isa_, job.op, m0, m1, p0, p1);
  }

  // Rows [r0, r1) whole in one task: their activations, the product over every column panel,
  // the output quantization -- no synchronisation between the steps.
  static void RowsTask(void* data, size_t i) {
    Job& job = *static_cast<Job*>(data);
    try {
      const BlockMatMulKernel& k = *job.self;
      const int64_t r0 = static_cast<int64_t>(i) * job.row_chunk;
      const int64_t r1 = std::min(job.rows, r0 + job.row_chunk);
      k.PackRows(job, r0, r1);
      gemm::Gemm(k.isa_, job.op, r0, r1, 0, k.w_.npanel);
      if (job.yq != nullptr) k.QuantizeOutputRows(job, r0, r1);
    } catch (const std::exception& e) {
      job.SetError(e.what());
    }
  }

  // sum = codes * 2^exps (per out block, exact) + residual codes * their scale, one rounding.
  void AddResidual(const int8_t* codes, const int* exps, const int8_t* rq, const float* rs,
                   float* sum) const {
    const int64_t n = w_.n;
    if (isa_ >= kAvx512 && out_block_ % 16 == 0 && residual_block_ % 16 == 0)
      return AddResidualAvx512(codes, exps, rq, rs, sum);
    for (int64_t b0 = 0; b0 < n; b0 += out_block_) {
      const float s = pow2_float(exps[b0 / out_block_]);
      for (int64_t c = b0; c < std::min(n, b0 + out_block_); ++c)
        sum[c] = static_cast<float>(codes[c]) * s;
    }
    for (int64_t b0 = 0; b0 < n; b0 += residual_block_) {
      const float s = rs[b0 / residual_block_];
      for (int64_t c = b0; c < std::min(n, b0 + residual_block_); ++c)
        sum[c] = sum[c] + static_cast<float>(rq[c]) * s;
    }
  }

  __attribute__((target("avx512f,avx512bw,avx512vl"))) void AddResidualAvx512(
      const int8_t* codes, const int* exps, const int8_t* rq, const float* rs, float* sum) const {
    const int64_t n = w_.n, ocpb = out_block_ / 16, rcpb = residual_block_ / 16;
    int64_t ob = 0, oc = 0, rb = 0, rc = 0;  // block and chunk in it, of each blocking
    for (int64_t c = 0; c < n; c += 16) {  // blocks are whole 16-lane chunks
      const int64_t left = n - c;
      const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __m512 y = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes + c))),
          _mm512_set1_ps(pow2_float(exps[ob])));  // exact
      const __m512 r = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, rq + c))),
          _mm512_set1_ps(rs[rb]));  // rounded once, as DequantizeLinear
      _mm512_mask_storeu_ps(sum + c, m, _mm512_add_ps(y, r));
      if (++oc == ocpb) oc = 0, ++ob;
      if (++rc == rcpb) rc = 0, ++rb;
    }
  }

  void QuantizeOutputRows(Job& job, int64_t r0, int64_t r1) const {
    const int64_t n = w_.n, nb = num_blocks(n, out_block_);
    int* exps = ThreadScratch<int>(gemm::kSlotRowExp, static_cast<size_t>(std::max(nb, job.x_nb)));
    int8_t* codes = job.rq ? ThreadScratch<int8_t>(gemm::kSlotRow, static_cast<size_t>(n)) : nullptr;
    float* sum = job.rq ? ThreadScratch<float>(gemm::kSlotTail, static_cast<size_t>(n)) : nullptr;
    const int64_t rnb = job.rq ? num_blocks(n, residual_block_) : 0;
    try {
      for (int64_t m = r0; m < r1; ++m) {
        const float* y = job.op.y + m * n;
        if (job.rq) {  // z = BQ(y) + residual, exactly as DequantizeLinear + Add: then BQ(z)
          QuantizeRow(isa_, y, n, out_block_, out_bits_, codes, exps);
          AddResidual(codes, exps, job.rq + m * n, job.rs + m * rnb, sum);
          y = sum;
        }
        QuantizeRow(isa_, y, n, out_block_, out_bits_, job.yq + m * n, exps);
        for (int64_t b = 0; b < nb; ++b) job.ys[m * nb + b] = pow2_float(exps[b]);
      }
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      if (what.rfind("bctonnx.", 0) == 0) throw;
      Fail(what);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const PackedWeights& w = w_;
    Ort::ConstValue x = ctx.GetInput(kX);
    Ort::ConstValue xs = ctx.GetInputCount() > kXScale ? ctx.GetInput(kXScale) : Ort::ConstValue{nullptr};
    auto xinfo = x.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> xshape = xinfo.GetShape();
    if (xshape.empty() || xshape.back() != w.k)
      Fail("x " + shape_str(xshape) + " does not end in K = " + std::to_string(w.k));
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < xshape.size(); ++i) rows *= xshape[i];

    Job job;
    job.self = this;
    job.rows = rows;
    job.x_nb = num_blocks(w.k, act_block_);
    job.xf = nullptr;
    job.xq = nullptr;
    job.xs = nullptr;
    const auto xtype = xinfo.GetElementType();
    if (xtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      if (xs != nullptr) Fail("float x is quantized by the op; x_scale must be absent");
      job.xf = x.GetTensorData<float>();
    } else if (xtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
      if (xs == nullptr) Fail("int8 x needs x_scale");
      std::vector<int64_t> want = xshape;
      want.back() = job.x_nb;
      if (ShapeOf(xs) != want)
        Fail("x_scale shape " + shape_str(ShapeOf(xs)) + " does not match x " + shape_str(xshape) +
             " with act_block_size " + std::to_string(act_block_) + " (expected " +
             shape_str(want) + ")");
      job.xq = x.GetTensorData<int8_t>();
      job.xs = xs.GetTensorData<float>();
    } else {
      Fail("x must be float32 or int8");
    }

    // bias
    std::vector<float> dyn_bias;
    const float* bias = nullptr;
    if (has_bias_) {
      if (!bias_.empty()) {
        bias = bias_.data();
      } else {
        Ort::ConstValue b = ctx.GetInput(kBias);
        CheckBias(ShapeOf(b));
        dyn_bias.assign(static_cast<size_t>(w.npad), 0.0f);
        std::memcpy(dyn_bias.data(), b.GetTensorData<float>(), sizeof(float) * w.n);
        bias = dyn_bias.data();
      }
    }

    const size_t nin = ctx.GetInputCount();
    auto optional_input = [&](size_t i) {
      return nin > i ? ctx.GetInput(i) : Ort::ConstValue{nullptr};
    };
    Ort::ConstValue ymul = optional_input(kYMul);
    if (ymul != nullptr && ymul.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      Fail("y_multiplier must hold one value");
    Ort::ConstValue res = optional_input(kResidual), res_scale = optional_input(kResidualScale);
    std::vector<int64_t> yshape = xshape;
    yshape.back() = w.n;
    job.rq = nullptr;
    job.rs = nullptr;
    if (res != nullptr) {
      if (out_block_ < 1 || residual_block_ < 1)
        Fail("a residual needs out_block_size and residual_block_size");
      if (res_scale == nullptr) Fail("residual needs residual_scale");
      if (ShapeOf(res) != yshape)
        Fail("residual " + shape_str(ShapeOf(res)) + " must have y's shape " + shape_str(yshape));
      std::vector<int64_t> want = yshape;
      want.back() = num_blocks(w.n, residual_block_);
      if (ShapeOf(res_scale) != want)
        Fail("residual_scale " + shape_str(ShapeOf(res_scale)) + ", expected " + shape_str(want));
      job.rq = res.GetTensorData<int8_t>();
      job.rs = res_scale.GetTensorData<float>();
    }

    // outputs
    Ort::UnownedValue y = ctx.GetOutput(kY, yshape);
    Ort::UnownedValue yq{nullptr}, ysc{nullptr}, seg{nullptr};
    const size_t nout = ctx.GetOutputCount();
    if (nout > kYQ) yq = ctx.GetOutput(kYQ, yshape);
    if ((yq != nullptr) && out_block_ < 1) Fail("y_q needs out_block_size >= 1");
    if (yq == nullptr && res != nullptr) Fail("a residual needs the y_q output");
    if (yq != nullptr) {
      std::vector<int64_t> sshape = yshape;
      sshape.back() = num_blocks(w.n, out_block_);
      if (nout > kYScale) ysc = ctx.GetOutput(kYScale, sshape);
      if (ysc == nullptr) Fail("y_q needs the y_scale output");
    }
    if (nout > kSegments) {
      std::vector<int64_t> sshape(xshape.begin(), xshape.end() - 1);
      sshape.push_back(w.nseg);
      sshape.push_back(w.n);
      seg = ctx.GetOutput(kSegments, sshape);
    }
    if (y == nullptr && yq == nullptr && seg == nullptr) return;
    if (rows == 0) return;

    float* ydata = y != nullptr ? y.GetTensorMutableData<float>()
                                : ThreadScratch<float>(gemm::kSlotY, static_cast<size_t>(rows * w.n));
    const bool interleaved = isa_ != kAmx;
    job.sz = gemm::ActsLayout(w, interleaved, rows);
    job.buf.a = ThreadScratch<int8_t>(gemm::kSlotA, static_cast<size_t>(job.sz.a));
    job.buf.shift = ThreadScratch<int32_t>(gemm::kSlotShift, static_cast<size_t>(job.sz.shift));
    job.buf.corr = ThreadScratch<int32_t>(gemm::kSlotCorr, static_cast<size_t>(job.sz.block));
    job.buf.bscale = ThreadScratch<float>(gemm::kSlotBScale, static_cast<size_t>(job.sz.block));
    gemm::Operands& op = job.op;
    op.w = &w;
    op.x.a = job.buf.a;
    op.x.lda = job.sz.lda;
    op.x.tile_bytes = job.sz.tile_bytes;
    op.x.shift = job.buf.shift;
    op.x.corr = job.buf.corr;
    op.x.bscale = job.buf.bscale;
    op.x.interleaved = interleaved;
    op.rows = rows;
    op.bias = bias;
    op.ymul = ymul != nullptr ? ymul.GetTensorData<float>() : nullptr;
    op.y = ydata;
    op.ldy = w.n;
    op.amx_emulated = amx_emulated_;
    job.yq = yq != nullptr ? yq.GetTensorMutableData<int8_t>() : nullptr;
    job.ys = ysc != nullptr ? ysc.GetTensorMutableData<float>() : nullptr;

    // Enough rows: whole-row tasks (a multiple of every ISA's row tile), each doing all three
    // steps below.
    const int64_t row_tile = gemm::RowTile(isa_);
    if (rows >= 2 * kMinRowsPerTask && seg == nullptr) {
      int64_t chunk = std::clamp<int64_t>(rows / 8, kMinRowsPerTask, kMaxRowsPerTask);
      job.row_chunk = (chunk + 15) / 16 * 16;
      Parallel(ctx, &RowsTask, (rows + job.row_chunk - 1) / job.row_chunk, &job);
      if (!job.error.empty()) throw std::runtime_error(job.error);
      return;
    }
    // 1. activations (rows in chunks), 2. the product, 3. optional output quantization
    job.row_chunk = 16;
    const int64_t pack_tasks = (rows + job.row_chunk - 1) / job.row_chunk;
    Parallel(ctx, &RowChunkTask<&BlockMatMulKernel::PackRows>, pack_tasks, &job);
    if (!job.error.empty()) throw std::runtime_error(job.error);
    if (seg != nullptr) gemm::SegmentSums(op, seg.GetTensorMutableData<int32_t>());
    if (y == nullptr && yq == nullptr) return;

    job.row_chunk = std::max<int64_t>(row_tile, std::min<int64_t>(64, (rows + row_tile - 1) / row_tile * row_tile));
    job.col_tiles = (w.npanel + gemm::PanelTile(isa_) - 1) / gemm::PanelTile(isa_);
    const int64_t row_chunks = (rows + job.row_chunk - 1) / job.row_chunk;
    Parallel(ctx, &MatMulTask, row_chunks * job.col_tiles, &job);
    if (!job.error.empty()) throw std::runtime_error(job.error);

    if (job.yq != nullptr) {
      job.row_chunk = 16;
      Parallel(ctx, &RowChunkTask<&BlockMatMulKernel::QuantizeOutputRows>, (rows + 15) / 16, &job);
      if (!job.error.empty()) throw std::runtime_error(job.error);
    }
  }

  static void Parallel(Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t total,
                       Job* job) {
    if (total <= 0) return;
    if (total == 1) {
      fn(job, 0);
      return;
    }
    ctx.ParallelFor(fn, static_cast<size_t>(total), 0, job);
  }

  Isa isa_ = kScalar;
  bool amx_emulated_ = false;
  int64_t act_block_ = 0, out_block_ = 0, residual_block_ = 0;
  int act_bits_ = 8, out_bits_ = 8;
  bool has_bias_ = false;
  std::vector<float> bias_;
  PackedWeights w_;
  int64_t nm_n_ = 0, nm_m_ = 0;
};

struct BlockMatMulOp : Ort::CustomOpBase<BlockMatMulOp, BlockMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<BlockMatMulKernel>(api, info, kernel);
  }
  const char* GetName() const { return "BlockMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kXScale:
      case kBias:
      case kYMul:
      case kResidualScale:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case kScaleBase:
      case kResidual:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default:  // x: float | int8; codes, scales, zero points, N:M patterns: int8|int4|uint4
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (i == kX || i == kCodes || i == kScales) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    switch (i) {
      case kYQ:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case kSegments:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

void AddBlockMatMulOp(Ort::CustomOpDomain& domain) {
  static BlockMatMulOp op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
