// AttentionPV (domain "bctonnx", version 1): attention's context product P.V in integers,
// uint8 probabilities (IntSoftmax's codes) times int8 V codes with per-token pow2 scales.
//
// The specification is the numpy reference bctonnx/ops/ref_attention.py ("Arithmetic"); this
// file follows it step by step. Per batch index (one attention head), V is first brought to
// one exponent per token segment and column ("w", int16, exact when the segment's scales are
// within 2^8 of each other, else rounded half to even), then every output row accumulates
// p * w in int32 per segment and adds float32(sum) * 2^(r + p_exponent) in segment order.
//
// Paths, chosen when a session creates the kernel (BCTONNX_ISA=avx512|amx|avx2|scalar caps it,
// as for BlockMatMul):
//   avx512  AVX-512 BW + VNNI: vpdpwssd on int16 pairs, p[s], p[s+1] zero-extended into one
//           dword broadcast against w[s, j], w[s+1, j] interleaved for 16 columns; register
//           tile of 4 rows x 32 columns, int32 per segment then the float32 epilogue in
//           registers. Needs an even segment (token pairs never straddle two segments).
//   scalar  portable C++, the same float32 operations in the same order.
// Heads run as tasks on the session's intra-op pool (KernelContext::ParallelFor). Both layout
// transposes around attention's P.V can be fused: v token-major (v_transposed) and the output
// token-major (transpose_output).
#include "simd.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

#include "common.h"

namespace bct {
namespace {

[[noreturn]] void Fail(const std::string& what) {
  throw std::runtime_error("bctonnx.AttentionPV: " + what);
}

constexpr int64_t kMaxSegment = 256;

// Per-thread scratch, grown and reused across runs (64-byte aligned).
template <typename T>
T* Scratch(std::vector<char>& buf, size_t count) {
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(T) + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((addr + 63) & ~uintptr_t{63});
}

struct PvDims {
  int64_t m, s, d, nb, block, seg, nseg, dpad, pairs;
  int p_exp;
};

// One head's prepared V: w as int16 pairs (tokens 2t, 2t+1) x dpad columns (zero padded), and
// the epilogue factors 2^(r + p_exponent) per segment x column.
struct PreparedV {
  int32_t* w;      // [pairs][dpad] dwords: low half w[2t, j], high half w[2t + 1, j]
  float* factor;   // [nseg][dpad]
};

// v_row / s_row: elements between consecutive tokens of v and v_scale (D and nb, or h * D and
// h * nb when the inputs come token-major, v_transposed).
void PrepareV(const PvDims& dm, const int8_t* v, int64_t v_row, const float* vs, int64_t s_row,
              PreparedV* out) {
  thread_local std::vector<int> exps;
  exps.resize(static_cast<size_t>(dm.s * dm.nb));
  for (int64_t s = 0; s < dm.s; ++s)
    for (int64_t c = 0; c < dm.nb; ++c) exps[s * dm.nb + c] = pow2_exponent(vs[s * s_row + c]);
  auto* w16 = reinterpret_cast<int16_t*>(out->w);
  std::memset(out->w, 0, sizeof(int32_t) * dm.pairs * dm.dpad);
  std::fill(out->factor, out->factor + dm.nseg * dm.dpad, 0.0f);
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t s0 = g * dm.seg, s1 = std::min(s0 + dm.seg, dm.s);
    for (int64_t c = 0; c < dm.nb; ++c) {
      int emax = -100000;
      for (int64_t s = s0; s < s1; ++s) emax = std::max(emax, exps[s * dm.nb + c]);
      const int r = std::max(emax - 8, -149 - dm.p_exp);
      const int64_t j0 = c * dm.block, j1 = std::min(j0 + dm.block, dm.d);
      const float f = pow2_float(r + dm.p_exp);
      for (int64_t j = j0; j < j1; ++j) out->factor[g * dm.dpad + j] = f;
      for (int64_t s = s0; s < s1; ++s) {
        const int shift = r - exps[s * dm.nb + c];  // <= 0: left shift by up to 8
        for (int64_t j = j0; j < j1; ++j)
          w16[((s >> 1) * dm.dpad + j) * 2 + (s & 1)] =
              static_cast<int16_t>(shift_round_even(v[s * v_row + j], shift));
      }
    }
  }
}

// y row pointer for output row m of this head; columns contiguous.
struct RowOut {
  float* base;
  int64_t stride;  // between rows m
  float* row(int64_t m) const { return base + m * stride; }
};

void ScalarHead(const PvDims& dm, const uint8_t* p, const PreparedV& pv, const RowOut& out) {
  const auto* w16 = reinterpret_cast<const int16_t*>(pv.w);
  for (int64_t m = 0; m < dm.m; ++m) {
    float* y = out.row(m);
    for (int64_t j = 0; j < dm.d; ++j) y[j] = 0.0f;
    for (int64_t g = 0; g < dm.nseg; ++g) {
      const int64_t s0 = g * dm.seg, s1 = std::min(s0 + dm.seg, dm.s);
      for (int64_t j = 0; j < dm.d; ++j) {
        int32_t a = 0;
        for (int64_t s = s0; s < s1; ++s)
          a += static_cast<int32_t>(p[m * dm.s + s]) *
               static_cast<int32_t>(w16[((s >> 1) * dm.dpad + j) * 2 + (s & 1)]);
        y[j] = y[j] + static_cast<float>(a) * pv.factor[g * dm.dpad + j];
      }
    }
  }
}

// p rows as dword pairs (p[2t] | p[2t+1] << 16), zero padded to `pairs`.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void PairRows(const PvDims& dm, const uint8_t* p,
                                                           int64_t m0, int64_t rows,
                                                           int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = p + (m0 + r) * dm.s;
    int32_t* dst = out + r * dm.pairs;
    int64_t s = 0;
    for (; s + 32 <= dm.s; s += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + s));
      _mm512_storeu_si512(dst + s / 2, _mm512_cvtepu8_epi16(b));
    }
    if (s < dm.s) {
      const __mmask32 k = (dm.s - s) >= 32 ? ~0u : ((1u << (dm.s - s)) - 1u);
      const __m256i b = _mm256_maskz_loadu_epi8(k, src + s);
      const __m512i wide = _mm512_cvtepu8_epi16(b);
      const int64_t left = dm.pairs - s / 2;  // dwords still to write (<= 16)
      _mm512_mask_storeu_epi32(dst + s / 2, static_cast<__mmask16>((1u << left) - 1u), wide);
    }
  }
}

