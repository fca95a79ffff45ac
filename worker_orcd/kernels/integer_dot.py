"""The numerics that every integer matmul shares: `quant_gemv` (one row) and `quant_mmq` (many).

x is rounded to 8 bits per 32-element block (`quantize_activation`, llama.cpp's Q8_1), by the
matmul's own programs (`x_block`) or once by a launch of its own (`quantize_x`), after the
RMSNorm when there is one. A weight unit (a block, or a K-quant chunk) times x's quants is an
integer dot product, exact in any kernel; the `combine_*` functions turn it into the unit's
float contribution with the unit's and x's scales. Each group of units (`units_per_group`, 128
elements) is added in order in float32 and the groups are summed in fixed point (`to_fixed`),
exact in any order. So a row's result is the same bits in the GEMV as in `mmq`'s tiles of many
rows, whatever the tile shapes, K splits or reduction trees (batch invariance).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
# formats read by words and multiplied in 8-bit integers with x quantized as `quantize_activation`
INTEGER_DOT = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K})
X_FLOAT, X_NORMED, X_QUANTIZED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # x as given
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


class Matrix(Protocol):
    blocks: torch.Tensor  # uint8, the tensor's GGUF bytes
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # (rows, cols)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """The torch reference for the x that the INTEGER_DOT formats are multiplied with: blocks
    of 32 elements rounded to 8 bits at scale amax / 127, ties to even (llama.cpp's Q8_1)."""
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), 0.0)
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(x.shape)


@triton.jit
def load_x(x_ptr, norm_ptr, index, mask, HAS_NORM: tl.constexpr):
    """x at `index`, times the RMSNorm weight when there is one."""
    value = tl.load(x_ptr + index, mask=mask, other=0.0)
    if HAS_NORM:
        value *= tl.load(norm_ptr + index, mask=mask, other=0.0)
    return value


@triton.jit
def _round(v):
    """v rounded to the nearest integer, ties to even, as int32 (torch.round's rule)."""
    if INTERPRET:
        result = ((v + 12582912.0) - 12582912.0).to(tl.int32)  # 1.5 * 2^23 drops the fraction
    else:  # one conversion, which the compiler cannot fuse with the multiply before it
        result = tl.inline_asm_elementwise(
            "cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1
        )
    return result


@triton.jit
def _pack(q):
    """Words of four int8s from (units, words, 4) int32 quants, element 0 in the low byte."""
    i = tl.arange(0, 4)[None, None, :]
    return tl.sum(tl.where(i == 3, q << 24, (q & 255) << (8 * i)), axis=2)


