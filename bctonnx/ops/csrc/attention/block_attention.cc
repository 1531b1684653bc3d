// BlockAttention (domain "bctonnx", version 1): one attention of an encoder layer in integers,
// fused: the scores Q.K^T (the block GEMM, gemm.h), their quantization, IntSoftmax
// (nonlinear/softmax.h) and the context P.V (pv.h), per (batch, head) in one task, the scores
// and probabilities never leaving the thread's cache. The specification is
// bctonnx/ops/ref_attention.py's block_attention: the composition of BlockBatchMatMul,
// BlockQuantize, IntSoftmax and AttentionPV, except that the keys the mask drops take no part at
// all (their scores are zeroed before the quantization, their V rows neither count nor set a
// segment's exponent), so a sequence's output does not depend on its padding or on the other
// sequences of its batch.
//
//   BlockAttention(q, q_scale, k, k_scale, v, v_scale, mask?, y_multiplier?, key_bias?, rows?)
//     -> y, received?
//     q, k, v  int8 [b, S, h, d] codes (token-major, as the projections write them), in blocks
//              of block_size along d, with pow2 scales [b, S, h, ceil(d / block_size)]
//     mask     float, broadcastable to [b, 1, S, S] with every query row the same (exports
//              expand BERT's [b, 1, 1, S] to [b, 1, S, S]; checked): 0 keeps a key, < -1000
//              drops it
//     key_bias float [b or 1, 1, 1, S or 1], added to every query row's scores (after
//              y_multiplier, before the quantization): token dropping's log weights
//     rows     uint8, b x S values ([b, 1, 1, S] or [b, S]): query-row weights for received
//     y        float [b, S, h, d]
//     received int32 [b, S]: sum over heads and query rows r of rows[b, r] * p[b, h, r, key],
//              the attention each key received (needs rows), which passes/token_drop.py ranks
//              tokens by: the probabilities are no tensor once fused
//   attributes: block_size, score_block_size (32), segment (32), p_exponent (-8),
//     q_heads_first, k_heads_first, v_heads_first (0): with 1 that operand and its scales come
//     [b, h, S, d] instead (as some exporters leave K),
//     num_heads (0): h > 0 takes q, k, v as the projections write them, [b, S, h * d], scales
//     [b, S, h * d / B] (B divides every head width), and writes y [b, S, h * dv]: the same
//     bytes as the rank-4 form, without Reshape nodes around the op (no heads_first operand)
#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../matmul/gemm.h"
#include "../nonlinear/softmax.h"
#include "../platform.h"
#include "../quantize_row.h"
#include "pv.h"
#include "scores.h"

namespace bct {
namespace {

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.BlockAttention: " + what);
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) {
  return v.GetTensorTypeAndShapeInfo().GetShape();
}

struct BlockAttentionKernel {
  BlockAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    const Attributes attrs(info, "BlockAttention");
    block_ = attrs.Int("block_size", 1, 4096);
    score_block_ = attrs.Int("score_block_size", 1, 4096, 32);
    seg_ = attrs.Int("segment", 2, pv::kMaxSegment, 32);
    if (seg_ % 2) Fail("segment must be even, in 2..256, got " + std::to_string(seg_));
    p_exp_ = static_cast<int>(attrs.Int("p_exponent", -32, 0, -8));
    heads_first_[0] = attrs.Bool("q_heads_first", false);
    heads_first_[1] = attrs.Bool("k_heads_first", false);
    heads_first_[2] = attrs.Bool("v_heads_first", false);
    num_heads_ = attrs.Int("num_heads", 0, 4096, 0);
    if (num_heads_ > 0 && (heads_first_[0] || heads_first_[1] || heads_first_[2]))
      Fail("num_heads > 0 takes token-major operands only (no *_heads_first)");
    check_one_value_if_constant(attrs, 7, "y_multiplier");
    if (has_output(info, 1) && !has_input(info, 9)) Fail("the received output needs the rows input");
    if (has_input(info, 9) && !has_output(info, 1)) Fail("rows without the received output");
    try {
      isa_ = std::min(ChooseIsa(), kAvx512);  // (AMX does not pay for K = head dim)
    } catch (const std::runtime_error& e) {
      Fail(e.what());
    }
    softmax_path_ = nl::softmax_path(isa_, score_block_);
  }

