"""The block format: the one source of truth for how bctonnx quantizes a tensor.

Every pass, every reference op and every test quantizes through this module.

A tensor is cut along one axis into blocks of ``block_size`` contiguous elements; each block
gets its own scale and its elements become signed ``bits``-bit integers:

    q     = clamp(round_half_even(x / scale), -qmax, qmax),   qmax = 2**(bits-1) - 1
    x_hat = q * scale

Quantization is symmetric and the code ``-2**(bits-1)`` (-128 for int8, -8 for int4) is never
produced, so negation never overflows and int8 x int8 products stay within +-127*127.

Scale kinds
-----------
``float``  scale = max|x| / qmax stored as float32 or float16. A float16 scale is rounded *up*
           to the next representable value, so no element is ever clipped.
``pow2``   scale = 2**(code / 2**frac_bits), ``code`` an int8 (one byte per block).
           ``frac_bits = 0`` is BCT's shift: a pure power of two, so rescaling is an integer
           shift. ``frac_bits > 0`` is a fractional shared exponent (a one-byte log-scale):
           steps of 2**(1/2**frac_bits), still one byte per block. The code is the smallest
           one whose scale is >= max|x| / qmax, so again nothing is clipped.

Clipping: ``clip="none"`` uses max|x| of the block (nothing clipped). ``clip="mse"`` searches,
per block and without any data, the scale among ``MSE_CLIP_STEPS`` shrinks of the max|x|
scale (for pow2 codes: the next few codes down) that minimises the block's squared error;
elements beyond ``scale * qmax`` are then clamped. That trades a few clipped outliers for a
finer grid on everything else, which pays at 4 bits.

Error bound: with ``clip="none"``, for every element ``|x - x_hat| <= scale / 2`` of its block.
A block of zeros (or below the smallest scale) gets the smallest scale of its kind and all
codes zero.

Re-quantizing a dequantized tensor gives the same codes for fp32 scales, pure pow2 scales and
normal-range fp16 scales. With fractional pow2 scales (and subnormal fp16 ones) it may not: the
largest code of a block can round below qmax, and the re-encoded scale is then a step smaller.

Block size and axis size: quantizing a *stored* tensor needs ``block_size`` to divide the axis
(`BlockSizeError` otherwise: the user picks another block size or excludes the tensor). For
activations whose size is only known at run time (sequence length), the last block may be
partial (``allow_partial=True``), exactly as ONNX's blocked QuantizeLinear (opset 21) does with
``ceil(D / block_size)`` scales.

Asymmetric blocks (``symmetric=False``): each block also gets a zero point ``zp`` and uses
the full code range ``[-2**(bits-1), 2**(bits-1) - 1]``:

    scale = (max(x, 0) - min(x, 0)) / (2**bits - 1)      (rounded up to the scale kind's grid)
    zp    = clamp(round_half_even(qmid - (max + min) / (2 * scale)), qmin, qmax),
            qmid = (qmin + qmax) / 2 = -0.5
    q     = clamp(round_half_even(x / scale) + zp, qmin, qmax)
    x_hat = (q - zp) * scale

which is ONNX DequantizeLinear with a blocked zero point. The block's range always contains 0
(so zp is in range and 0 is exact). Zero points are stored like the codes (int4 packed for
<= 4 bits, int8 otherwise): half a byte per block at 4 bits. It pays at 4 bits, where the
sign asymmetry of a block otherwise wastes a large part of the 16 levels. With ``clip="mse"``
the candidate scales are the same as for symmetric blocks, each with the centred zero point.

Four-bit scale codes (``scale_bits=4``, pow2 scales only): the blocks of one slice (all blocks
that share every index but the blocked axis, e.g. one output column of a weight blocked along
K) store their scale codes as 4-bit offsets from one int8 base per slice,
``code = base + offset``, ``base = max(code) - 15``. Quantization enforces it: a block whose own
code would be more than 15 steps below its slice's largest code is quantized with the floor
code instead (a coarser grid, never clipping). Half a byte per block instead of one, which
is what lets 4-bit asymmetric blocks of 32 fit in a 7.5x budget.

Superblocks (``superblock = S > 0``, pow2 scales, <= 4 bits, S a multiple of the block
size): blocks are grouped ``S / block_size`` at a time along the axis. Each superblock has one
pow2 scale code ``c`` (``scale_codes``, with the ``scale_bits`` rule applied to them), each
block an integer multiplier ``m`` in 1..15 (``multipliers``, 4 bits):

    block scale = fl32(m * 2**(c / 2**frac_bits)),    x_hat = (q - zp) * block scale

Quantization keeps ``m * (q - zp)`` within int8 for every element, so a kernel widens a
superblock's codes to int8 *exactly* (`widen_superblocks`) and applies one scale per
superblock: a linear layer with 4-bit blocks of 32 then runs with one float step per 128
(llama.cpp's k-quants use the same two-level idea with 6-bit sub-scales; here 4 bits, so the
products fit int8). An axis that the superblock does not divide gets `superblock_for` its
size instead (e.g. 128 for 1024 with superblocks of 384), or plain blocks; the quantized
tensor's ``fmt`` says which. Search, without data: per superblock and for each top multiplier ``T`` in
`SUPERBLOCK_TOPS`, ``c`` is the smallest code with ``T * scale >= s_max`` (``s_max`` the
largest full-range scale of its blocks); each block then takes the ``m`` in 1..15 with the
least squared error (centred zero point for asymmetric blocks; candidates whose product leaves
int8 are skipped, ``m = 1`` always fits for <= 4 bits); the superblock keeps the ``T`` with
the least total error. Every block gets the best multiplier for its superblock's scale. On
MiniLM's weights (4-bit asymmetric blocks of 32) the mean squared error is *below* that of
free per-block pow2/8 codes: 2.5% with superblocks of 128, 0.7% with 384; storage is half a
byte per block plus one code per superblock.

N:M sparsity (``nm_n = N``, ``nm_m = M``; 0 = dense): along the blocked axis, every group of
M consecutive elements (groups never cross a block: M divides the block size) has at most N
nonzero values. Quantization keeps the N largest ``|x|`` of each group (`nm_keep_mask`; a
tensor pruned and reconstructed beforehand, by the N:M pass, already has its zeros there) and
stores only them: the kept codes, N per group in position order (the tensor's shape with the
axis shortened to ``size * N / M``, packed like any codes), and a pattern per group, the
index of its kept positions among the ``C(M, N)`` position sets in lexicographic order
(`nm_patterns`: 2:4 has 6, stored in 4 bits; 4:8 has 70, one byte). A pruned element is a
real zero: code 0, or the block's zero point for asymmetric blocks (0 is exact there).
`nm_compress` / `nm_expand` convert between dense codes and that storage; the block scales
and zero points are those of the dense blocks. Bytes: 2:4 of 8-bit weights store 0.5 + 0.125
bytes per weight instead of 1 (4-bit: 0.25 + 0.125 instead of 0.5). Nothing is saved in
compute: CPUs have no sparse int8 dot product, so the kernels expand the codes to dense ones
when they are loaded.

Storage: 2..4-bit codes are packed two per byte (ONNX INT4 layout: element ``2i`` in the low
nibble, ``2i+1`` in the high nibble, two's complement); 5..8-bit codes take one int8 each.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from functools import cache
from typing import Literal

import numpy as np

ScaleKind = Literal["float", "pow2"]
ScaleDtype = Literal["float32", "float16"]

_SCALE_FLOOR = {"float32": np.float32(2.0**-126), "float16": np.float16(2.0**-24)}


class BlockSizeError(ValueError):
    """The block size does not divide the axis it cuts."""


@dataclass(frozen=True)
class BlockFormat:
    """How one tensor is cut into blocks and quantized."""

    bits: int = 8
    block_size: int = 32
    axis: int = -1
    scale_kind: ScaleKind = "float"
    scale_dtype: ScaleDtype = "float32"  # for scale_kind="float"
    frac_bits: int = 0  # for scale_kind="pow2": 0 = pure power of two (BCT shift)
    clip: Literal["none", "mse"] = "none"
    symmetric: bool = True  # False: per-block zero point (see "Asymmetric blocks")
    scale_bits: int = 8  # 4: pow2 codes stored as 4-bit offsets from a per-slice base
    superblock: int = 0  # > 0: pow2 code per superblock, 4-bit multiplier per block
    nm_n: int = 0  # N:M sparsity along the axis: at most nm_n nonzero per nm_m (0 = dense)
    nm_m: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.scale_kind not in ("float", "pow2"):
            raise ValueError(f"scale kind must be 'float' or 'pow2', got {self.scale_kind!r}")
        if self.scale_dtype not in ("float32", "float16"):
            raise ValueError(f"scale dtype must be float32 or float16, got {self.scale_dtype!r}")
        if not 0 <= self.frac_bits <= 4:
            raise ValueError(f"frac_bits must be in 0..4, got {self.frac_bits}")
        if self.clip not in ("none", "mse"):
            raise ValueError(f"clip must be 'none' or 'mse', got {self.clip!r}")
        if self.scale_bits not in (4, 8):
            raise ValueError(f"scale bits must be 4 or 8, got {self.scale_bits}")
        if self.scale_bits == 4 and self.scale_kind != "pow2":
            raise ValueError("4-bit scale codes need scale_kind='pow2'")
        if self.superblock:
            if self.scale_kind != "pow2" or self.bits > 4:
                raise ValueError("superblocks need scale_kind='pow2' and at most 4 bits")
            if self.superblock <= self.block_size or self.superblock % self.block_size:
                raise ValueError(
                    f"superblock {self.superblock} must be a multiple (> 1) of the block size "
                    f"{self.block_size}"
                )

        if self.nm_n or self.nm_m:
            if not 0 < self.nm_n < self.nm_m <= 8:
                raise ValueError(f"N:M sparsity needs 0 < N < M <= 8, got {self.nm_n}:{self.nm_m}")
            if self.block_size % self.nm_m:
                raise ValueError(
                    f"N:M sparsity: M = {self.nm_m} must divide the block size {self.block_size}"
                )

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) of N:M sparsity; (0, 0) when dense."""
        return (self.nm_n, self.nm_m)

    def pattern_bits(self) -> int:
        """Bits per stored N:M pattern: 4 when C(M, N) <= 16, else 8 (0 when dense)."""
        if not self.nm_m:
            return 0
        return 4 if math.comb(self.nm_m, self.nm_n) <= 16 else 8

    def code_storage_bytes(self, num_elements: int) -> int:
        """Stored bytes of the codes of ``num_elements`` elements (N:M: the kept codes and
        one pattern per group)."""
        if self.nm_m:
            groups = num_elements // self.nm_m
            kept = groups * self.nm_n
            codes = (kept + 1) // 2 if self.packed else kept
            return codes + (groups + 1) // 2 if self.pattern_bits() == 4 else codes + groups
        return (num_elements + 1) // 2 if self.packed else num_elements

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest code produced: -qmax (symmetric) or -2**(bits-1) (asymmetric)."""
        return -self.qmax if self.symmetric else -(2 ** (self.bits - 1))

    @property
    def packed(self) -> bool:
        """Codes are stored two per byte (int4 container)."""
        return self.bits <= 4

    def superblock_for(self, size: int) -> int:
        """The superblock of an axis of ``size`` elements: this format's, or where that does
        not divide the axis, the largest common divisor of both that is a multiple (> 1) of
        the block size; 0 (plain blocks) if there is none."""
        if not self.superblock:
            return 0
        sb = math.gcd(size, self.superblock)
        return sb if sb > self.block_size and sb % self.block_size == 0 else 0

    @property
    def blocks_per_superblock(self) -> int:
        return self.superblock // self.block_size if self.superblock else 1

    def scale_storage_bytes(self, nblocks: int, nslices: int) -> int:
        """Stored bytes of the scales of ``nblocks`` blocks over ``nslices`` slices (see
        scale_bits; with superblocks: one code per superblock, a 4-bit multiplier per block)."""
        if self.superblock:
            nsuper = nblocks // self.blocks_per_superblock
            codes = (nsuper + 1) // 2 + nslices if self.scale_bits == 4 else nsuper
            return codes + (nblocks + 1) // 2
        if self.scale_kind == "pow2":
            return (nblocks + 1) // 2 + nslices if self.scale_bits == 4 else nblocks
        return nblocks * (4 if self.scale_dtype == "float32" else 2)

    def with_axis(self, axis: int) -> BlockFormat:
        return replace(self, axis=axis)

    def describe(self) -> str:
        if self.scale_kind == "pow2":
            scale = "pow2" if self.frac_bits == 0 else f"pow2/{2**self.frac_bits}"
        else:
            scale = "fp32" if self.scale_dtype == "float32" else "fp16"
        clip = " mse" if self.clip == "mse" else ""
        asym = " asym" if not self.symmetric else ""
        s4 = " s4" if self.scale_bits == 4 else ""
        sb = f" sb{self.superblock}" if self.superblock else ""
        nm = f" {self.nm_n}:{self.nm_m}" if self.nm_m else ""
        return f"int{self.bits} b{self.block_size}{sb} {scale}{s4}{clip}{asym}{nm}"

    def to_dict(self) -> dict:
        return asdict(self)

    def bytes_for(self, shape: tuple[int, ...]) -> int:
        """Stored bytes (codes, scales, zero points) of a tensor of this shape blocked along
        ``axis``, when the block size divides it (`BlockQuantized.nbytes` also counts partial
        blocks)."""
        num_elements = math.prod(shape)
        code_bytes = self.code_storage_bytes(num_elements)
        nblocks = math.ceil(num_elements / self.block_size)
        nslices = num_elements // shape[self.axis]
        return (
            code_bytes + self.scale_storage_bytes(nblocks, nslices) + self.zero_point_bytes(nblocks)
        )

    def zero_point_bytes(self, nblocks: int) -> int:
        """Stored bytes of ``nblocks`` zero points (0 for symmetric blocks)."""
        if self.symmetric:
            return 0
        return (nblocks + 1) // 2 if self.packed else nblocks


@dataclass
class BlockQuantized:
    """A tensor in block format: codes (unpacked int8) and per-block scale codes.

    ``scale_codes`` has the tensor's shape with the blocked axis shortened to
    ``ceil(size / block_size)`` (with superblocks: ``size / superblock``); it is
    float32/float16 for float scales, int8 for pow2. ``zero_points`` (asymmetric formats only)
    and ``multipliers`` (superblock formats only, uint8 1..15) have one element per block.
    """

    codes: np.ndarray
    scale_codes: np.ndarray
    fmt: BlockFormat
    zero_points: np.ndarray | None = None
    multipliers: np.ndarray | None = None

    @property
    def axis(self) -> int:
        return self.fmt.axis % self.codes.ndim

    def scales(self) -> np.ndarray:
        """Per-block scales, float32."""
        return block_scales(self.scale_codes, self.fmt, self.multipliers, self.axis)

    def dequantize(self) -> np.ndarray:
        return dequantize(
            self.codes, self.scale_codes, self.fmt, self.zero_points, self.multipliers
        )

    def packed_codes(self) -> np.ndarray:
        """Codes as stored: int4-packed uint8 (flattened, row-major) or int8."""
        return pack_int4(self.codes) if self.fmt.packed else self.codes.astype(np.int8)

    def _per_block(self) -> np.ndarray:
        """An array with one element per block (partial ones included), not per superblock."""
        return self.scale_codes if self.multipliers is None else self.multipliers

    @property
    def num_blocks(self) -> int:
        return self._per_block().size

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes plus one scale per block (partial blocks included)."""
        code_bytes = self.fmt.code_storage_bytes(self.codes.size)
        per_block = self._per_block()
        nblocks = per_block.size
        nslices = nblocks // per_block.shape[self.axis]
        return (
            code_bytes
            + self.fmt.scale_storage_bytes(nblocks, nslices)
            + self.fmt.zero_point_bytes(nblocks)
        )


