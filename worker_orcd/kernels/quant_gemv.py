"""Decode's matrix-vector products over weights kept in their GGUF blocks, with the layer's
neighbours fused in.

At batch 1 a matmul is one pass over the weight bytes, and a token's launches cost more than its
arithmetic. So a program reads whole 16- or 32-bit words of packed quants (never one byte per
element) and unpacks them with shifts in registers into words of four 8-bit quants. x is
rounded to 8 bits per 32-element block (`quantize_activation`, llama.cpp's Q8_1), so one
`dp4a` multiplies four weights by four elements of x and sums them in integers; per-block
scales multiply the integer sums (llama.cpp's mmvq computes the same way). x is rounded either
by each program, once per tile, or once by a launch of its own (`quantize_x`) whose output
every program gathers: where the programs are many or x is long, and wherever an RMSNorm comes
first (its rms is a sum whose order follows the launch, and `quant_mmq` must see the same bits).
Formats without a word-level reader (F32, F16, BF16, Q5_K, MXFP4) take the generic tile
dequantizer and float x.

Batch invariance: a unit's (block's, K-quant chunk's) float contribution comes from a
`_combine_*` function that `quant_mmq` shares, each 128 elements' units are added in order, and
those groups are summed in fixed point (`_fixed`), exact in any order. So a row's result is the
same bits here as in `mmq`'s tiles of many rows, whatever the tile shapes or K splits.

Riding in the same launch: RMSNorm of x (1/rms is a scalar that factors out of every dot
product), bias, residual, SwiGLU over two matrices, and q, k and v, three matrices of one
input. The torch reference is `quantize_activation(x) @ dequantize(W).T` (x unrounded for the
generic formats) with the same neighbours applied in torch. Tiles are fixed per shape and there
are no atomics, so every result is reproducible.

A program covers whole rows: K is a compile-time constant, and the rows' words are loaded as
one or two tiles (up to 2 * UNIT_CAP blocks) issued together, so a launch waits on memory once
rather than once per step of a loop. On Hopper, kernels are launched with programmatic dependent
launch: the next kernel starts while this one runs, loads its weights (which no kernel writes),
and only then waits for the kernel before it, whose output is its x. A decode token is one
chain of such launches, so launch latency and the first trip to memory overlap the previous
kernel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from worker_orcd.kernels.blocks import SUPPORTED, dequant_tile

T = GGMLQuantizationType
UNIT_CAP = 64  # units (blocks or K-quant chunks) per tile: bounds a program's registers
GENERIC_BLOCK_K = tl.constexpr(256)  # elements per step for formats read by `dequant_tile`
# formats read by words and multiplied in 8-bit integers with x quantized as `quantize_activation`
INTEGER_DOT = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K})
X_FLOAT, X_NORMED, X_QUANTIZED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # x as given
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


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
def _x(x_ptr, norm_ptr, index, mask, HAS_NORM: tl.constexpr):
    """x at `index`, times the RMSNorm weight when there is one."""
    value = tl.load(x_ptr + index, mask=mask, other=0.0)
    if HAS_NORM:
        value *= tl.load(norm_ptr + index, mask=mask, other=0.0)
    return value


@triton.jit
def _dp4a(a, b, acc):
    """acc + the dot product of a's and b's four signed bytes: one instruction on the GPU,
    emulated in Triton's interpreter, which runs no inline assembly."""
    if _INTERPRET:
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        result = acc
    else:
        result = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
            dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    return result


@triton.jit
def _round(v):
    """v rounded to the nearest integer, ties to even, as int32 (torch.round's rule)."""
    if _INTERPRET:
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
def _x_block(x_ptr, norm_ptr, first, mask, ROWS: tl.constexpr, X: tl.constexpr):
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
        x_low = _x(x_ptr, norm_ptr, index, mask[:, None, None], X == X_NORMED)
        x_high = _x(x_ptr, norm_ptr, index + 16, mask[:, None, None], X == X_NORMED)
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
def _dot_words(weights, x_words):
    """Sum over the last axis of dp4a(weights, x): (rows, units, words), x broadcast."""
    x_words = tl.broadcast_to(x_words, weights.shape)
    return tl.sum(_dp4a(weights, x_words, tl.zeros(weights.shape, dtype=tl.int32)), axis=2)


