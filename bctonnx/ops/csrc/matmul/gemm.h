// The block-quantized GEMM behind BlockMatMul and BlockBatchMatMul: its operand layouts, the
// per-instruction-set kernels (gemm_<isa>.cc) and the driver that packs, tiles and threads
// (gemm.cc). The arithmetic is ref_matmul.py's ("Arithmetic"); every kernel follows it.
//
// Layout of the work (as MLAS: the driver owns tiling and threads, a kernel runs register tiles):
// - Weights are packed once per kernel (PackWeights), in panels of 16 columns; K in segments of
//   g = min(block_size, act_block_size), spb segments per weight block.
// - Activations are packed per call (PackActivations): int8 codes in segments padded to gp,
//   and per weight block of each row the exponent E and, per segment, the left shift e - E
//   that combines the segments' int32 sums exactly (ref_matmul.py step 2).
// - A kernel computes rows [m0, m1) x panels [p0, p1) over all of K: per weight block, int32
//   sums per segment, shifted and added into one int32 per block, then y += fl(fl(acc) * sw)
//   * 2^E; finally bias and multiplier.
#pragma once

#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "../platform.h"

namespace bct {
namespace gemm {

constexpr int kPanel = 16;   // output columns per packed weight panel (one zmm of int32)
constexpr int kRowTile = 4;  // rows per interleaved activation tile (AVX-512, AVX2, scalar)

// 64-byte aligned storage: each 64-byte chunk of packed weights is one cache line.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

// Weights, packed once. Per panel and segment, 64-byte chunks:
//   8-bit: chunk c holds k = 4c..4c+3 of the 16 columns: byte [col * 4 + i] = (q - zp) + 128
//          of k = 4c + i (the u8 operand of vpdpbusd; the activation is the s8 one), or q - zp
//          itself when `signed8` (AMX: s8 x s8 tdpbssd);
//   int4:  chunk c holds k = 8c..8c+7: byte [col * 4 + i] = u(k0 + i) | u(k0 + 4 + i) << 4 with
//          k0 = 8c and u = q + 8 in 0..15: low nibbles k-group 2c, high nibbles 2c + 1.
// Padding rows of a segment (k >= g) and padding columns hold weight 0.
struct PackedWeights {
  int64_t k = 0, n = 0, block = 0, act_block = 0, g = 0, gp = 0, nseg = 0, nblk = 0;
  int64_t spb = 1;                           // segments per weight block
  int64_t npanel = 0, npad = 0, chunks = 0;  // chunks (64 bytes) per segment and panel
  bool int4 = false;
  bool signed8 = false;
  std::vector<uint8_t, AlignedAllocator<uint8_t>> data;  // [panel][segment][chunk][64]
  std::vector<float> sw;      // [nblk][npad] weight scales, fl32(2^(code / 2^F))
  std::vector<float> zpp;     // int4: [nblk][npad] zero point + 8, as float
  std::vector<int32_t> zpi;   // int4: [nblk][npad] zero point + 8
  int64_t panel_bytes() const { return nseg * chunks * 64; }
  int64_t seg_bytes() const { return chunks * 64; }
};

// The weights' logical content: codes [K][N] (int4: -8..7), pow2 scale codes [K/B][N] (base
// added), zero points [K/B][N] or empty. Superblock weights arrive here already widened.
struct WeightCodes {
  int64_t k = 0, n = 0, block = 0, frac_bits = 0;
  bool int4 = false;
  const int32_t* codes = nullptr;
  const int32_t* scale_codes = nullptr;
  const int32_t* zero_points = nullptr;  // or null
};

// The weight of packed segment j, row kk of it, column c: q - zp (the plain reading of the
// layout above, for the portable kernel and the debug output).
inline int32_t WeightAt(const PackedWeights& w, int64_t j, int64_t kk, int64_t c) {
  const uint8_t* chunk = w.data.data() + (c / kPanel) * w.panel_bytes() + j * w.seg_bytes();
  const int64_t lane = c % kPanel;
  if (w.int4) {
    const uint8_t byte = chunk[(kk / 8) * 64 + lane * 4 + kk % 4];
    return ((kk % 8) < 4 ? (byte & 0x0F) : (byte >> 4)) - w.zpi[(j / w.spb) * w.npad + c];
  }
  const uint8_t byte = chunk[(kk / 4) * 64 + lane * 4 + kk % 4];
  return w.signed8 ? static_cast<int8_t>(byte) : byte - 128;
}

// The 4-byte activation group of row r at k-step s of an interleaved row tile.
inline int32_t ActDword(const int8_t* tile, int64_t s, int r) {
  int32_t v;
  std::memcpy(&v, tile + s * 16 + r * 4, 4);
  return v;
}

// Packs `wc` for activations in blocks of `act_block` and the kernels of `isa`. Throws
// std::runtime_error (no op prefix) on codes outside their range.
void PackWeights(const WeightCodes& wc, int64_t act_block, Isa isa, PackedWeights* w);

// Weights from a run-time int8 operand given row by row (attention's keys): row c of `b` (every
// `ldb` bytes) is column c of the weights, K = w->k codes in blocks of w->block with pow2 scales
// `bs` (every `ldbs` floats per row, one per block), which become the weight scales. `w` must be
// shaped by ShapeWeights(k, n, block, block, false, isa <= avx512). Throws on a non-pow2 scale.
void PackRowsAsWeights(const int8_t* b, int64_t ldb, const float* bs, int64_t ldbs,
                       PackedWeights* w);

// The shared shape fields of a weight layout (what PackWeights sets before the data).
void ShapeWeights(int64_t k, int64_t n, int64_t block, int64_t act_block, bool int4, Isa isa,
                  PackedWeights* w);

// Activations of one call, packed for the kernels of one ISA.
//   interleaved (scalar, avx2, avx512): rows in tiles of kRowTile; tile t holds its rows'
//     codes as [segment][kstep][row][4 bytes] (kstep = 4 k), at a + t * tile_bytes; a row tile
//     past the last row is zero. shift: [tile][nseg][kRowTile] int32; corr and bscale:
//     [tile][nblk][kRowTile].
//   row-major (amx): codes [m][lda] (segments padded to gp); shift [m][nseg], bscale
//     [m][nblk], rows padded to a multiple of 16 with zeros.
// corr per (row, block): 8-bit unsigned weights: -128 * X; int4: X, where X = sum over the
// block's segments of (sum of the segment's codes) << shift: the kernels' correction for the
// +128 / +8 offset of the unsigned weight operand.
struct PackedActs {
  const int8_t* a = nullptr;
  int64_t lda = 0;         // row-major: bytes per row
  int64_t tile_bytes = 0;  // interleaved: bytes per row tile (kRowTile * nseg * gp)
  const int32_t* shift = nullptr;
  const int32_t* corr = nullptr;
  const float* bscale = nullptr;
  bool interleaved = true;
};

// One kernel call's operands: rows [0, rows) of the activations times the weights into y.
struct Operands {
  const PackedWeights* w = nullptr;
  PackedActs x;
  int64_t rows = 0;
  const float* bias = nullptr;  // [npad] or null
  const float* ymul = nullptr;  // scalar multiplier of y (after the bias) or null
  float* y = nullptr;           // [rows][ldy]
  int64_t ldy = 0;
  bool amx_emulated = false;
};

// Kernels: rows [m0, m1) x panels [p0, p1) of y over all of K. Row ranges start at a multiple
// of the kernel's row tile (kRowTile; 16 for AMX).
void GemmScalar(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void GemmAvx2(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void GemmAvx512(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void GemmAmx(const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void Gemm(Isa isa, const Operands& op, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// Rows per kernel row tile and panels per column tile of an ISA (the driver's task grain).
int64_t RowTile(Isa isa);
int64_t PanelTile(Isa isa);

// Per-thread scratch memory that grows and is reused across runs: a fresh allocation of a few
// hundred KB per call is an mmap plus page faults, a visible share of a small matmul.
enum ScratchSlot {
  kSlotA = 0, kSlotShift, kSlotCorr, kSlotBScale, kSlotY, kSlotRow, kSlotRowExp, kSlotB,
  kSlotBScales, kSlotTail, kNumSlots
};
template <typename T>
T* ThreadScratch(ScratchSlot slot, size_t count) {
  thread_local std::vector<char> buffers[kNumSlots];
  std::vector<char>& buf = buffers[slot];
  const size_t bytes = (count > 0 ? count : 1) * sizeof(T) + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((addr + 63) & ~uintptr_t{63});
}

// Activation packing. The caller supplies, per row, its int8 codes (K of them) and the
// exponent of each activation block; PackActRow writes that row into the layout of `acts`
// (whose buffers the caller allocated with ActsBytes). Rows may be packed in any order, from
// any thread; padding rows of the last tile are written by PackActPadding.
struct ActsBuffers {
  int8_t* a;
  int32_t* shift;
  int32_t* corr;
  float* bscale;
};
struct ActsSizes {
  int64_t a = 0, shift = 0, block = 0;  // elements of a, of shift, of corr / bscale
  int64_t lda = 0, tile_bytes = 0;
  int64_t padded_rows = 0;
};
ActsSizes ActsLayout(const PackedWeights& w, bool interleaved, int64_t rows);
void PackActRow(const PackedWeights& w, const ActsSizes& sz, bool interleaved, const int8_t* q,
                const int* exps, int64_t m, const ActsBuffers& buf);
// Rows [m0, m1) at once (m0 a multiple of kRowTile for the fast path): row m's codes at
// q + (m - m0) * ldq, its exponents at exps + (m - m0) * lde. `isa` >= avx512: segment sums by
// vpsadbw and whole row tiles interleaved by one transpose (rows past m1 in the last tile are
// written as zeros). Same result as PackActRow row by row.
void PackActRows(const PackedWeights& w, const ActsSizes& sz, bool interleaved, Isa isa,
                 const int8_t* q, int64_t ldq, const int* exps, int64_t lde, int64_t m0,
                 int64_t m1, const ActsBuffers& buf);
void PackActPadding(const PackedWeights& w, const ActsSizes& sz, bool interleaved, int64_t rows,
                    const ActsBuffers& buf);

// The sums of one row's int8 codes per segment: nseg segments of g codes, exact (vpsadbw on
// the codes + 128 when g is a multiple of 8 and `isa` has it, else plain C++).
void RowSegmentSums(const int8_t* q, int64_t g, int64_t nseg, Isa isa, int32_t* out);

// The exact integer segment sums d[m][j][n] (ref_matmul.py step 1, after the re-quantization
// of step 2): the optional segment_sums output, for tests and debugging. Plain C++.
void SegmentSums(const Operands& op, int32_t* out);

}  // namespace gemm
}  // namespace bct