def decode_scales(scale_codes: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Per-block scales as float32."""
    if fmt.scale_kind == "pow2":
        if fmt.frac_bits == 0:  # exact: numpy's float32 exp2 can miss 2**127 by one step
            return np.ldexp(np.float32(1), scale_codes.astype(np.int32)).astype(np.float32)
        return np.exp2(scale_codes.astype(np.float32) / np.float32(2**fmt.frac_bits)).astype(
            np.float32
        )
    return scale_codes.astype(np.float32)


def encode_scales(amax: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Scale codes for blocks with these max-abs values: the smallest scale >= amax/qmax."""
    amax = np.asarray(amax, dtype=np.float32)
    ideal = amax / np.float32(fmt.qmax)
    if fmt.scale_kind == "pow2":
        steps = np.float32(2**fmt.frac_bits)
        with np.errstate(divide="ignore"):
            code = np.ceil(np.log2(np.maximum(ideal, np.float32(1e-45))) * steps)
        code = np.clip(code, -128, 127).astype(np.int8)
        # log2/ceil in float can land one step short: bump those codes by one.
        short = (decode_scales(code, fmt) < ideal) & (code < 127)
        code = np.where(short, code + 1, code).astype(np.int8)
        if np.any(decode_scales(code, fmt) < ideal):
            raise ValueError("values too large for a pow2 scale (max |x| beyond 2**127)")
        return code
    floor = _SCALE_FLOOR[fmt.scale_dtype]
    if fmt.scale_dtype == "float16":
        if np.any(ideal > np.float32(np.finfo(np.float16).max)):
            raise ValueError("values too large for a float16 scale; use float32 scales")
        s16 = ideal.astype(np.float16)
        s16 = np.where(s16.astype(np.float32) < ideal, np.nextafter(s16, np.float16(np.inf)), s16)
        return np.maximum(s16, floor).astype(np.float16)
    return np.maximum(ideal, floor).astype(np.float32)


def block_view(
    x: np.ndarray, axis: int, block_size: int, allow_partial: bool = False
) -> np.ndarray:
    """``x`` moved to [..., nblocks, block_size] along ``axis`` (zero-padded if partial)."""
    axis = axis % x.ndim
    size = x.shape[axis]
    if size % block_size:
        if not allow_partial:
            raise BlockSizeError(
                f"block size {block_size} does not divide axis {axis} of size {size}"
            )
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, block_size - size % block_size)
        x = np.pad(x, pad)
    x = np.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def block_amax(
    x: np.ndarray, axis: int, block_size: int, allow_partial: bool = False
) -> np.ndarray:
    """max |x| of each block, shaped like x with ``axis`` shortened to the block count."""
    amax = np.abs(block_view(x, axis, block_size, allow_partial)).max(axis=-1)
    return np.moveaxis(amax, -1, axis % x.ndim)


