// BlockBatchMatMul(a: int8 [..., M, K], a_scale, b: int8 [..., N, K], b_scale, y_multiplier?)
//   -> (y?, y_q?, y_scale?): y = a @ b^T per batch, both operands block-quantized along K with
// the same block size (attention scores Q.K^T; ref_matmul.block_batch_matmul). b is packed per
// batch at run time as the GEMM's weights (its pow2 scales as the weight scales), a as its
// activations, then the block GEMM runs unchanged (gemm.h).
// a_transposed / b_transposed (rank 4): that operand and its scales come token-major,
// [b, M, h, K] / [b, N, h, K] -- attention's heads Transpose(0, 2, 1, 3) fused into the reads.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>

#include "../common.h"
#include "../quantize_row.h"
#include "gemm.h"

namespace bct {
namespace {

using gemm::kPanel;
using gemm::PackedWeights;

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.BlockBatchMatMul: " + what);
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetShape();
}

struct BlockBatchMatMulKernel {
  BlockBatchMatMulKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    const Attributes attrs(raw_info, "BlockBatchMatMul");
    block_ = attrs.Int("block_size", 1, kMaxBlockSize);
    out_block_ = attrs.Int("out_block_size", 0, kMaxBlockSize, 0);
    out_bits_ = static_cast<int>(attrs.Int("out_bits", 2, 8, 8));
    a_t_ = attrs.Bool("a_transposed", false);
    b_t_ = attrs.Bool("b_transposed", false);
    check_quantized_outputs(attrs, 1, 2, out_block_);
    check_one_value_if_constant(attrs, 4, "y_multiplier");
    // at most avx512: AMX does not pay here (attention scores of MiniLM, 12 heads of 128 x 128
    // x 32 per layer: 1.28 ms/run against 1.23 on avx512, one thread, measured on a Xeon)
    try {
      isa_ = std::min(ChooseIsa(), kAvx512);
    } catch (const std::runtime_error& e) {
      Fail(e.what());
    }
  }

  struct Job {
    const int8_t *a, *b;
    const float *as, *bs, *ymul;
    float* y;
    int8_t* yq;
    float* ys;
    int64_t m, n, k, nb, out_nb;
    int64_t heads = 1;  // h of rank-4 operands (token-major layouts)
  };

  // Row r of batch bi = (b, h) of an operand with R rows and `width` values per row: offset
  // and row stride, in the standard [b, h, R, width] or the token-major [b, R, h, width] layout.
  static int64_t RowBase(const Job& job, bool token_major, int64_t bi, int64_t rows,
                         int64_t width) {
    if (!token_major) return bi * rows * width;
    const int64_t b = bi / job.heads, h = bi % job.heads;
    return (b * rows * job.heads + h) * width;
  }
  static int64_t RowStride(const Job& job, bool token_major, int64_t width) {
    return token_major ? job.heads * width : width;
  }

  struct BatchScratch {
    PackedWeights w;
    std::vector<int8_t> a;
    std::vector<int32_t> shift, corr;
    std::vector<float> bscale, yscratch;
    std::vector<int> exps;
  };