@triton.jit
def x_block(x_ptr, norm_ptr, first, mask, ROWS: tl.constexpr, X: tl.constexpr):
    """x over the 32-element blocks that start at `first` (units,), quantized as
    `quantize_activation` does: the words of elements 0-15 and of 16-31 (rows, units, 4), each
    four int8s in order, the block's scale and the sums of the two halves' quants (rows,
    units). Rows are 1 (to broadcast) where the program quantizes x itself (X_FLOAT: x is
    float32; X_NORMED: times the norm weight) and ROWS where it gathers a `QuantizedX`
    (X_QUANTIZED), whose words are loaded in the tile's own layout."""
    if X == X_QUANTIZED:
        at = tl.broadcast_to((first // 32 * 12)[None, :], (ROWS, first.shape[0]))
        valid = tl.broadcast_to(mask[None, :], (ROWS, first.shape[0]))
        word = at[:, :, None] + tl.arange(0, 4)[None, None, :]
        low = tl.load(x_ptr + word, mask=valid[:, :, None], other=0)
        high = tl.load(x_ptr + word + 4, mask=valid[:, :, None], other=0)
        scale = tl.load(x_ptr + at + 8, mask=valid, other=0).to(tl.float32, bitcast=True)
        sum_low = tl.load(x_ptr + at + 9, mask=valid, other=0)
        sum_high = tl.load(x_ptr + at + 10, mask=valid, other=0)
    else:
        index = first[:, None, None] + 4 * tl.arange(0, 4)[None, :, None]
        index += tl.arange(0, 4)[None, None, :]
        x_low = load_x(x_ptr, norm_ptr, index, mask[:, None, None], X == X_NORMED)
        x_high = load_x(x_ptr, norm_ptr, index + 16, mask[:, None, None], X == X_NORMED)
        amax = tl.max(tl.max(tl.maximum(tl.abs(x_low), tl.abs(x_high)), axis=2), axis=1)
        inverse = tl.where(amax > 0, tl.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
        q_low = _round(x_low * inverse[:, None, None])
        q_high = _round(x_high * inverse[:, None, None])
        low, high = _pack(q_low)[None, :, :], _pack(q_high)[None, :, :]
        scale = tl.div_rn(amax, 127.0)[None, :]
        sum_low = tl.sum(tl.sum(q_low, axis=2), axis=1)[None, :]
        sum_high = tl.sum(tl.sum(q_high, axis=2), axis=1)[None, :]
    return low, high, scale, sum_low, sum_high


@triton.jit
def exact_float(i):
    """float32 of an int32 of magnitude below 2^22 (every block's integer dot product here),
    exactly, in an integer add and a float subtract: a conversion instruction has a fraction of
    their throughput, and `mmq` makes one per output element per block."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # 1.5 * 2^23


@triton.jit
def half_float(half_bits):
    """float32 of f16 bit patterns loaded as 16-bit integers."""
    return half_bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def combine_q32(dot, x_sum, x_scale, scale, minimum, QTYPE: tl.constexpr):
    """A Q4_0..Q5_1 block's contribution from its integer dot product with x's quants and the
    sum of those quants (for the offset or the min). Every kernel that multiplies these blocks
    calls this, so that a row's result does not depend on which kernel computed it."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    if HAS_MIN:
        part = half_float(scale) * exact_float(dot) + half_float(minimum) * exact_float(x_sum)
    else:
        OFFSET: tl.constexpr = 16 if QTYPE == 6 else 8
        part = half_float(scale) * exact_float(dot - OFFSET * x_sum)
    return x_scale * part


@triton.jit
def combine_q8_0(dot, x_scale, scale):
    return x_scale * half_float(scale) * exact_float(dot)


@triton.jit
def _k_scale_min(scales, mins, extra, sub):
    """Sub-block `sub`'s 6-bit scale and min from the 12 packed bytes, as words: bytes 0-3 hold
    the scales of sub-blocks 0-3 and the top bits of 4-7's, bytes 4-7 the same for mins, bytes
    8-11 the low nibbles of 4-7's scales and (high nibbles) mins."""
    shift = 8 * (sub % 4)
    low = sub < 4
    scale = tl.where(
        low, (scales >> shift) & 63, ((extra >> shift) & 15) | (((scales >> (shift + 6)) & 3) << 4)
    )
    minimum = tl.where(
        low,
        (mins >> shift) & 63,
        ((extra >> (shift + 4)) & 15) | (((mins >> (shift + 6)) & 3) << 4),
    )
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def combine_q4_k(
    low_dot, high_dot, low_sum, high_sum, low_factor, high_factor,
    header, scales, mins, extra, sub,
):  # fmt: skip
    """A Q4_K chunk's contribution from the integer dot products of its two sub-blocks (`sub`
    and `sub` + 1) with x's quants and the sums of those quants (for the mins). Products of
    the weight's factors alone and of x's alone come first: in `mmq` those are a column and a
    row of the tile, and only the rest costs an operation per output element."""
    low_scale, low_min = _k_scale_min(scales, mins, extra, sub)
    high_scale, high_min = _k_scale_min(scales, mins, extra, sub + 1)
    d, dmin = half_float((header & 0xFFFF).to(tl.uint16)), half_float((header >> 16).to(tl.uint16))
    scaled = low_factor * (d * low_scale * exact_float(low_dot))
    scaled += high_factor * (d * high_scale * exact_float(high_dot))
    offsets = low_factor * exact_float(low_sum) * (dmin * low_min)
    offsets += high_factor * exact_float(high_sum) * (dmin * high_min)
    return scaled - offsets


@triton.jit
def quarter_q6_k(dot_first, dot_second, sum_first, sum_second, x_scale, pair):
    """A Q6_K quarter's contribution before d: the integer dot products of its two 16-element
    halves with x's quants, the sums of those quants (for the offset of 32), and the halves'
    int8 scales as one 16-bit word `pair`."""
    pair = pair.to(tl.int32)
    dot = ((pair << 24) >> 24) * (dot_first - 32 * sum_first)
    dot += ((pair << 16) >> 24) * (dot_second - 32 * sum_second)
    return x_scale * dot.to(tl.float32)


@triton.jit
def to_fixed(part):
    """A group's float contribution (`units_per_group`) as a fixed-point int64 with 32
    fraction bits.
    Integer sums are exact in any order, so a row's result is the same bits whatever the
    kernel, tile, split or reduction tree that sums its groups (batch invariance); the range
    is +-2^31, and the resolution 2^-32 is finer than float32's at any output above 2^-8."""
    return (part * 4294967296.0).to(tl.int64)


@triton.constexpr_function
def units_per_group(qtype: int) -> int:
    """Units per group of 128 elements, summed in order in float32 before `to_fixed`: the
    conversion costs more than the block's own arithmetic in `mmq`."""
    return {12: 2, 14: 1}.get(qtype, 4)


@triton.jit
def from_fixed(acc):
    return acc.to(tl.float32) * 2.3283064365386963e-10  # 2^-32, exact


@triton.constexpr_function
def units_per_row(qtype: int, k: int) -> int:
    """Units in a row for a word-level reader: blocks, Q4_K super-blocks' 64-element chunks or
    Q6_K super-blocks' 128-element halves."""
    return k // {12: 64, 14: 128}.get(qtype, 32)


@triton.constexpr_function
def row_bytes(qtype: int, k: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return k // block_size * type_size


@triton.constexpr_function
def _norm_block(k: int) -> int:
    return min(triton.next_power_of_2(k), 1024)


@triton.jit
def lane_squares(x_ptr, K: tl.constexpr, HAS_NORM: tl.constexpr):
    """x², for the norm's rms, summed per lane but not yet across lanes: the loads issue with
    the dot's and the reduction's barrier comes after them (x is in L2, just written)."""
    BLOCK: tl.constexpr = _norm_block(K)
    squares = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_NORM:
        for k0 in tl.static_range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            value = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            squares += value * value
    return squares


@triton.jit
def inverse_rms(squares, K: tl.constexpr, eps, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        return tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    return 1.0


@triton.jit
def _quantize_kernel(
    x_ptr, norm_ptr, eps, out_ptr,
    K: tl.constexpr, BLOCKS: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """x (times the RMSNorm when given) as a `QuantizedX`: per 32-element block, 12 int32s: the
    8 words of its int8 quants, its scale (times 1/rms) and the sums of its halves' quants."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    mask = b < K // 32
    row = tl.program_id(1).to(tl.int64)
    x_ptr += row * K
    out_ptr += row * (K // 32 * 12)
    squares = lane_squares(x_ptr, K, HAS_NORM)
    X: tl.constexpr = X_NORMED if HAS_NORM else X_FLOAT
    low, high, scale, sum_low, sum_high = x_block(x_ptr, norm_ptr, 32 * b, mask, 1, X)
    at = 12 * b
    word = at[:, None] + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + word, tl.reshape(low, (BLOCKS, 4)), mask=mask[:, None])
    tl.store(out_ptr + word + 4, tl.reshape(high, (BLOCKS, 4)), mask=mask[:, None])
    scale = tl.reshape(scale, (BLOCKS,)) * inverse_rms(squares, K, eps, HAS_NORM)
    tl.store(out_ptr + at + 8, scale.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + at + 9, tl.reshape(sum_low, (BLOCKS,)), mask=mask)
    tl.store(out_ptr + at + 10, tl.reshape(sum_high, (BLOCKS,)), mask=mask)


def quantize_x(x: torch.Tensor, norm: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The rows of x (M, K), after the RMSNorm when given, rounded once for the matmul kernels
    that gather them: a `QuantizedX` per row, int32 (M, K / 32, 12). One program's launch
    shape serves every M, so a row's norm and quants do not depend on the rows beside it."""
    m, k = x.shape
    out = torch.empty(m, k // 32, 12, device=x.device, dtype=torch.int32)
    blocks = 8
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    pdl = uses_pdl(x.device)
    _quantize_kernel[(triton.cdiv(k // 32, blocks), m)](
        x, norm_weight, eps, out, K=k, BLOCKS=blocks, HAS_NORM=norm is not None, PDL=pdl,
        num_warps=1, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip
    return out


@functools.cache
def uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs Hopper or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