def expand_blocks(per_block: np.ndarray, axis: int, block_size: int, size: int) -> np.ndarray:
    """Repeat each per-block value over its block (and cut a partial last block)."""
    return np.take(np.repeat(per_block, block_size, axis=axis), np.arange(size), axis=axis)


def quantize(
    x: np.ndarray, fmt: BlockFormat, *, allow_partial: bool = False, amax: np.ndarray | None = None
) -> BlockQuantized:
    """Quantize ``x`` blockwise along ``fmt.axis``.

    ``amax`` overrides the per-block max-abs (e.g. a clipped range); elements beyond
    ``scale * qmax`` are then clamped.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("cannot block-quantize a scalar")
    axis = fmt.axis % x.ndim
    if fmt.nm_m:
        if allow_partial:
            raise ValueError("N:M sparsity is for stored tensors (no partial blocks)")
        if x.shape[axis] % fmt.block_size:
            raise BlockSizeError(
                f"block size {fmt.block_size} does not divide axis {axis} of size {x.shape[axis]}"
            )
        x = np.where(nm_keep_mask(x, replace(fmt, axis=axis)), x, np.float32(0))
    if fmt.superblock:
        if amax is not None:
            raise ValueError("amax overrides do not apply to superblock formats")
        return _quantize_superblocks(x, replace(fmt, axis=axis), allow_partial)
    if not fmt.symmetric:
        if amax is not None:
            raise ValueError("amax overrides apply to symmetric formats only")
        return _quantize_asymmetric(x, replace(fmt, axis=axis), allow_partial)
    if amax is None and fmt.clip == "mse":
        amax = mse_clip_amax(x, replace(fmt, axis=axis), allow_partial)
    if amax is None:
        amax = block_amax(x, axis, fmt.block_size, allow_partial)
    elif x.shape[axis] % fmt.block_size and not allow_partial:
        raise BlockSizeError(
            f"block size {fmt.block_size} does not divide axis {axis} of size {x.shape[axis]}"
        )
    scale_codes = encode_scales(amax, fmt)
    if fmt.scale_bits == 4:
        scale_codes = np.maximum(scale_codes, scale_code_floor(scale_codes, axis))
    scales = expand_blocks(decode_scales(scale_codes, fmt), axis, fmt.block_size, x.shape[axis])
    codes = np.clip(np.rint(x / scales), -fmt.qmax, fmt.qmax).astype(np.int8)
    return BlockQuantized(codes, scale_codes, replace(fmt, axis=axis))


MSE_CLIP_STEPS = 8  # candidate scales per block for clip="mse"
SUPERBLOCK_TOPS = (8, 10, 12, 15)  # candidate largest multipliers of a superblock
MAX_MULTIPLIER = 15


def _block_codes(blocks: np.ndarray, s: np.ndarray, fmt: BlockFormat, lo, hi):
    """(zero points, codes) of ``blocks`` [..., B] at scales ``s`` [...]: the centred zero
    point of each block's range [lo, hi] (asymmetric formats) or zeros."""
    if fmt.symmetric:
        zp = np.zeros(s.shape, np.float32)
    else:
        zp = np.clip(np.rint(np.float32(-0.5) - (hi + lo) / (2 * s)), fmt.qmin, fmt.qmax)
    q = np.clip(np.rint(blocks / s[..., None]) + zp[..., None], fmt.qmin, fmt.qmax)
    return zp, q