  struct Job {
    const BlockAttentionKernel* self;
    const int8_t *q, *k, *v;
    const float *qs, *ks, *vs, *ymul;
    const float* mask;     // [b or 1][S or 1] key values, or null
    const float* bias = nullptr;  // key_bias [b or 1][S or 1], or null
    int64_t bias_b = 0, bias_s = 0;
    const uint8_t* rows = nullptr;  // [b][S] query-row weights, or null
    int32_t* received = nullptr;    // [b][h][S] per-head partial sums (with rows)
    int64_t mask_b = 0, mask_s = 0, mask_stride = 0;  // batches, keys, floats per batch
    const uint8_t* keep;   // [b][S] kept keys, or null
    float* y;
    int64_t b, s, h, d, dv, nb, nbv;
    bool fast_scores = false;  // steps 1-2 by attention/scores.h
    // row r of head (b, hh) of operand i (q, k, v) is at (base + r * stride) * width
    int64_t Base(int i, int64_t bi, int64_t hh) const {
      return self->heads_first_[i] ? (bi * h + hh) * s : bi * s * h + hh;
    }
    int64_t Stride(int i) const { return self->heads_first_[i] ? 1 : h; }
  };

  // The thread's scratch for one head.
  struct HeadScratch {
    gemm::PackedWeights w;
    std::vector<int8_t> a, codes;
    std::vector<int32_t> shift, corr;
    std::vector<float> bscale, scores;
    std::vector<int> exps;
    std::vector<int16_t> ex;
    std::vector<uint8_t> p;
  };

  void RunHead(const Job& job, int64_t bh) const {
    const int64_t b = bh / job.h, hh = bh % job.h, s = job.s, d = job.d;
    thread_local HeadScratch tls;
    HeadScratch& sc = tls;
    const int64_t nbs = num_blocks(s, score_block_);
    sc.codes.resize(static_cast<size_t>(s * s));
    sc.ex.resize(static_cast<size_t>(s * nbs + 16));  // + 16: the softmax's gathers
    const uint8_t* keep = job.keep ? job.keep + b * s : nullptr;
    if (job.fast_scores) {  // steps 1-2 fused (attention/scores.h), same result
      attn::ScoresArgs sa;
      const int64_t qb = job.Base(0, b, hh), kb = job.Base(1, b, hh);
      sa.q = job.q + qb * d;
      sa.q_row = job.Stride(0) * d;
      sa.qs = job.qs + qb * job.nb;
      sa.qs_row = job.Stride(0) * job.nb;
      sa.k = job.k + kb * d;
      sa.k_row = job.Stride(1) * d;
      sa.ks = job.ks + kb * job.nb;
      sa.ks_row = job.Stride(1) * job.nb;
      sa.s = s;
      sa.d = d;
      sa.block = block_;
      sa.ymul = job.ymul;
      if (job.bias) {
        sa.bias = job.bias + (job.bias_b == 1 ? 0 : b) * job.bias_s;
        sa.bias_s = job.bias_s;
      }
      sa.keep = keep;
      sa.codes = sc.codes.data();
      sa.ex = sc.ex.data();
      attn::ScoresAvx512(sa);
    } else {
      Scores(job, b, hh, keep, sc);
    }
    Rest(job, b, hh, keep, sc);
  }