@triton.jit
def _word(low, high):
    """int32 words from their 16-bit halves (blocks of these formats are 2-byte aligned)."""
    return low.to(tl.int32) | (high.to(tl.int32) << 16)


@triton.jit
def _float(i):
    """float32 of an int32 of magnitude below 2^22 (every block's integer dot product here),
    exactly, in an integer add and a float subtract: a conversion instruction has a fraction of
    their throughput, and `mmq` makes one per output element per block."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # 1.5 * 2^23


@triton.jit
def _f32(half_bits):
    """float32 of f16 bit patterns loaded as 16-bit integers."""
    return half_bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _halves16(ptr, mask):
    """The 16-bit halves of the four words at `ptr` (rows, units) of 16-bit words."""
    j = 2 * tl.arange(0, 4)[None, None, :]
    return (
        tl.load(ptr[:, :, None] + j, mask=mask[:, :, None], other=0),
        tl.load(ptr[:, :, None] + j + 1, mask=mask[:, :, None], other=0),
    )


@triton.jit
def _load_q32(row, rmask, unit0, n_units, QTYPE: tl.constexpr, NB: tl.constexpr):
    """Q4_0, Q4_1, Q5_0, Q5_1 blocks unit0.. as 16-bit words: f16 scale (and min), 32 high bits
    (Q5), then 16 bytes whose low nibbles are elements 0-15 and high nibbles 16-31."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    HAS_HIGH: tl.constexpr = QTYPE == 6 or QTYPE == 7
    SIZE: tl.constexpr = 18 if QTYPE == 2 else (20 if QTYPE == 3 else (22 if QTYPE == 6 else 24))
    HIGH_AT: tl.constexpr = 2 if HAS_MIN else 1  # in 16-bit words
    QS_AT: tl.constexpr = HIGH_AT + (2 if HAS_HIGH else 0)
    b = unit0 + tl.arange(0, NB)
    mask = rmask[:, None] & (b < n_units)[None, :]
    words = (row[:, None] + b[None, :] * SIZE).to(tl.pointer_type(tl.uint16))
    scale = tl.load(words, mask=mask, other=0)
    minimum, low, high = scale, scale, scale  # placeholders where the format has none
    if HAS_MIN:
        minimum = tl.load(words + 1, mask=mask, other=0)
    if HAS_HIGH:
        low = tl.load(words + HIGH_AT, mask=mask, other=0)
        high = tl.load(words + HIGH_AT + 1, mask=mask, other=0)
    return _halves16(words + QS_AT, mask), scale, minimum, low, high


@triton.jit
def _spread_bits(bits):
    """The low 4 bits of `bits`, one to bit 0 of each byte (no two products overlap)."""
    return ((bits & 15) * 0x00204081) & 0x01010101


@triton.jit
def _dot_q32(
    raw, x_ptr, norm_ptr, unit0, n_units,
    QTYPE: tl.constexpr, NB: tl.constexpr, X: tl.constexpr,
):  # fmt: skip
    """Word j of a block's quants holds elements 4j..4j+3 in its bytes' low nibbles and
    16+4j.. in their high nibbles; Q5's high bits become bit 4 of each byte."""
    HAS_HIGH: tl.constexpr = QTYPE == 6 or QTYPE == 7
    quants, scale, minimum, low, high = raw
    b = unit0 + tl.arange(0, NB)
    x_low, x_high, x_scale, x_sum, x_sum_high = _x_block(
        x_ptr, norm_ptr, 32 * b, b < n_units, scale.shape[0], X
    )
    v = _word(quants[0], quants[1])
    q_low, q_high = v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F
    if HAS_HIGH:
        bits = _word(low, high)[:, :, None] >> (4 * tl.arange(0, 4)[None, None, :])
        q_low |= _spread_bits(bits) << 4
        q_high |= _spread_bits(bits >> 16) << 4
    dot = _dot_words(q_low, x_low) + _dot_words(q_high, x_high)
    return _combine_q32(dot, x_sum + x_sum_high, x_scale, scale, minimum, QTYPE)