def _keep_better(best: list | None, candidate: list) -> list:
    """Per element, the candidate ``[err, *values]`` where its error is below the best so far
    (ties keep the earlier one); a value with trailing axes follows its element's choice."""
    if best is None:
        return list(candidate)
    better = candidate[0] < best[0]
    return [
        np.where(better.reshape(better.shape + (1,) * (np.ndim(c) - better.ndim)), c, b)
        for c, b in zip(candidate, best, strict=True)
    ]


def _quantize_superblocks(x: np.ndarray, fmt: BlockFormat, allow_partial: bool) -> BlockQuantized:
    """Superblock formats (see the module docstring): per superblock a pow2 code, per block a
    multiplier 1..15 and (asymmetric) a centred zero point, by the least squared error."""
    axis, size = fmt.axis, x.shape[fmt.axis]
    if allow_partial:
        raise ValueError("superblock formats are for stored tensors (no partial blocks)")
    fitted = fmt.superblock_for(size)
    if fitted != fmt.superblock:
        return quantize(x, replace(fmt, superblock=fitted))
    per = fmt.blocks_per_superblock
    blocks = block_view(x, axis, fmt.block_size)  # [..., nb, B]
    blocks = blocks.reshape(*blocks.shape[:-2], -1, per, fmt.block_size)  # [..., ns, per, B]
    if fmt.symmetric:
        lo = hi = None
        full = np.abs(blocks).max(axis=-1) / np.float32(fmt.qmax)  # [..., ns, per]
    else:
        lo = np.minimum(blocks.min(axis=-1), 0)
        hi = np.maximum(blocks.max(axis=-1), 0)
        full = (hi - lo) / np.float32(2**fmt.bits - 1)
    s_max = full.max(axis=-1)  # [..., ns]

    def search(code: np.ndarray):
        """Best multiplier per block for superblock codes ``code``: (err, m, zp, q)."""
        s0 = decode_scales(code, fmt)[..., None]  # [..., ns, 1]
        best = None
        for m in range(1, MAX_MULTIPLIER + 1):
            s = np.broadcast_to(s0 * np.float32(m), full.shape)  # [..., ns, per]
            zp, q = _block_codes(blocks, s, fmt, lo, hi)
            d = q - zp[..., None]
            err = ((d * s[..., None] - blocks) ** 2).sum(axis=-1)
            wide = d * m
            fits = (wide.max(axis=-1) <= 127) & (wide.min(axis=-1) >= -128)
            best = _keep_better(
                best, [np.where(fits, err, np.inf), np.full(err.shape, m, np.uint8), zp, q]
            )
        return best

    chosen = None
    for top in SUPERBLOCK_TOPS:
        code = encode_scales(s_max * np.float32(fmt.qmax / top), fmt)  # T * scale >= s_max
        err, m, zp, q = search(code)
        chosen = _keep_better(chosen, [err.sum(axis=-1), code, m, zp, q])
    _, code, m, zp, q = chosen
    if fmt.scale_bits == 4:  # superblocks below the slice's floor: that code, searched again
        floor = scale_code_floor(code, -1)
        low = code < floor
        if low.any():
            code = np.maximum(code, floor)
            _, m2, zp2, q2 = search(code)
            m = np.where(low[..., None], m2, m)
            zp = np.where(low[..., None], zp2, zp)
            q = np.where(low[..., None, None], q2, q)

    def back(a: np.ndarray, trailing: int) -> np.ndarray:  # [..., ns, per(, B)] -> tensor layout
        a = a.reshape(*a.shape[: a.ndim - 2 - trailing], -1, *a.shape[a.ndim - trailing :])
        if trailing:
            a = a.reshape(*a.shape[:-2], -1)
        return np.ascontiguousarray(np.moveaxis(a, -1, axis))

    return BlockQuantized(
        back(q, 1).astype(np.int8),
        np.ascontiguousarray(np.moveaxis(code, -1, axis)),
        fmt,
        None if fmt.symmetric else back(zp, 0).astype(np.int8),
        back(m, 0).astype(np.uint8),
    )