// MR rows x 2 column vectors (32 columns), one segment loop; cols = valid columns in the
// 32-wide tile, for the masked store.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void Tile(const PvDims& dm,
                                                                 const int32_t* prow,
                                                                 const PreparedV& pv,
                                                                 int64_t j0, int nv,
                                                                 __mmask16 mask_last,
                                                                 float** yrows) {
  __m512 y[MR][2];
  for (int r = 0; r < MR; ++r) y[r][0] = y[r][1] = _mm512_setzero_ps();
  const int64_t seg_pairs = dm.seg / 2;
  for (int64_t g = 0; g < dm.nseg; ++g) {
    const int64_t t0 = g * seg_pairs, t1 = std::min(t0 + seg_pairs, dm.pairs);
    __m512i a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    const int32_t* wp = pv.w + t0 * dm.dpad + j0;
    for (int64_t t = t0; t < t1; ++t, wp += dm.dpad) {
      const __m512i w0 = _mm512_loadu_si512(wp);
      const __m512i w1 = nv > 1 ? _mm512_loadu_si512(wp + 16) : _mm512_setzero_si512();
      for (int r = 0; r < MR; ++r) {
        const __m512i pr = _mm512_set1_epi32(prow[r * dm.pairs + t]);
        a[r][0] = _mm512_dpwssd_epi32(a[r][0], pr, w0);
        if (nv > 1) a[r][1] = _mm512_dpwssd_epi32(a[r][1], pr, w1);
      }
    }
    const float* f = pv.factor + g * dm.dpad + j0;
    const __m512 f0 = _mm512_loadu_ps(f);
    const __m512 f1 = nv > 1 ? _mm512_loadu_ps(f + 16) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      y[r][0] = _mm512_add_ps(y[r][0], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][0]), f0));
      if (nv > 1)
        y[r][1] = _mm512_add_ps(y[r][1], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][1]), f1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* dst = yrows[r] + j0;
    if (nv == 1) {
      _mm512_mask_storeu_ps(dst, mask_last, y[r][0]);
    } else {
      _mm512_storeu_ps(dst, y[r][0]);
      _mm512_mask_storeu_ps(dst + 16, mask_last, y[r][1]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void Avx512Head(const PvDims& dm,
                                                                       const uint8_t* p,
                                                                       const PreparedV& pv,
                                                                       const RowOut& out) {
  constexpr int kMR = 4;
  thread_local std::vector<char> pbuf;
  int32_t* prow = Scratch<int32_t>(pbuf, static_cast<size_t>(kMR * dm.pairs));
  for (int64_t m0 = 0; m0 < dm.m; m0 += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, dm.m - m0));
    PairRows(dm, p, m0, rows, prow);
    float* yrows[kMR];
    for (int r = 0; r < rows; ++r) yrows[r] = out.row(m0 + r);
    for (int64_t j0 = 0; j0 < dm.d; j0 += 32) {
      const int64_t cols = std::min<int64_t>(32, dm.d - j0);
      const int nv = cols > 16 ? 2 : 1;
      const int64_t last = cols - 16 * (nv - 1);
      const auto mask = static_cast<__mmask16>(last >= 16 ? 0xFFFFu : (1u << last) - 1u);
      switch (rows) {
        case 4: Tile<4>(dm, prow, pv, j0, nv, mask, yrows); break;
        case 3: Tile<3>(dm, prow, pv, j0, nv, mask, yrows); break;
        case 2: Tile<2>(dm, prow, pv, j0, nv, mask, yrows); break;
        default: Tile<1>(dm, prow, pv, j0, nv, mask, yrows); break;
      }
    }
  }
}