  // Steps 1-2, the general path: Q.K^T by the block GEMM, then each row's BlockQuantize.
  void Scores(const Job& job, int64_t b, int64_t hh, const uint8_t* keep, HeadScratch& sc) const {
    const int64_t s = job.s, d = job.d;
    // 1. scores = Q.K^T (ref_matmul.block_batch_matmul): K's rows as the GEMM's weights
    gemm::PackedWeights& w = sc.w;
    gemm::ShapeWeights(d, s, block_, block_, false, isa_, &w);
    const int64_t kb = job.Base(1, b, hh), kst = job.Stride(1);
    gemm::PackRowsAsWeights(job.k + kb * d, kst * d, job.ks + kb * job.nb, kst * job.nb, &w);
    const gemm::ActsSizes sz = gemm::ActsLayout(w, true, s);
    sc.a.resize(static_cast<size_t>(sz.a));
    sc.shift.resize(static_cast<size_t>(sz.shift));
    sc.corr.resize(static_cast<size_t>(sz.block));
    sc.bscale.resize(static_cast<size_t>(sz.block));
    sc.exps.resize(static_cast<size_t>(std::max(s * job.nb, num_blocks(s, score_block_))));
    const gemm::ActsBuffers buf{sc.a.data(), sc.shift.data(), sc.corr.data(), sc.bscale.data()};
    int* exps = sc.exps.data();
    const int64_t qb = job.Base(0, b, hh), qst = job.Stride(0);
    for (int64_t r = 0; r < s; ++r)
      for (int64_t j = 0; j < job.nb; ++j)
        exps[r * job.nb + j] = pow2_exponent(job.qs[(qb + r * qst) * job.nb + j]);
    gemm::PackActRows(w, sz, true, isa_, job.q + qb * d, qst * d, exps, job.nb, 0, s, buf);
    gemm::PackActPadding(w, sz, true, s, buf);
    sc.scores.resize(static_cast<size_t>(s * s));
    gemm::Operands op;
    op.w = &w;
    op.x = gemm::PackedActs{buf.a, sz.lda, sz.tile_bytes, buf.shift, buf.corr, buf.bscale, true};
    op.rows = s;
    op.ymul = job.ymul;
    op.y = sc.scores.data();
    op.ldy = s;
    gemm::Gemm(isa_, op, 0, s, 0, w.npanel);

    // (key_bias: one add per score, before anything else sees them)
    if (job.bias) {
      const float* kb_row = job.bias + (job.bias_b == 1 ? 0 : b) * job.bias_s;
      for (int64_t r = 0; r < s; ++r) {
        float* row = sc.scores.data() + r * s;
        if (job.bias_s == 1)
          for (int64_t c = 0; c < s; ++c) row[c] += kb_row[0];
        else
          for (int64_t c = 0; c < s; ++c) row[c] += kb_row[c];
      }
    }

    // 2. dropped keys' scores to 0, then BlockQuantize(scores, score_block_size)
    const int64_t nbs = num_blocks(s, score_block_);
    // the first dropped key, if any (padding is at the end; a batch's longest sequences drop none)
    const int64_t dropped_from = keep ? std::find(keep, keep + s, uint8_t{0}) - keep : s;
    const bool drops = dropped_from < s;
    for (int64_t r = 0; r < s; ++r) {
      float* row = sc.scores.data() + r * s;
      if (drops)
        for (int64_t c = dropped_from; c < s; ++c)
          if (!keep[c]) row[c] = 0.0f;
      QuantizeRow(isa_, row, s, score_block_, 8, sc.codes.data() + r * s, exps);
      for (int64_t j = 0; j < nbs; ++j) sc.ex[r * nbs + j] = static_cast<int16_t>(exps[j]);
    }
  }