def widen_superblocks(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray]:
    """A superblock tensor as int8 codes ``m * (q - zp)`` (exact) and its superblock scale
    codes: blocks of ``superblock`` with pow2 scales and no zero point, whose values are
    those of `dequantize` up to the float32 rounding of ``m * scale`` (one rounding of the
    exact product instead of two)."""
    fmt = bq.fmt
    if not fmt.superblock or bq.multipliers is None:
        raise ValueError("widen_superblocks needs a superblock tensor")
    size = bq.codes.shape[bq.axis]
    m = expand_blocks(bq.multipliers.astype(np.int32), bq.axis, fmt.block_size, size)
    q = bq.codes.astype(np.int32)
    if bq.zero_points is not None:
        q = q - expand_blocks(bq.zero_points.astype(np.int32), bq.axis, fmt.block_size, size)
    wide = m * q
    if wide.size and (wide.min() < -128 or wide.max() > 127):
        raise ValueError("superblock codes m * (q - zp) outside int8")
    return wide.astype(np.int8), bq.scale_codes


def _quantize_asymmetric(x: np.ndarray, fmt: BlockFormat, allow_partial: bool) -> BlockQuantized:
    """Asymmetric blocks (see the module docstring): scale, centred zero point, codes."""
    axis = fmt.axis
    blocks = block_view(x, axis, fmt.block_size, allow_partial)  # [..., nb, B]
    lo = np.minimum(blocks.min(axis=-1), 0)
    hi = np.maximum(blocks.max(axis=-1), 0)
    levels = 2**fmt.bits - 1
    # encode_scales picks the smallest scale >= amax / qmax: ask for >= (hi - lo) / levels
    base = encode_scales((hi - lo) * np.float32(fmt.qmax / levels), fmt)
    floor = scale_code_floor(base, -1) if fmt.scale_bits == 4 else None
    if floor is not None:
        base = np.maximum(base, floor)
    candidates = [base]
    if fmt.clip == "mse":
        for k in range(1, MSE_CLIP_STEPS):
            s0 = decode_scales(base, fmt)
            if fmt.scale_kind == "pow2":
                shrunk = s0 * np.float32(2.0 ** (-k / 2**fmt.frac_bits) * (1 - 2.0**-20))
            else:
                shrunk = s0 * np.float32(1 - k / 16)
            code = encode_scales(shrunk * np.float32(fmt.qmax), fmt)
            candidates.append(code if floor is None else np.maximum(code, floor))
    best = None
    for code in candidates:
        s = decode_scales(code, fmt)
        zp, q = _block_codes(blocks, s, fmt, lo, hi)
        err = (((q - zp[..., None]) * s[..., None] - blocks) ** 2).sum(axis=-1)
        best = _keep_better(best, [err, code, zp, q])
    _, code, zp, q = best
    size = x.shape[axis]
    q = np.moveaxis(q.reshape(*q.shape[:-2], -1)[..., :size], -1, axis).astype(np.int8)
    return BlockQuantized(
        np.ascontiguousarray(q),
        np.ascontiguousarray(np.moveaxis(code, -1, axis)),
        fmt,
        np.ascontiguousarray(np.moveaxis(zp, -1, axis)).astype(np.int8),
    )