struct AttentionPVKernel {
  AttentionPVKernel(const OrtApi&, const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info{raw_info};
    static const int64_t k0 = 0, k32 = 32, km8 = -8;
    block_ = int_attribute(info, "AttentionPV", "block_size", nullptr);
    seg_ = int_attribute(info, "AttentionPV", "segment", &k32);
    p_exp_ = static_cast<int>(int_attribute(info, "AttentionPV", "p_exponent", &km8));
    transpose_ = int_attribute(info, "AttentionPV", "transpose_output", &k0) != 0;
    v_transposed_ = int_attribute(info, "AttentionPV", "v_transposed", &k0) != 0;
    if (block_ < 1) Fail("block_size must be >= 1");
    if (seg_ < 2 || seg_ > kMaxSegment || seg_ % 2)
      Fail("segment must be even, in 2..256, got " + std::to_string(seg_));
    if (p_exp_ < -32 || p_exp_ > 0) Fail("p_exponent must be in -32..0");
    avx512_ = BestIsa() >= kIsaAvx512;  // BlockMatMul's choice, BCTONNX_ISA included
  }

  struct Job {
    const AttentionPVKernel* self;
    PvDims dm;
    const uint8_t* p;
    const int8_t* v;
    const float* vs;
    float* y;
    int64_t heads;  // h of rank-4 inputs [b, h, ...] (transpose_output, v_transposed)
    std::string error;
    std::mutex mu;
  };

  static void HeadTask(void* data, size_t index) {
    Job& job = *static_cast<Job*>(data);
    try {
      job.self->RunHead(job, static_cast<int64_t>(index));
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(job.mu);
      if (job.error.empty()) job.error = e.what();
    }
  }

  void RunHead(const Job& job, int64_t bh) const {
    const PvDims& dm = job.dm;
    thread_local std::vector<char> wbuf, fbuf;
    PreparedV pv{Scratch<int32_t>(wbuf, static_cast<size_t>(dm.pairs * dm.dpad)),
                 Scratch<float>(fbuf, static_cast<size_t>(dm.nseg * dm.dpad))};
    if (v_transposed_) {  // v [b, S, h, D], v_scale [b, S, h, nb]
      const int64_t b = bh / job.heads, h = bh % job.heads;
      PrepareV(dm, job.v + (b * dm.s * job.heads + h) * dm.d, job.heads * dm.d,
               job.vs + (b * dm.s * job.heads + h) * dm.nb, job.heads * dm.nb, &pv);
    } else {
      PrepareV(dm, job.v + bh * dm.s * dm.d, dm.d, job.vs + bh * dm.s * dm.nb, dm.nb, &pv);
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
    if (avx512_)
      Avx512Head(dm, p, pv, out);
    else
      ScalarHead(dm, p, pv, out);
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
    job.self = this;
    PvDims& dm = job.dm;
    dm.m = psh[rank - 2];
    dm.s = psh.back();
    dm.d = vsh.back();
    dm.block = block_;
    dm.nb = num_blocks(dm.d, block_);
    dm.seg = seg_;
    dm.nseg = num_blocks(dm.s, seg_);
    dm.dpad = num_blocks(dm.d, 32) * 32 + 32;  // whole 32-column tiles, + a zero tile
    dm.pairs = (dm.s + 1) / 2;
    dm.p_exp = p_exp_;
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
    if (batches == 1)
      HeadTask(&job, 0);
    else
      ctx.ParallelFor(&HeadTask, static_cast<size_t>(batches), 0, &job);
    if (!job.error.empty()) throw std::runtime_error(job.error);
  }

  int64_t block_ = 0, seg_ = 32;
  int p_exp_ = -8;
  bool transpose_ = false, v_transposed_ = false, avx512_ = false;
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