@triton.jit
def _combine_q32(dot, x_sum, x_scale, scale, minimum, QTYPE: tl.constexpr):
    """A Q4_0..Q5_1 block's contribution from its integer dot product with x's quants and the
    sum of those quants (for the offset or the min). Every kernel that multiplies these blocks
    calls this, so that a row's result does not depend on which kernel computed it."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    if HAS_MIN:
        part = _f32(scale) * _float(dot) + _f32(minimum) * _float(x_sum)
    else:
        OFFSET: tl.constexpr = 16 if QTYPE == 6 else 8
        part = _f32(scale) * _float(dot - OFFSET * x_sum)
    return x_scale * part


@triton.jit
def _load_q8_0(row, rmask, unit0, n_units, NB: tl.constexpr):
    """Q8_0 blocks unit0..: f16 scale, 32 int8s; as 16-bit words."""
    b = unit0 + tl.arange(0, NB)
    mask = rmask[:, None] & (b < n_units)[None, :]
    words = (row[:, None] + b[None, :] * 34).to(tl.pointer_type(tl.uint16))
    return _halves16(words + 1, mask), _halves16(words + 9, mask), tl.load(words, mask=mask)


@triton.jit
def _dot_q8_0(raw, x_ptr, norm_ptr, unit0, n_units, NB: tl.constexpr, X: tl.constexpr):
    first, second, scale = raw
    b = unit0 + tl.arange(0, NB)
    x_first, x_second, x_scale, _, _ = _x_block(
        x_ptr, norm_ptr, 32 * b, b < n_units, scale.shape[0], X
    )
    dot = _dot_words(_word(first[0], first[1]), x_first)
    dot += _dot_words(_word(second[0], second[1]), x_second)
    return _combine_q8_0(dot, x_scale, scale)


@triton.jit
def _combine_q8_0(dot, x_scale, scale):
    return x_scale * _f32(scale) * _float(dot)


@triton.jit
def _load_q4_k(row, rmask, unit0, n_units, G: tl.constexpr):
    """Q4_K super-blocks (256 elements, 144 bytes): f16 d and dmin, 12 bytes of 6-bit scales and
    mins for 8 sub-blocks, then 4 chunks of 32 bytes, chunk c's low nibbles being sub-block 2c
    and its high nibbles 2c+1. A unit is a chunk, as two halves of 4 32-bit words, with its
    block's d, dmin and scale bytes as 32-bit words."""
    c = unit0 + tl.arange(0, G)
    mask = rmask[:, None] & (c < n_units)[None, :]
    block = (row[:, None] + (c // 4)[None, :] * 144).to(tl.pointer_type(tl.int32))
    chunk = block[:, :, None] + 4 + 8 * (c % 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    first = tl.load(chunk, mask=mask[:, :, None], other=0)
    second = tl.load(chunk + 4, mask=mask[:, :, None], other=0)
    header = tl.load(block, mask=mask, other=0)
    scales = tl.load(block + 1, mask=mask, other=0)
    mins = tl.load(block + 2, mask=mask, other=0)
    extra = tl.load(block + 3, mask=mask, other=0)
    return first, second, header, scales, mins, extra


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
def _dot_q4_k(raw, x_ptr, norm_ptr, unit0, n_units, G: tl.constexpr, X: tl.constexpr):
    """Byte i of a chunk's word w holds its elements 4w+i (low nibble) and 32+4w+i (high)."""
    first, second, header, scales, mins, extra = raw
    c = unit0 + tl.arange(0, G)
    cmask = c < n_units
    low_x = _x_block(x_ptr, norm_ptr, 64 * c, cmask, header.shape[0], X)
    high_x = _x_block(x_ptr, norm_ptr, 64 * c + 32, cmask, header.shape[0], X)
    low_dot = _dot_words(first & 0x0F0F0F0F, low_x[0])
    low_dot += _dot_words(second & 0x0F0F0F0F, low_x[1])
    high_dot = _dot_words((first >> 4) & 0x0F0F0F0F, high_x[0])
    high_dot += _dot_words((second >> 4) & 0x0F0F0F0F, high_x[1])
    return _combine_q4_k(
        low_dot, high_dot, low_x[3] + low_x[4], high_x[3] + high_x[4], low_x[2], high_x[2],
        header, scales, mins, extra, 2 * (c % 4)[None, :],
    )  # fmt: skip


@triton.jit
def _combine_q4_k(
    low_dot, high_dot, low_sum, high_sum, low_factor, high_factor,
    header, scales, mins, extra, sub,
):  # fmt: skip
    """A Q4_K chunk's contribution from the integer dot products of its two sub-blocks (`sub`
    and `sub` + 1) with x's quants and the sums of those quants (for the mins). Products of
    the weight's factors alone and of x's alone come first: in `mmq` those are a column and a
    row of the tile, and only the rest costs an operation per output element."""
    low_scale, low_min = _k_scale_min(scales, mins, extra, sub)
    high_scale, high_min = _k_scale_min(scales, mins, extra, sub + 1)
    d, dmin = _f32((header & 0xFFFF).to(tl.uint16)), _f32((header >> 16).to(tl.uint16))
    scaled = low_factor * (d * low_scale * _float(low_dot))
    scaled += high_factor * (d * high_scale * _float(high_dot))
    offsets = low_factor * _float(low_sum) * (dmin * low_min)
    offsets += high_factor * _float(high_sum) * (dmin * high_min)
    return scaled - offsets


@triton.jit
def _load_q6_k(row, rmask, unit0, n_units, G: tl.constexpr):
    """Q6_K super-blocks (256 elements, 210 bytes): 128 bytes of low nibbles (ql), 64 of 2-bit
    high pairs (qh), 16 int8 scales (one per 16 elements), f16 d. Half h of the block uses
    ql[64h:][:64] and qh[32h:][:32]: for l < 32, ql[64h+l] holds elements 128h+l (low nibble) and
    128h+64+l (high), ql[64h+32+l] holds 128h+32+l and 128h+96+l, qh[32h+l] their high pairs.
    A unit is a half: its ql and qh as 16-bit halves of words, in two halves of 4 words
    each, its 8 scales as 4 16-bit words (one per quarter), and d."""
    c = unit0 + tl.arange(0, G)
    mask = rmask[:, None] & (c < n_units)[None, :]
    block = (row[:, None] + (c // 2)[None, :] * 210).to(tl.pointer_type(tl.uint16))
    half = (c % 2)[None, :]
    ql, qh = block + 32 * half, block + 64 + 16 * half
    quants = (
        _halves16(ql, mask), _halves16(ql + 8, mask), _halves16(ql + 16, mask),
        _halves16(ql + 24, mask), _halves16(qh, mask), _halves16(qh + 8, mask),
    )  # fmt: skip
    scales = block + 96 + 4 * half
    scales = (
        tl.load(scales, mask=mask, other=0), tl.load(scales + 1, mask=mask, other=0),
        tl.load(scales + 2, mask=mask, other=0), tl.load(scales + 3, mask=mask, other=0),
    )  # fmt: skip
    return quants, scales, tl.load(block + 104, mask=mask, other=0)


@triton.jit
def _dot_q6_k(raw, x_ptr, norm_ptr, unit0, n_units, G: tl.constexpr, X: tl.constexpr):
    """Quarter k of a half (elements 32k..32k+31) takes the low (k < 2) or high nibbles of ql's
    first (k even) or second 32 bytes, bits 2k of qh, and scales 2k (its first 16 elements)
    and 2k+1."""
    quants, scales, d = raw
    ql_low = _word(quants[0][0], quants[0][1]), _word(quants[1][0], quants[1][1])
    ql_high = _word(quants[2][0], quants[2][1]), _word(quants[3][0], quants[3][1])
    qh = _word(quants[4][0], quants[4][1]), _word(quants[5][0], quants[5][1])
    c = unit0 + tl.arange(0, G)
    cmask = c < n_units
    total = tl.zeros(d.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        x = _x_block(x_ptr, norm_ptr, 128 * c + 32 * k, cmask, d.shape[0], X)
        shift = 4 * (k // 2)
        ql = ql_low if k % 2 == 0 else ql_high
        q_first = ((ql[0] >> shift) & 0x0F0F0F0F) | (((qh[0] >> (2 * k)) & 0x03030303) << 4)
        q_second = ((ql[1] >> shift) & 0x0F0F0F0F) | (((qh[1] >> (2 * k)) & 0x03030303) << 4)
        total += _quarter_q6_k(
            _dot_words(q_first, x[0]), _dot_words(q_second, x[1]), x[3], x[4], x[2], scales[k]
        )
    return _f32(d) * total


@triton.jit
def _quarter_q6_k(dot_first, dot_second, sum_first, sum_second, x_scale, pair):
    """A Q6_K quarter's contribution before d: the integer dot products of its two 16-element
    halves with x's quants, the sums of those quants (for the offset of 32), and the halves'
    int8 scales as one 16-bit word `pair`."""
    pair = pair.to(tl.int32)
    dot = ((pair << 24) >> 24) * (dot_first - 32 * sum_first)
    dot += ((pair << 16) >> 24) * (dot_second - 32 * sum_second)
    return x_scale * dot.to(tl.float32)


@triton.jit
def _fixed(part):
    """A group's float contribution (`_group`) as a fixed-point int64 with 32 fraction bits.
    Integer sums are exact in any order, so a row's result is the same bits whatever the
    kernel, tile, split or reduction tree that sums its groups (batch invariance); the range
    is +-2^31, and the resolution 2^-32 is finer than float32's at any output above 2^-8."""
    return (part * 4294967296.0).to(tl.int64)


@triton.constexpr_function
def _group(qtype: int) -> int:
    """Units per group of 128 elements, summed in order in float32 before `_fixed`: the
    conversion costs more than the block's own arithmetic in `mmq`."""
    return {12: 2, 14: 1}.get(qtype, 4)


@triton.jit
def _grouped(parts, G: tl.constexpr):
    """The sums of each G consecutive units' parts (rows, units) in unit order, as `mmq` adds
    them: (rows, units / G). A masked sum of one element and zeros is that element, exactly."""
    if G == 1:
        total = parts
    else:
        grouped = tl.reshape(parts, (parts.shape[0], parts.shape[1] // G, G))
        j = tl.arange(0, G)[None, None, :]
        total = tl.sum(tl.where(j == 0, grouped, 0.0), axis=2)
        for i in tl.static_range(1, G):
            total += tl.sum(tl.where(j == i, grouped, 0.0), axis=2)
    return total


@triton.jit
def _unfixed(acc):
    return acc.to(tl.float32) * 2.3283064365386963e-10  # 2^-32, exact


@triton.constexpr_function
def _units(qtype: int, k: int) -> int:
    """Units in a row for a word-level reader: blocks, Q4_K super-blocks' 64-element chunks or
    Q6_K super-blocks' 128-element halves."""
    return k // {12: 64, 14: 128}.get(qtype, 32)


@triton.constexpr_function
def _step(qtype: int, k: int) -> int:
    """Units per full tile, a power of two, at most UNIT_CAP (registers): the row's units
    rounded up if that pads them by at most 1/8, else rounded down (a tail tile takes the
    rest); whole groups."""
    units = _units(qtype, k)
    up = triton.next_power_of_2(units)
    return max(min(up if 8 * units >= 7 * up else up // 2, UNIT_CAP), _group(qtype))


@triton.constexpr_function
def _end(qtype: int, k: int) -> int:
    """Where the full tiles end: the first tile is loaded even when it is masked."""
    step = _step(qtype, k)
    return max(step, _units(qtype, k) // step * step)


@triton.constexpr_function
def _tail(qtype: int, k: int) -> int:
    """Units in the last, partial tile (a power of two, masked), or 0."""
    rest = _units(qtype, k) - _end(qtype, k)
    return max(triton.next_power_of_2(rest), _group(qtype)) if rest > 0 else 0


@triton.constexpr_function
def _word_level(qtype: int) -> bool:
    return qtype in INTEGER_DOT


@triton.constexpr_function
def _row_bytes(qtype: int, k: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return k // block_size * type_size


@triton.constexpr_function
def _norm_block(k: int) -> int:
    return min(triton.next_power_of_2(k), 1024)


@triton.jit
def _load(row, rmask, unit0, n_units, QTYPE: tl.constexpr, UNITS: tl.constexpr):
    if QTYPE == 8:
        raw = _load_q8_0(row, rmask, unit0, n_units, UNITS)
    elif QTYPE == 12:
        raw = _load_q4_k(row, rmask, unit0, n_units, UNITS)
    elif QTYPE == 14:
        raw = _load_q6_k(row, rmask, unit0, n_units, UNITS)
    else:
        raw = _load_q32(row, rmask, unit0, n_units, QTYPE, UNITS)
    return raw


@triton.jit
def _dot(
    raw, x_ptr, norm_ptr, unit0, n_units,
    QTYPE: tl.constexpr, UNITS: tl.constexpr, X: tl.constexpr,
):  # fmt: skip
    if QTYPE == 8:
        part = _dot_q8_0(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, X)
    elif QTYPE == 12:
        part = _dot_q4_k(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, X)
    elif QTYPE == 14:
        part = _dot_q6_k(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, X)
    else:
        part = _dot_q32(raw, x_ptr, norm_ptr, unit0, n_units, QTYPE, UNITS, X)
    return part


@triton.jit
def _row_starts(w_ptr, rows, N, K: tl.constexpr, QTYPE: tl.constexpr):
    return w_ptr + rows.to(tl.int64) * _row_bytes(QTYPE, K), rows < N


@triton.jit
def _prefetch(w_ptr, rows, N, K: tl.constexpr, QTYPE: tl.constexpr):
    """The raw words of W[rows]'s first and last tiles: whole rows up to 2 * UNIT_CAP units.
    Weights do not depend on the previous kernel, so they load before waiting for it."""
    row, rmask = _row_starts(w_ptr, rows, N, K, QTYPE)
    if _word_level(QTYPE):
        UNITS: tl.constexpr = _units(QTYPE, K)
        first = _load(row, rmask, 0, UNITS, QTYPE, _step(QTYPE, K))
        last = first
        if _tail(QTYPE, K) > 0:
            last = _load(row, rmask, _end(QTYPE, K), UNITS, QTYPE, _tail(QTYPE, K))
    else:
        first, last = rows, rows  # placeholders: these formats load as they go
    return first, last


@triton.jit
def _dot_rows(
    prefetched, w_ptr, rows, N, x_ptr, norm_ptr,
    K: tl.constexpr, QTYPE: tl.constexpr, BN: tl.constexpr, X: tl.constexpr,
):  # fmt: skip
    """W[rows] @ x, with x times the norm weight but not yet divided by its rms (X, see
    `_x_block`): (BN,) float32."""
    first, last = prefetched
    row, rmask = _row_starts(w_ptr, rows, N, K, QTYPE)
    if _word_level(QTYPE):
        UNITS: tl.constexpr = _units(QTYPE, K)
        STEP: tl.constexpr = _step(QTYPE, K)
        G: tl.constexpr = _group(QTYPE)
        part = _dot(first, x_ptr, norm_ptr, 0, UNITS, QTYPE, STEP, X)
        acc = tl.sum(_fixed(_grouped(part, G)), axis=1)
        for unit0 in tl.range(STEP, _end(QTYPE, K), STEP):
            raw = _load(row, rmask, unit0, UNITS, QTYPE, STEP)
            part = _dot(raw, x_ptr, norm_ptr, unit0, UNITS, QTYPE, STEP, X)
            acc += tl.sum(_fixed(_grouped(part, G)), axis=1)
        if _tail(QTYPE, K) > 0:
            tail = _dot(last, x_ptr, norm_ptr, _end(QTYPE, K), UNITS, QTYPE, _tail(QTYPE, K), X)
            acc += tl.sum(_fixed(_grouped(tail, G)), axis=1)
        acc = _unfixed(acc)
    else:
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, K, GENERIC_BLOCK_K):
            tile = dequant_tile(
                w_ptr, rows, rmask, k0, _row_bytes(QTYPE, K), K, QTYPE, BN, GENERIC_BLOCK_K
            )
            cols = k0 + tl.arange(0, GENERIC_BLOCK_K)
            acc += tl.sum(
                tile * _x(x_ptr, norm_ptr, cols, cols < K, X == X_NORMED)[None, :], axis=1
            )
    return acc


@triton.jit
def _squares(x_ptr, K: tl.constexpr, HAS_NORM: tl.constexpr):
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
def _inverse_rms(squares, K: tl.constexpr, eps, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        return tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    return 1.0


@triton.jit
def _project(
    w_ptr, bias_ptr, out_ptr, N, block, x_ptr, norm_ptr, eps, residual_ptr,
    K: tl.constexpr, QTYPE: tl.constexpr, BN: tl.constexpr, X: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    rows = block * BN + tl.arange(0, BN)
    mask = rows < N
    weights = _prefetch(w_ptr, rows, N, K, QTYPE)
    if PDL:
        tl.extra.cuda.gdc_wait()
    squares = _squares(x_ptr, K, X == X_NORMED)
    y = _dot_rows(weights, w_ptr, rows, N, x_ptr, norm_ptr, K, QTYPE, BN, X)
    y *= _inverse_rms(squares, K, eps, X == X_NORMED)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=mask, other=0.0)
    tl.store(out_ptr + rows, y, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, norm_ptr, eps, residual_ptr,
    a_ptr, a_bias, a_out, a_rows,
    b_ptr, b_bias, b_out, b_rows,
    c_ptr, c_bias, c_out, c_rows,
    K: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QC: tl.constexpr,
    MATRICES: tl.constexpr, SWIGLU: tl.constexpr, X: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs 0.. cover A's rows, then B's, then C's; with SWIGLU each covers A's and B's.
    Under programmatic dependent launch (PDL) a program lets the next kernel launch at once,
    loads its weights, and only then waits for the previous kernel, which wrote x."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if SWIGLU:
        rows = pid * BN + tl.arange(0, BN)
        gate_weights = _prefetch(a_ptr, rows, a_rows, K, QA)
        up_weights = _prefetch(b_ptr, rows, b_rows, K, QB)
        if PDL:
            tl.extra.cuda.gdc_wait()
        squares = _squares(x_ptr, K, X == X_NORMED)
        gate = _dot_rows(gate_weights, a_ptr, rows, a_rows, x_ptr, norm_ptr, K, QA, BN, X)
        up = _dot_rows(up_weights, b_ptr, rows, b_rows, x_ptr, norm_ptr, K, QB, BN, X)
        scale = _inverse_rms(squares, K, eps, X == X_NORMED)
        gate, up = gate * scale, up * scale
        tl.store(a_out + rows, gate * tl.sigmoid(gate) * up, mask=rows < a_rows)
    elif MATRICES == 1:
        _project(
            a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
            K, QA, BN, X, HAS_BIAS, HAS_RESIDUAL, PDL,
        )  # fmt: skip
    else:
        a_blocks = tl.cdiv(a_rows, BN)
        b_blocks = tl.cdiv(b_rows, BN)
        if pid < a_blocks:
            _project(
                a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
                K, QA, BN, X, HAS_BIAS, False, PDL,
            )  # fmt: skip
        elif pid < a_blocks + b_blocks:
            _project(
                b_ptr, b_bias, b_out, b_rows, pid - a_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QB, BN, X, HAS_BIAS, False, PDL,
            )  # fmt: skip
        else:
            _project(
                c_ptr, c_bias, c_out, c_rows, pid - a_blocks - b_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QC, BN, X, HAS_BIAS, False, PDL,
            )  # fmt: skip


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
    squares = _squares(x_ptr, K, HAS_NORM)
    X: tl.constexpr = X_NORMED if HAS_NORM else X_FLOAT
    low, high, scale, sum_low, sum_high = _x_block(x_ptr, norm_ptr, 32 * b, mask, 1, X)
    at = 12 * b
    word = at[:, None] + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + word, tl.reshape(low, (BLOCKS, 4)), mask=mask[:, None])
    tl.store(out_ptr + word + 4, tl.reshape(high, (BLOCKS, 4)), mask=mask[:, None])
    scale = tl.reshape(scale, (BLOCKS,)) * _inverse_rms(squares, K, eps, HAS_NORM)
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


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows per program
    num_warps: int
    quantize_first: bool = False  # round x in a launch of its own (integer formats only)


def gemv_config(qtype: GGMLQuantizationType, n: int, k: int, matrices: int = 1) -> GemvConfig:
    """A fixed choice per shape, never autotuned (see the module docstring), from
    bench/tile_sweep.py's timings on the real matrices (BENCHMARKS.md). Where x is long (an FFN's
    down projection) or the programs are many (an output head, gate and up), rounding x in
    each program costs more than a launch that rounds it once."""
    if n >= 65536:  # an output head
        return GemvConfig(4, 2, quantize_first=True)
    if k >= 4096:  # long rows: an FFN's down projection
        return GemvConfig(4, 2 if qtype == T.Q6_K else 4, quantize_first=True)
    if n >= 4096:  # an FFN's gate and up
        return GemvConfig(2, 2, quantize_first=True)
    return GemvConfig(16, 4 if matrices == 3 else 2)  # q, k and v; other square projections


@functools.cache
def uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs Hopper or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch(
    x: torch.Tensor,
    matrices: list[Matrix],
    biases: list[torch.Tensor | None],
    residual: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None,
    swiglu: bool,
    config: GemvConfig | None = None,
) -> list[torch.Tensor]:
    for matrix in matrices:
        if matrix.qtype not in SUPPORTED:
            raise ValueError(f"no quantized matmul for {matrix.qtype.name}")
    x = x.reshape(-1).contiguous()
    produced = matrices[:1] if swiglu else matrices  # SwiGLU writes one output for two
    outputs = [torch.empty(1, m.shape[0], device=x.device, dtype=torch.float32) for m in produced]
    config = config or gemv_config(
        matrices[0].qtype, matrices[0].shape[0], x.numel(), len(matrices)
    )
    programs = sum(triton.cdiv(m.shape[0], config.block_n) for m in produced)
    per_matrix = []  # the kernel takes three matrices; unused slots repeat the first
    for i in range(3):
        matrix = matrices[i] if i < len(matrices) else matrices[0]
        bias = biases[i] if i < len(biases) and biases[i] is not None else outputs[0]
        out = outputs[i] if i < len(outputs) else outputs[0]
        per_matrix += [matrix.blocks, bias, out, matrix.shape[0]]
    qtypes = [int(matrices[min(i, len(matrices) - 1)].qtype) for i in range(3)]
    k, mode = x.numel(), X_NORMED if norm is not None else X_FLOAT
    # A norm's rms is a sum over the row whose order follows the launch shape: the rows it
    # normalizes are rounded in `quantize_x`, which `mmq` shares, so both see the same bits.
    integer = all(m.qtype in INTEGER_DOT for m in matrices)
    if integer and (config.quantize_first or norm is not None):
        x, norm, mode = quantize_x(x.view(1, k), norm), None, X_QUANTIZED
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    pdl = uses_pdl(x.device)
    _gemv_kernel[(programs,)](
        x, norm_weight, eps, residual if residual is not None else outputs[0], *per_matrix,
        K=k, QA=qtypes[0], QB=qtypes[1], QC=qtypes[2],
        MATRICES=len(matrices), SWIGLU=swiglu, X=mode,
        HAS_BIAS=any(b is not None for b in biases), HAS_RESIDUAL=residual is not None,
        BN=config.block_n, PDL=pdl, num_warps=config.num_warps, launch_pdl=pdl,
        enable_fp_fusion=False,
    )  # fmt: skip
    return outputs


def gemv(
    x: torch.Tensor,
    matrix: Matrix,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """One token: `rmsnorm(x) @ W.T + bias + residual` (each part when given). x (1, K) float32,
    `norm` an RMSNorm's (weight, eps); returns (1, N) float32."""
    return _launch(x, [matrix], [bias], residual, norm, swiglu=False, config=config)[0]


def gemv_swiglu(
    x: torch.Tensor,
    gate: Matrix,
    up: Matrix,
    norm: tuple[torch.Tensor, float] | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """One token: `silu(x' @ G.T) * (x' @ U.T)` with x' = rmsnorm(x) when `norm` is given."""
    return _launch(x, [gate, up], [None, None], None, norm, swiglu=True, config=config)[0]


def gemv_qkv(
    x: torch.Tensor,
    matrices: list[Matrix],
    biases: list[torch.Tensor | None],
    norm: tuple[torch.Tensor, float] | None = None,
    config: GemvConfig | None = None,
) -> list[torch.Tensor]:
    """One token, three matrices of one input (q, k and v) in one launch: each
    `rmsnorm(x) @ W.T + bias`. Biases are all given or all None."""
    if len(matrices) != 3 or len({b is None for b in biases}) > 1:
        raise ValueError("expected three matrices with biases all given or all None")
    return _launch(x, matrices, biases, None, norm, swiglu=False, config=config)