def mse_clip_amax(x: np.ndarray, fmt: BlockFormat, allow_partial: bool = False) -> np.ndarray:
    """Per-block clipping range minimising the block's squared quantization error.

    Candidates: the max|x| scale and ``MSE_CLIP_STEPS - 1`` smaller ones (pow2: successive
    codes down; float: factors 1 - k/16). Returns the chosen range as an ``amax`` array.
    """
    blocks = block_view(x, fmt.axis, fmt.block_size, allow_partial)  # [..., nb, B]
    amax = np.abs(blocks).max(axis=-1)
    best_err = np.full(amax.shape, np.inf, np.float32)
    best_amax = amax.copy()
    base = decode_scales(encode_scales(amax, fmt), fmt)
    for k in range(MSE_CLIP_STEPS):
        if fmt.scale_kind == "pow2":
            # just below the grid point, so encode_scales picks exactly that code
            scale = base * np.float32(2.0 ** (-k / 2**fmt.frac_bits) * (1 - 2.0**-20))
        else:
            scale = base * np.float32(1 - k / 16)
        cand_amax = scale * np.float32(fmt.qmax)
        s = decode_scales(encode_scales(cand_amax, fmt), fmt)[..., None]
        q = np.clip(np.rint(blocks / s), -fmt.qmax, fmt.qmax)
        err = ((blocks - q * s) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_amax = np.where(better, cand_amax, best_amax)
    return np.moveaxis(best_amax, -1, fmt.axis % x.ndim)


def scale_code_floor(scale_codes: np.ndarray, axis: int) -> np.ndarray:
    """Smallest code allowed per slice with 4-bit scale codes: the slice's largest code - 15."""
    top = scale_codes.astype(np.int16).max(axis=axis, keepdims=True)
    return np.maximum(top - 15, -128).astype(scale_codes.dtype)


def split_scale_codes(scale_codes: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """4-bit scale storage: (base int8 with ``axis`` of size 1, offsets 0..15 as uint8)."""
    base = scale_code_floor(scale_codes, axis)
    offsets = scale_codes.astype(np.int16) - base
    if offsets.min(initial=0) < 0 or offsets.max(initial=0) > 15:
        raise ValueError("scale codes span more than 16 steps in a slice")
    return base.astype(np.int8), offsets.astype(np.uint8)


def block_scales(
    scale_codes: np.ndarray,
    fmt: BlockFormat,
    multipliers: np.ndarray | None = None,
    axis: int | None = None,
) -> np.ndarray:
    """Per-block float32 scales: the decoded codes, or with superblocks each superblock's
    scale times its blocks' multipliers, rounded to float32 (ONNX DequantizeLinear's form)."""
    scales = decode_scales(scale_codes, fmt)
    if not fmt.superblock:
        return scales
    if multipliers is None:
        raise ValueError("a superblock format needs its multipliers")
    axis = (fmt.axis if axis is None else axis) % scales.ndim
    per = fmt.blocks_per_superblock
    return np.repeat(scales, per, axis=axis) * multipliers.astype(np.float32)


def dequantize(
    codes: np.ndarray,
    scale_codes: np.ndarray,
    fmt: BlockFormat,
    zero_points: np.ndarray | None = None,
    multipliers: np.ndarray | None = None,
) -> np.ndarray:
    """float32 values of block-quantized codes."""
    axis = fmt.axis % codes.ndim
    per_block = block_scales(scale_codes, fmt, multipliers, axis)
    scales = expand_blocks(per_block, axis, fmt.block_size, codes.shape[axis])
    if zero_points is None:
        return codes.astype(np.float32) * scales
    zp = expand_blocks(zero_points, axis, fmt.block_size, codes.shape[axis])
    return (codes.astype(np.float32) - zp.astype(np.float32)) * scales


def fake_quantize(x: np.ndarray, fmt: BlockFormat, *, allow_partial: bool = False) -> np.ndarray:
    """Quantize then dequantize: what a QDQ pair computes."""
    return quantize(x, fmt, allow_partial=allow_partial).dequantize()


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack signed 4-bit codes (-8..7) two per byte, ONNX INT4 layout, row-major flattened."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 codes must lie in -8..7")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & np.uint8(0x0F)
    return (nibbles[0::2] | (nibbles[1::2] << np.uint8(4))).astype(np.uint8)


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """`pack_int4` row by row: [R, C] signed 4-bit codes -> uint8 [R, ceil(C / 2)] (a zero
    padding nibble ends each row of odd length): the embedding tables' stored form, one row's
    bytes per id (lower_qdq's Gather, the library's BlockGather)."""
    codes = np.asarray(codes)
    padded = np.pad(codes, [(0, 0), (0, codes.shape[1] % 2)])
    return pack_int4(padded).reshape(codes.shape[0], -1)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_int4`: int8 codes of the given shape."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2] = packed & np.uint8(0x0F)
    nibbles[1::2] = packed >> np.uint8(4)
    signed = nibbles.astype(np.int8)
    signed = np.where(signed > 7, signed - 16, signed).astype(np.int8)
    n = int(np.prod(shape)) if shape else 1
    return signed[:n].reshape(shape)


def divisors_hint(size: int, candidates: tuple[int, ...] = (16, 32, 64, 128, 256)) -> str:
    ok = [b for b in candidates if size % b == 0]
    return ", ".join(map(str, ok)) if ok else "none of " + ", ".join(map(str, candidates))


# --- N:M sparsity ------------------------------------------------------------------------------


@cache
def nm_patterns(n: int, m: int) -> np.ndarray:
    """The kept positions of every N:M pattern, [C(M, N), N], lexicographic order (a
    pattern's index in it is what is stored)."""
    return np.array(list(itertools.combinations(range(m), n)), dtype=np.int64)


def _groups(a: np.ndarray, axis: int, m: int) -> np.ndarray:
    """``a`` with ``axis`` moved first and cut into groups: [size / m, m, rest...]."""
    a = np.moveaxis(a, axis, 0)
    return a.reshape(a.shape[0] // m, m, *a.shape[1:])


def _ungroup(a: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a.reshape(-1, *a.shape[2:]), 0, axis))


def nm_keep_mask(x: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """True at the N largest ``|x|`` of every group of M along the axis (ties: the earlier)."""
    n, m = fmt.nm
    axis = fmt.axis % x.ndim
    if x.shape[axis] % m:
        raise BlockSizeError(f"N:M: M = {m} does not divide axis {axis} of size {x.shape[axis]}")
    g = _groups(np.abs(x), axis, m)
    order = np.argsort(-g, axis=1, kind="stable")[:, :n]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    return _ungroup(keep, axis)


def _zero_codes(bq: BlockQuantized) -> np.ndarray:
    """The code of 0.0 of every element: the block's zero point, or 0."""
    if bq.zero_points is None:
        return np.zeros(bq.codes.shape, np.int8)
    size = bq.codes.shape[bq.axis]
    return expand_blocks(bq.zero_points, bq.axis, bq.fmt.block_size, size).astype(np.int8)


def nm_compress(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray]:
    """An N:M-sparse tensor's storage: (kept codes, the axis shortened to size * N / M;
    pattern indices, uint8, the axis shortened to size / M). A group's kept positions are its
    nonzero elements, completed with its first zero ones; more than N nonzero elements in a
    group is an error."""
    n, m = bq.fmt.nm
    if not m:
        raise ValueError("nm_compress needs an N:M format")
    axis = bq.axis
    codes = _groups(bq.codes, axis, m)
    nonzero = codes != _groups(_zero_codes(bq), axis, m)
    if (nonzero.sum(axis=1) > n).any():
        raise ValueError(f"more than {n} nonzero elements in a group of {m}")
    # rank positions: nonzero first, then by index; the first n, sorted, are the kept ones
    key = np.where(nonzero, 0, m) + np.arange(m).reshape((1, m) + (1,) * (codes.ndim - 2))
    kept_pos = np.sort(np.argsort(key, axis=1, kind="stable")[:, :n], axis=1)
    kept = np.take_along_axis(codes, kept_pos, axis=1)
    # pattern index: position of the kept set among nm_patterns(n, m)
    table = nm_patterns(n, m)
    weights = m ** np.arange(n - 1, -1, -1)
    lookup = {int(v): i for i, v in enumerate(table @ weights)}
    flat = np.tensordot(weights, np.moveaxis(kept_pos, 1, 0), axes=1)
    pattern = np.vectorize(lookup.__getitem__, otypes=[np.uint8])(flat)
    return _ungroup(kept, axis), np.ascontiguousarray(np.moveaxis(pattern, 0, axis))


def nm_expand(
    kept: np.ndarray,
    pattern: np.ndarray,
    fmt: BlockFormat,
    zero_points: np.ndarray | None = None,
) -> np.ndarray:
    """Dense codes from N:M storage (`nm_compress`'s inverse): the pruned positions get the
    code of 0 (the block's zero point, or 0)."""
    n, m = fmt.nm
    axis = fmt.axis % kept.ndim
    groups = kept.shape[axis] // n
    if kept.shape[axis] % n or pattern.shape[axis] != groups:
        raise ValueError(f"N:M storage: {kept.shape} kept codes and {pattern.shape} patterns")
    table = nm_patterns(n, m)
    if pattern.size and int(pattern.max()) >= len(table):
        raise ValueError(f"N:M pattern index out of range (C({m}, {n}) = {len(table)})")
    kept_g = _groups(np.asarray(kept, np.int8), axis, n)  # [G, n, rest]
    pos = np.moveaxis(table[np.moveaxis(pattern, axis, 0).astype(np.int64)], -1, 1)
    shape = list(kept.shape)
    shape[axis] = groups * m
    if zero_points is None:
        dense = np.zeros(shape, np.int8)
    else:
        dense = expand_blocks(zero_points, axis, fmt.block_size, shape[axis]).astype(np.int8)
    dense_g = _groups(dense, axis, m).copy()
    np.put_along_axis(dense_g, pos, kept_g, axis=1)
    return _ungroup(dense_g, axis)