  void RunBatch(Job& job, int64_t bi) const {
    const int64_t m = job.m, n = job.n, k = job.k, nb = job.nb;
    // per-thread storage reused across batches and runs, its address taken once (every use of
    // a thread_local in a shared library is a __tls_get_addr call otherwise)
    thread_local BatchScratch tls;
    BatchScratch& sc = tls;
    PackedWeights& w = sc.w;
    gemm::ShapeWeights(k, n, block_, block_, false, isa_, &w);
    const int8_t* b = job.b + RowBase(job, b_t_, bi, n, k);
    const float* bs = job.bs + RowBase(job, b_t_, bi, n, nb);
    gemm::PackRowsAsWeights(b, RowStride(job, b_t_, k), bs, RowStride(job, b_t_, nb), &w);
    // a -> packed activations
    const bool interleaved = true;
    const gemm::ActsSizes sz = gemm::ActsLayout(w, interleaved, m);
    sc.a.resize(static_cast<size_t>(sz.a));
    sc.shift.resize(static_cast<size_t>(sz.shift));
    sc.corr.resize(static_cast<size_t>(sz.block));
    sc.bscale.resize(static_cast<size_t>(sz.block));
    sc.exps.resize(static_cast<size_t>(m * nb));
    const gemm::ActsBuffers buf{sc.a.data(), sc.shift.data(), sc.corr.data(), sc.bscale.data()};
    const int8_t* ab = job.a + RowBase(job, a_t_, bi, m, k);
    const float* as = job.as + RowBase(job, a_t_, bi, m, nb);
    const int64_t a_row = RowStride(job, a_t_, k), as_row = RowStride(job, a_t_, nb);
    int* exps = sc.exps.data();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nb; ++j) exps[r * nb + j] = pow2_exponent(as[r * as_row + j]);
    gemm::PackActRows(w, sz, interleaved, isa_, ab, a_row, exps, nb, 0, m, buf);
    gemm::PackActPadding(w, sz, interleaved, m, buf);
    float* y = job.y ? job.y + bi * m * n : nullptr;
    if (!y) {
      sc.yscratch.resize(static_cast<size_t>(m * n));
      y = sc.yscratch.data();
    }
    gemm::Operands op;
    op.w = &w;
    op.x.a = buf.a;
    op.x.lda = sz.lda;
    op.x.tile_bytes = sz.tile_bytes;
    op.x.shift = buf.shift;
    op.x.corr = buf.corr;
    op.x.bscale = buf.bscale;
    op.x.interleaved = interleaved;
    op.rows = m;
    op.ymul = job.ymul;
    op.y = y;
    op.ldy = n;
    gemm::Gemm(isa_, op, 0, m, 0, w.npanel);
    if (job.yq) {
      std::vector<int> out_exps(static_cast<size_t>(job.out_nb));
      for (int64_t r = 0; r < m; ++r) {
        const int64_t row = bi * m + r;
        QuantizeRow(isa_, y + r * n, n, out_block_, out_bits_, job.yq + row * n, out_exps.data());
        for (int64_t o = 0; o < job.out_nb; ++o)
          job.ys[row * job.out_nb + o] = pow2_float(out_exps[o]);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue a = ctx.GetInput(0), as = ctx.GetInput(1), b = ctx.GetInput(2),
                    bs = ctx.GetInput(3);
    Ort::ConstValue ymul = ctx.GetInputCount() > 4 ? ctx.GetInput(4) : Ort::ConstValue{nullptr};
    std::vector<int64_t> ash = ShapeOf(a), bsh = ShapeOf(b), assh = ShapeOf(as), bssh = ShapeOf(bs);
    if (ash.size() < 2 || bsh.size() != ash.size())
      Fail("a and b must have the same rank >= 2");
    // token-major operands are checked as the [b, h, rows, K] tensors they stand for
    for (auto [flag, shp, sshp] : {std::tuple{a_t_, &ash, &assh}, std::tuple{b_t_, &bsh, &bssh}}) {
      if (!flag) continue;
      if (shp->size() != 4 || sshp->size() != 4)
        Fail("a_transposed / b_transposed need rank-4 operands and scales");
      std::swap((*shp)[1], (*shp)[2]);
      std::swap((*sshp)[1], (*sshp)[2]);
    }
    const int64_t m = ash[ash.size() - 2], k = ash.back(), n = bsh[bsh.size() - 2];
    if (bsh.back() != k) Fail("a " + shape_str(ash) + " and b " + shape_str(bsh) + " differ in K");
    int64_t batches = 1;
    for (size_t i = 0; i + 2 < ash.size(); ++i) {
      if (ash[i] != bsh[i]) Fail("batch dims differ (no broadcasting)");
      batches *= ash[i];
    }
    if (k % block_) Fail("block_size must divide K = " + std::to_string(k));
    const int64_t nb = k / block_;
    std::vector<int64_t> want = ash;
    want.back() = nb;
    if (assh != want) Fail("a_scale must be " + shape_str(want));
    want = bsh;
    want.back() = nb;
    if (bssh != want) Fail("b_scale must be " + shape_str(want));
    if (ymul != nullptr && ymul.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      Fail("y_multiplier must hold one value");
    std::vector<int64_t> yshape = ash;
    yshape.back() = n;
    Ort::UnownedValue y = ctx.GetOutput(0, yshape);
    Ort::UnownedValue yq{nullptr}, ysc{nullptr};
    const int64_t out_nb = out_block_ ? num_blocks(n, out_block_) : 0;
    if (ctx.GetOutputCount() > 1) {
      yq = ctx.GetOutput(1, yshape);
      if (yq != nullptr) {
        if (out_block_ < 1) Fail("y_q needs out_block_size >= 1");
        std::vector<int64_t> sshape = yshape;
        sshape.back() = out_nb;
        ysc = ctx.GetOutputCount() > 2 ? ctx.GetOutput(2, sshape) : Ort::UnownedValue{nullptr};
        if (ysc == nullptr) Fail("y_q needs y_scale");
      }
    }
    Job job;
    job.a = a.GetTensorData<int8_t>();
    job.b = b.GetTensorData<int8_t>();
    job.as = as.GetTensorData<float>();
    job.bs = bs.GetTensorData<float>();
    job.ymul = ymul != nullptr ? ymul.GetTensorData<float>() : nullptr;
    job.y = y != nullptr ? y.GetTensorMutableData<float>() : nullptr;
    job.yq = yq != nullptr ? yq.GetTensorMutableData<int8_t>() : nullptr;
    job.ys = ysc != nullptr ? ysc.GetTensorMutableData<float>() : nullptr;
    job.m = m;
    job.n = n;
    job.k = k;
    job.nb = nb;
    job.out_nb = out_nb;
    job.heads = ash.size() == 4 ? ash[1] : 1;
    if ((job.y == nullptr && job.yq == nullptr) || batches * m * n == 0) return;
    const std::string error = run_tasks(ctx, static_cast<size_t>(batches), [&](size_t i) {
      RunBatch(job, static_cast<int64_t>(i));
    });
    if (!error.empty()) {
      if (error.rfind("bctonnx.", 0) == 0) throw std::runtime_error(error);
      Fail(error);
    }
  }

  Isa isa_ = kScalar;
  bool a_t_ = false, b_t_ = false;
  int64_t block_ = 0, out_block_ = 0;
  int out_bits_ = 8;
};

struct BlockBatchMatMulOp : Ort::CustomOpBase<BlockBatchMatMulOp, BlockBatchMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<BlockBatchMatMulKernel>(api, info, kernel);
  }
  const char* GetName() const { return "BlockBatchMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 0 || i == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

void AddBlockBatchMatMulOp(Ort::CustomOpDomain& domain) {
  static BlockBatchMatMulOp op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