  // Steps 3-5: IntSoftmax, P.V and the attention received.
  void Rest(const Job& job, int64_t b, int64_t hh, const uint8_t* keep, HeadScratch& sc) const {
    const int64_t s = job.s, h = job.h, bh = b * h + hh;
    const int64_t nbs = num_blocks(s, score_block_);

    // 3. IntSoftmax with the mask (one mask row for the head's rows)
    nl::Blocking bl;
    bl.rows = s;
    bl.d = s;
    bl.b = score_block_;
    bl.nb = nbs;
    nl::MaskRows& mr = nl::mask_rows_buffer();
    Dims xshape;
    xshape.n = 2;
    xshape[0] = s;
    xshape[1] = s;
    if (job.mask) {
      Dims ms;
      ms.n = 2;
      ms[0] = 1;
      ms[1] = job.mask_s;
      nl::build_mask(bl, xshape, &ms, job.mask + (job.mask_b == 1 ? 0 : b) * job.mask_stride, mr);
    } else {
      nl::build_mask(bl, xshape, nullptr, nullptr, mr);
    }
    sc.p.resize(static_cast<size_t>(s * s));
    nl::softmax_rows(bl, sc.codes.data(), sc.ex.data(), mr, softmax_path_, sc.p.data(), 0, s);

    // 4. context = P.V (ref_attention.attention_pv, dropped tokens out), heads token-major
    const pv::PvDims dm = pv::MakeDims(s, s, job.dv, block_, seg_, p_exp_);
    pv::PreparedV prepared = pv::HeadScratch(dm);
    const int64_t vb = job.Base(2, b, hh), vst = job.Stride(2);
    pv::PrepareV(isa_, dm, job.v + vb * job.dv, vst * job.dv, job.vs + vb * job.nbv, vst * job.nbv, keep,
                 &prepared);
    const pv::RowOut out{job.y + (b * s * h + hh) * job.dv, h * job.dv};  // token-major
    pv::Head(isa_, dm, sc.p.data(), prepared, out);

    // 5. received: this head's sum over the chosen query rows (exact in int32)
    if (job.received) {
      int32_t* acc = job.received + bh * s;
      std::fill(acc, acc + s, 0);
      const uint8_t* wr = job.rows + b * s;
      for (int64_t r = 0; r < s; ++r) {
        const int32_t wgt = wr[r];
        if (!wgt) continue;
        const uint8_t* pr = sc.p.data() + r * s;
        for (int64_t c = 0; c < s; ++c) acc[c] += wgt * static_cast<int32_t>(pr[c]);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return status_of([&] { Compute(raw); });
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const size_t nin = ctx.GetInputCount();
    auto input = [&](size_t i) { return nin > i ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    Ort::ConstValue q = input(0), qs = input(1), k = input(2), ks = input(3), v = input(4),
                    vs = input(5), mask = input(6), ymul = input(7), kbias = input(8),
                    rows = input(9);
    // every operand checked as the token-major [b, S, h, .] tensor it stands for
    std::vector<int64_t> qsh = ShapeOf(q), ksh = ShapeOf(k), vsh = ShapeOf(v);
    std::vector<int64_t> qssh = ShapeOf(qs), kssh = ShapeOf(ks), vssh = ShapeOf(vs);
    std::vector<int64_t>* shapes[3][2] = {{&qsh, &qssh}, {&ksh, &kssh}, {&vsh, &vssh}};
    for (int i = 0; i < 3; ++i)
      for (std::vector<int64_t>* sh : shapes[i]) {
        if (num_heads_ > 0) {  // [b, S, h * w] read as [b, S, h, w]
          if (sh->size() != 3 || (*sh)[2] % num_heads_)
            Fail("with num_heads " + std::to_string(num_heads_) + ", q, k, v and their scales must be [b, S, h * w], got " + shape_str(*sh));
          const int64_t w = (*sh)[2] / num_heads_;
          *sh = {(*sh)[0], (*sh)[1], num_heads_, w};
          continue;
        }
        if (sh->size() != 4) Fail("q, k, v and their scales must have rank 4, got " + shape_str(*sh));
        if (heads_first_[i]) std::swap((*sh)[1], (*sh)[2]);
      }
    if (ksh != qsh) Fail("k " + shape_str(ksh) + " must have q's shape " + shape_str(qsh));
    if (!std::equal(vsh.begin(), vsh.end() - 1, qsh.begin()))
      Fail("v " + shape_str(vsh) + " must be [b, S, h, .] as q " + shape_str(qsh));
    Job job;
    job.self = this;
    job.b = qsh[0];
    job.s = qsh[1];
    job.h = qsh[2];
    job.d = qsh[3];
    job.dv = vsh[3];
    if (job.d % block_) Fail("block_size must divide d = " + std::to_string(job.d));
    job.nb = job.d / block_;
    job.fast_scores = attn::FastScoresApply(isa_, job.d, block_, score_block_);
    job.nbv = num_blocks(job.dv, block_);
    if (num_heads_ > 0 && job.dv % block_)
      Fail("with num_heads, block_size must divide v's head width " + std::to_string(job.dv));
    for (auto [got, shape, nb, name] :
         {std::tuple{&qssh, qsh, job.nb, "q_scale"}, std::tuple{&kssh, ksh, job.nb, "k_scale"},
          std::tuple{&vssh, vsh, job.nbv, "v_scale"}}) {
      std::vector<int64_t> want = shape;
      want.back() = nb;
      if (*got != want) Fail(std::string(name) + " must match " + shape_str(want) + ", got " + shape_str(*got));
    }
    if (ymul != nullptr && ymul.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      Fail("y_multiplier must hold one value");
    std::vector<uint8_t> keep;
    job.mask = nullptr;
    job.keep = nullptr;
    if (mask != nullptr) {  // a key mask [b or 1, 1, S or 1, S or 1], validated here
      std::vector<int64_t> ms = ShapeOf(mask);
      if (ms.size() > 4) Fail("mask rank above 4");
      ms.insert(ms.begin(), 4 - ms.size(), 1);
      if (ms[1] != 1 || (ms[0] != 1 && ms[0] != job.b) || (ms[2] != 1 && ms[2] != job.s) ||
          (ms[3] != 1 && ms[3] != job.s))
        Fail("mask " + shape_str(ShapeOf(mask)) + " is not a key mask [b, 1, 1 or S, S]");
      const float* md = mask.GetTensorData<float>();
      const int64_t row = ms[3], per_batch = ms[2] * row;
      for (int64_t bi = 0; bi < ms[0]; ++bi)  // every query row as the first (an expanded mask)
        for (int64_t r = 1; r < ms[2]; ++r)
          if (std::memcmp(md + bi * per_batch + r * row, md + bi * per_batch, sizeof(float) * row))
            Fail("the mask differs between query rows: BlockAttention takes one value per key");
      ms[2] = 1;
      job.mask = md;
      job.mask_b = ms[0];
      job.mask_s = ms[3];
      job.mask_stride = per_batch;
      keep.assign(static_cast<size_t>(job.b * job.s), 0);
      for (int64_t bi = 0; bi < job.b; ++bi)
        for (int64_t c = 0; c < job.s; ++c) {
          const float m = md[(ms[0] == 1 ? 0 : bi) * per_batch + (ms[3] == 1 ? 0 : c)];
          if (!(m == 0.0f || m < -1000.0f))
            Fail("mask values must be 0 or < -1000 (an additive attention mask), got " +
                 std::to_string(m));
          keep[bi * job.s + c] = m == 0.0f;
        }
      job.keep = keep.data();
    }
    job.q = q.GetTensorData<int8_t>();
    job.k = k.GetTensorData<int8_t>();
    job.v = v.GetTensorData<int8_t>();
    job.qs = qs.GetTensorData<float>();
    job.ks = ks.GetTensorData<float>();
    job.vs = vs.GetTensorData<float>();
    job.ymul = ymul != nullptr ? ymul.GetTensorData<float>() : nullptr;
    if (kbias != nullptr) {  // [b or 1, 1, 1, S or 1]
      std::vector<int64_t> bs = ShapeOf(kbias);
      if (bs.size() > 4) Fail("key_bias rank above 4");
      bs.insert(bs.begin(), 4 - bs.size(), 1);
      if (bs[1] != 1 || bs[2] != 1 || (bs[0] != 1 && bs[0] != job.b) ||
          (bs[3] != 1 && bs[3] != job.s))
        Fail("key_bias " + shape_str(ShapeOf(kbias)) + " is not one value per key [b, 1, 1, S]");
      job.bias = kbias.GetTensorData<float>();
      job.bias_b = bs[0];
      job.bias_s = bs[3];
    }
    const bool want_received = ctx.GetOutputCount() > 1;
    if (want_received && rows == nullptr) Fail("the received output needs the rows input");
    if (rows != nullptr) {
      if (static_cast<int64_t>(rows.GetTensorTypeAndShapeInfo().GetElementCount()) != job.b * job.s)
        Fail("rows " + shape_str(ShapeOf(rows)) + " must hold b x S values");
      job.rows = rows.GetTensorData<uint8_t>();
    }
    Ort::UnownedValue y =
        ctx.GetOutput(0, num_heads_ > 0 ? std::vector<int64_t>{vsh[0], vsh[1], vsh[2] * vsh[3]} : vsh);
    job.y = y.GetTensorMutableData<float>();
    std::vector<int32_t> partial;
    Ort::UnownedValue received{nullptr};
    if (want_received) {
      received = ctx.GetOutput(1, std::vector<int64_t>{job.b, job.s});
      partial.assign(static_cast<size_t>(job.b * job.h * job.s), 0);
      job.received = partial.data();
    }
    const int64_t heads = job.b * job.h;
    if (heads * job.s * job.dv == 0) {
      if (want_received) std::fill_n(received.GetTensorMutableData<int32_t>(), job.b * job.s, 0);
      return;
    }
    const std::string error = run_tasks(ctx, static_cast<size_t>(heads), [&](size_t i) {
      RunHead(job, static_cast<int64_t>(i));
    });
    if (!error.empty()) {
      if (error.rfind("bctonnx.", 0) == 0) throw std::runtime_error(error);
      Fail(error);
    }
    if (want_received) {  // the heads' partial sums, in integers: any order is exact
      int32_t* out = received.GetTensorMutableData<int32_t>();
      for (int64_t bi = 0; bi < job.b; ++bi) {
        int32_t* o = out + bi * job.s;
        std::copy_n(partial.data() + bi * job.h * job.s, job.s, o);
        for (int64_t hh = 1; hh < job.h; ++hh) {
          const int32_t* src = partial.data() + (bi * job.h + hh) * job.s;
          for (int64_t c = 0; c < job.s; ++c) o[c] += src[c];
        }
      }
    }
  }

  Isa isa_ = kScalar;
  nl::SoftmaxPath softmax_path_ = nl::SoftmaxPath::kPortable;
  bool heads_first_[3] = {false, false, false};
  int64_t num_heads_ = 0;
  int64_t block_ = 0, score_block_ = 32, seg_ = 32;
  int p_exp_ = -8;
};

struct BlockAttentionOp : Ort::CustomOpBase<BlockAttentionOp, BlockAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel<BlockAttentionKernel>(api, info, kernel);
  }
  const char* GetName() const { return "BlockAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 9) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    return (i == 0 || i == 2 || i == 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
                                        : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

void AddBlockAttentionOp(Ort::CustomOpDomain& domain) {
  static BlockAttentionOp op;  // lives as long as the process (sessions keep raw pointers)
  domain.Add(&op);
}

}  // namespace bct
