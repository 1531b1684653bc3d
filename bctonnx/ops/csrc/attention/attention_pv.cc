// AttentionPV (domain "bctonnx", version 1): attention's context product P.V in integers,
// uint8 probabilities (IntSoftmax's codes) times int8 V codes with per-token pow2 scales. The
// specification is bctonnx/ops/ref_attention.py; the per-head arithmetic is pv.cc's.
#include <algorithm>
#include <cstring>
#include <string>

#include "../common.h"
#include "../platform.h"
#include "pv.h"

namespace bct {
namespace {

using namespace pv;

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.AttentionPV: " + what);
}

struct AttentionPVKernel {
  AttentionPVKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, "AttentionPV");
    block_ = attrs.Int("block_size", 1, kMaxBlockSize);
    seg_ = attrs.Int("segment", 2, kMaxSegment, 32);
    if (seg_ % 2) Fail("segment must be even, in 2..256, got " + std::to_string(seg_));
    p_exp_ = static_cast<int>(attrs.Int("p_exponent", -32, 0, -8));
    transpose_ = attrs.Bool("transpose_output", false);
    v_transposed_ = attrs.Bool("v_transposed", false);
    isa_ = ChooseIsa();  // platform.h: BCTONNX_ISA included
  }

  struct Job {
    PvDims dm;
    const uint8_t* p;
    const int8_t* v;
    const float* vs;
    float* y;
    int64_t heads;  // h of rank-4 inputs [b, h, ...] (transpose_output, v_transposed)
  };

  void RunHead(const Job& job, int64_t bh) const {
    const PvDims& dm = job.dm;
    PreparedV pv = HeadScratch(dm);
    if (v_transposed_) {  // v [b, S, h, D], v_scale [b, S, h, nb]
      const int64_t b = bh / job.heads, h = bh % job.heads;
      PrepareV(isa_, dm, job.v + (b * dm.s * job.heads + h) * dm.d, job.heads * dm.d,
               job.vs + (b * dm.s * job.heads + h) * dm.nb, job.heads * dm.nb, nullptr, &pv);
    } else {
      PrepareV(isa_, dm, job.v + bh * dm.s * dm.d, dm.d, job.vs + bh * dm.s * dm.nb, dm.nb, nullptr,
               &pv);
    }
    RowOut out;
    if (transpose_) {  // [b, h, m, d] -> [b, m, h, d]
      const int64_t b = bh / job.heads, h = bh % job.heads;
      out.base = job.y + (b * dm.m * job.heads + h) * dm.d;
      out.stride = job.heads * dm.d;
    } else {
      out.base = job.y + bh * dm.m * dm.d;
      out.stride = dm.d;
    }
    const uint8_t* p = job.p + bh * dm.m * dm.s;
    Head(isa_, dm, p, pv, out);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue p = ctx.GetInput(0), v = ctx.GetInput(1), vs = ctx.GetInput(2);
    const std::vector<int64_t> psh = p.GetTensorTypeAndShapeInfo().GetShape();
    std::vector<int64_t> vsh = v.GetTensorTypeAndShapeInfo().GetShape();
    std::vector<int64_t> ssh = vs.GetTensorTypeAndShapeInfo().GetShape();
    const size_t rank = psh.size();
    if (v_transposed_) {  // check them as the [b, h, S, ...] tensors they stand for
      if (vsh.size() != 4 || ssh.size() != 4) Fail("v_transposed needs rank-4 v and v_scale");
      std::swap(vsh[1], vsh[2]);
      std::swap(ssh[1], ssh[2]);
    }
    if (rank < 2 || vsh.size() != rank || psh.back() != vsh[rank - 2] ||
        !std::equal(psh.begin(), psh.end() - 2, vsh.begin()))
      Fail("shapes of p " + shape_str(psh) + " and v " + shape_str(vsh) + " do not match");
    if ((transpose_ || v_transposed_) && rank != 4)
      Fail("transpose_output and v_transposed need rank-4 inputs");
    Job job;
    PvDims& dm = job.dm;
    dm = MakeDims(psh[rank - 2], psh.back(), vsh.back(), block_, seg_, p_exp_);
    std::vector<int64_t> want = vsh;
    want.back() = dm.nb;
    if (ssh != want) Fail("v_scale must be " + shape_str(want) + ", got " + shape_str(ssh));
    int64_t batches = 1;
    for (size_t i = 0; i + 2 < rank; ++i) batches *= psh[i];
    std::vector<int64_t> yshape(psh.begin(), psh.end() - 1);
    yshape.push_back(dm.d);
    if (transpose_) std::swap(yshape[1], yshape[2]);
    Ort::UnownedValue y = ctx.GetOutput(0, yshape);
    job.p = p.GetTensorData<uint8_t>();
    job.v = v.GetTensorData<int8_t>();
    job.vs = vs.GetTensorData<float>();
    job.y = y.GetTensorMutableData<float>();
    job.heads = rank == 4 ? psh[1] : 1;
    if (batches * dm.m * dm.d == 0) return;
    if (dm.s == 0) {
      std::fill(job.y, job.y + batches * dm.m * dm.d, 0.0f);
      return;
    }
    const std::string error = run_tasks(ctx, static_cast<size_t>(batches), [&](size_t i) {
      RunHead(job, static_cast<int64_t>(i));
    });
    if (!error.empty()) throw std::runtime_error(error);
  }

  int64_t block_ = 0, seg_ = 32;
  int p_exp_ = -8;
  bool transpose_ = false, v_transposed_ = false;
  Isa isa_ = kScalar;
};

struct AttentionPVOp : Ort::CustomOpBase<AttentionPVOp, AttentionPVKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<AttentionPVKernel>(api, info, kernel);
  }
  const char* GetName() const { return "AttentionPV"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
           : i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void AddAttentionOps(Ort::CustomOpDomain& domain) {
  static AttentionPVOp pv;
  domain.Add(&pv);
}

}  // namespace bct
