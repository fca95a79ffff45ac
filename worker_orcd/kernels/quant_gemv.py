"""Decode's matrix-vector products over weights kept in their GGUF blocks, with the layer's
neighbours fused in.

At batch 1 a matmul is one pass over the weight bytes, and a token's launches cost more than its
arithmetic. So a program reads whole 16- or 32-bit words of packed quants (never one byte per
element), unpacks them with shifts in registers and multiplies them with the elements of x that
the word holds, gathered in the word's own order; per-block scales multiply partial sums, not
elements (llama.cpp's mmvq reads blocks the same way). Formats without a word-level reader here
(F32, F16, BF16, Q5_K, MXFP4) take the generic tile dequantizer.

Riding in the same launch: RMSNorm of x (1/rms is a scalar that factors out of every dot
product, and the norm weight multiplies x as it is loaded), bias, residual, SwiGLU over two
matrices, and q, k and v, three matrices of one input. The torch reference is
`x @ dequantize(W).T` with the same neighbours applied in torch. Tiles are fixed per shape and
there are no atomics, so the order of every sum, and so every result, is reproducible.

A program covers whole rows: K is a compile-time constant, and the rows' words are loaded as
one or two tiles (up to 2 * UNIT_CAP blocks) issued together, so a launch waits on memory once
rather than once per step of a loop. On Hopper, kernels are launched with programmatic dependent
launch: the next kernel starts while this one runs, loads its weights (which no kernel writes),
and only then waits for the kernel before it, whose output is its x. A decode token is one
chain of such launches, so launch latency and the first trip to memory overlap the previous
kernel. x is gathered in the tile's own layout (see `_spread`).
"""

from __future__ import annotations

import functools
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


class Matrix(Protocol):
    blocks: torch.Tensor  # uint8, the tensor's GGUF bytes
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # (rows, cols)


@triton.jit
def _x(x_ptr, norm_ptr, index, mask, HAS_NORM: tl.constexpr):
    """x at `index`, times the RMSNorm weight when there is one."""
    value = tl.load(x_ptr + index, mask=mask, other=0.0)
    if HAS_NORM:
        value *= tl.load(norm_ptr + index, mask=mask, other=0.0)
    return value


@triton.jit
def _spread(index, mask, shape: tl.constexpr):
    """A (units, words) gather of x, repeated over a tile's rows: loading x in the tile's own
    layout costs a few L1 hits, where loading it once would cost a trip through shared memory
    and a barrier for each gather, one after another."""
    return tl.broadcast_to(index[None, :, :], shape), tl.broadcast_to(
        mask[:, None][None, :, :], shape
    )


@triton.jit
def _f32(half_bits):
    """float32 of f16 bit patterns loaded as 16-bit integers."""
    return half_bits.to(tl.float16, bitcast=True).to(tl.float32)


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
    w = tl.arange(0, 8)
    quants = tl.load(words[:, :, None] + QS_AT + w[None, None, :], mask=mask[:, :, None], other=0)
    scale = tl.load(words, mask=mask, other=0)
    minimum, low, high = scale, scale, scale  # placeholders where the format has none
    if HAS_MIN:
        minimum = tl.load(words + 1, mask=mask, other=0)
    if HAS_HIGH:
        low = tl.load(words + HIGH_AT, mask=mask, other=0)
        high = tl.load(words + HIGH_AT + 1, mask=mask, other=0)
    return quants, scale, minimum, low, high


@triton.jit
def _dot_q32(
    raw, x_ptr, norm_ptr, unit0, n_units,
    QTYPE: tl.constexpr, NB: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """Word w of a block's quants holds elements 2w and 2w+1 (low nibbles of its two bytes) and
    2w+16 and 2w+17 (high nibbles); x is gathered in that order."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    HAS_HIGH: tl.constexpr = QTYPE == 6 or QTYPE == 7
    quants, scale, minimum, low, high = raw
    b = unit0 + tl.arange(0, NB)
    bmask = b < n_units
    w = tl.arange(0, 8)
    v = quants.to(tl.int32)
    index, xmask = _spread(32 * b[:, None] + 2 * w[None, :], bmask, v.shape)
    x0 = _x(x_ptr, norm_ptr, index, xmask, HAS_NORM)
    x1 = _x(x_ptr, norm_ptr, index + 1, xmask, HAS_NORM)
    x16 = _x(x_ptr, norm_ptr, index + 16, xmask, HAS_NORM)
    x17 = _x(x_ptr, norm_ptr, index + 17, xmask, HAS_NORM)
    q0, q1, q16, q17 = v & 15, (v >> 8) & 15, (v >> 4) & 15, (v >> 12) & 15
    if HAS_HIGH:
        low = low.to(tl.int32)[:, :, None] >> (2 * w[None, None, :])
        high = high.to(tl.int32)[:, :, None] >> (2 * w[None, None, :])
        q0 |= (low & 1) << 4
        q1 |= (low & 2) << 3
        q16 |= (high & 1) << 4
        q17 |= (high & 2) << 3
    products = q0.to(tl.float32) * x0 + q1.to(tl.float32) * x1
    products += q16.to(tl.float32) * x16 + q17.to(tl.float32) * x17
    dot = tl.sum(products, axis=2)
    x_sum = tl.sum(x0 + x1 + x16 + x17, axis=2)
    if HAS_MIN:
        part = _f32(scale) * dot + _f32(minimum) * x_sum
    else:
        OFFSET: tl.constexpr = 16 if HAS_HIGH else 8
        part = _f32(scale) * (dot - OFFSET * x_sum)
    return part


@triton.jit
def _load_q8_0(row, rmask, unit0, n_units, NB: tl.constexpr):
    """Q8_0 blocks unit0..: f16 scale, 32 int8s; as 16-bit words of two elements each."""
    b = unit0 + tl.arange(0, NB)
    mask = rmask[:, None] & (b < n_units)[None, :]
    words = (row[:, None] + b[None, :] * 34).to(tl.pointer_type(tl.int16))
    w = tl.arange(0, 16)
    quants = tl.load(words[:, :, None] + 1 + w[None, None, :], mask=mask[:, :, None], other=0)
    return quants, tl.load(words, mask=mask, other=0)


@triton.jit
def _dot_q8_0(raw, x_ptr, norm_ptr, unit0, n_units, NB: tl.constexpr, HAS_NORM: tl.constexpr):
    quants, scale = raw
    b = unit0 + tl.arange(0, NB)
    bmask = b < n_units
    v = quants.to(tl.int32)  # sign-extended: the high byte is v >> 8
    low = ((v & 255) ^ 128) - 128
    index, xmask = _spread(32 * b[:, None] + 2 * tl.arange(0, 16)[None, :], bmask, v.shape)
    even = _x(x_ptr, norm_ptr, index, xmask, HAS_NORM)
    odd = _x(x_ptr, norm_ptr, index + 1, xmask, HAS_NORM)
    dot = tl.sum(low.to(tl.float32) * even + (v >> 8).to(tl.float32) * odd, axis=2)
    return _f32(scale) * dot


@triton.jit
def _load_q4_k(row, rmask, unit0, n_units, G: tl.constexpr):
    """Q4_K super-blocks (256 elements, 144 bytes): f16 d and dmin, 12 bytes of 6-bit scales and
    mins for 8 sub-blocks, then 4 chunks of 32 bytes, chunk c's low nibbles being sub-block 2c
    and its high nibbles 2c+1. A unit is a chunk, as 8 32-bit words, with its block's d, dmin
    and scale bytes as 32-bit words."""
    c = unit0 + tl.arange(0, G)
    mask = rmask[:, None] & (c < n_units)[None, :]
    block = (row[:, None] + (c // 4)[None, :] * 144).to(tl.pointer_type(tl.int32))
    w = tl.arange(0, 8)
    quants = tl.load(block[:, :, None] + 4 + 8 * (c % 4)[None, :, None] + w, mask=mask[:, :, None])
    header = tl.load(block, mask=mask, other=0)
    scales = tl.load(block + 1, mask=mask, other=0)
    mins = tl.load(block + 2, mask=mask, other=0)
    extra = tl.load(block + 3, mask=mask, other=0)
    return quants, header, scales, mins, extra


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
def _dot_q4_k(raw, x_ptr, norm_ptr, unit0, n_units, G: tl.constexpr, HAS_NORM: tl.constexpr):
    """Byte i of a chunk's word w holds its elements 4w+i (low nibble) and 32+4w+i (high)."""
    v, header, scales, mins, extra = raw
    c = unit0 + tl.arange(0, G)
    cmask = c < n_units
    index, xmask = _spread(64 * c[:, None] + 4 * tl.arange(0, 8)[None, :], cmask, v.shape)
    low_dot = tl.zeros(v.shape, dtype=tl.float32)
    high_dot = tl.zeros(v.shape, dtype=tl.float32)
    low_sum = tl.zeros(v.shape, dtype=tl.float32)
    high_sum = tl.zeros(v.shape, dtype=tl.float32)
    for i in tl.static_range(4):
        x_low = _x(x_ptr, norm_ptr, index + i, xmask, HAS_NORM)
        x_high = _x(x_ptr, norm_ptr, index + 32 + i, xmask, HAS_NORM)
        low_dot += ((v >> (8 * i)) & 15).to(tl.float32) * x_low
        high_dot += ((v >> (8 * i + 4)) & 15).to(tl.float32) * x_high
        low_sum += x_low
        high_sum += x_high
    sub = 2 * (c % 4)[None, :]
    low_scale, low_min = _k_scale_min(scales, mins, extra, sub)
    high_scale, high_min = _k_scale_min(scales, mins, extra, sub + 1)
    scaled = low_scale * tl.sum(low_dot, axis=2) + high_scale * tl.sum(high_dot, axis=2)
    mins = low_min * tl.sum(low_sum, axis=2) + high_min * tl.sum(high_sum, axis=2)
    d, dmin = _f32((header & 0xFFFF).to(tl.uint16)), _f32((header >> 16).to(tl.uint16))
    return d * scaled - dmin * mins


@triton.jit
def _load_q6_k(row, rmask, unit0, n_units, G: tl.constexpr):
    """Q6_K super-blocks (256 elements, 210 bytes): 128 bytes of low nibbles (ql), 64 of 2-bit
    high pairs (qh), 16 int8 scales (one per 16 elements), f16 d. Half h of the block uses
    ql[64h:][:64] and qh[32h:][:32]: for l < 32, ql[64h+l] holds elements 128h+l (low nibble) and
    128h+64+l (high), ql[64h+32+l] holds 128h+32+l and 128h+96+l, qh[32h+l] their high pairs.
    A unit is (super-block, h, l // 16): 8 16-bit words of each array, 64 elements under
    4 scales."""
    c = unit0 + tl.arange(0, G)
    mask = rmask[:, None] & (c < n_units)[None, :]
    block = row[:, None] + (c // 4)[None, :] * 210
    half, part16 = ((c % 4) // 2)[None, :], (c % 2)[None, :]
    w = tl.arange(0, 8)[None, None, :]
    ql = (block + 64 * half + 16 * part16).to(tl.pointer_type(tl.uint16))[:, :, None] + w
    qh = (block + 128 + 32 * half + 16 * part16).to(tl.pointer_type(tl.uint16))[:, :, None] + w
    first = tl.load(ql, mask=mask[:, :, None], other=0)
    second = tl.load(ql + 16, mask=mask[:, :, None], other=0)
    high = tl.load(qh, mask=mask[:, :, None], other=0)
    scales = (block + 192 + 8 * half + part16).to(tl.pointer_type(tl.int8))
    s0 = tl.load(scales, mask=mask, other=0)
    s1 = tl.load(scales + 2, mask=mask, other=0)
    s2 = tl.load(scales + 4, mask=mask, other=0)
    s3 = tl.load(scales + 6, mask=mask, other=0)
    d = tl.load((block + 208).to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
    return first, second, high, s0, s1, s2, s3, d


@triton.jit
def _dot_q6_k(raw, x_ptr, norm_ptr, unit0, n_units, G: tl.constexpr, HAS_NORM: tl.constexpr):
    ql_first, ql_second, high, s0, s1, s2, s3, d = raw
    ql_first, ql_second, high = ql_first.to(tl.int32), ql_second.to(tl.int32), high.to(tl.int32)
    c = unit0 + tl.arange(0, G)
    cmask = c < n_units
    first = 256 * (c // 4) + 128 * ((c % 4) // 2) + 16 * (c % 2)
    index, xmask = _spread(first[:, None] + 2 * tl.arange(0, 8)[None, :], cmask, high.shape)
    total = tl.zeros(s0.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        source = ql_first if k % 2 == 0 else ql_second
        scale = s0 if k == 0 else (s1 if k == 1 else (s2 if k == 2 else s3))
        dot = tl.zeros(high.shape, dtype=tl.float32)
        x_sum = tl.zeros(high.shape, dtype=tl.float32)
        for p in tl.static_range(2):
            q = ((source >> (8 * p + 4 * (k // 2))) & 15) | (((high >> (8 * p + 2 * k)) & 3) << 4)
            xs = _x(x_ptr, norm_ptr, index + 32 * k + p, xmask, HAS_NORM)
            dot += q.to(tl.float32) * xs
            x_sum += xs
        total += scale.to(tl.float32) * (tl.sum(dot, axis=2) - 32 * tl.sum(x_sum, axis=2))
    return _f32(d) * total


@triton.constexpr_function
def _units(qtype: int, k: int) -> int:
    """Units in a row for a word-level reader: blocks, or K-quant super-blocks' 64-element
    chunks."""
    return k // (64 if qtype in (12, 14) else 32)


@triton.constexpr_function
def _step(qtype: int, k: int) -> int:
    """Units per full tile, a power of two, at most UNIT_CAP (registers): the row's units
    rounded up if that pads them by at most 1/8, else rounded down (a tail tile takes the
    rest)."""
    units = _units(qtype, k)
    up = triton.next_power_of_2(units)
    return min(up if 8 * units >= 7 * up else up // 2, UNIT_CAP)


@triton.constexpr_function
def _end(qtype: int, k: int) -> int:
    """Where the full tiles end: the first tile is loaded even when it is masked."""
    step = _step(qtype, k)
    return max(step, _units(qtype, k) // step * step)


@triton.constexpr_function
def _tail(qtype: int, k: int) -> int:
    """Units in the last, partial tile (a power of two, masked), or 0."""
    rest = _units(qtype, k) - _end(qtype, k)
    return triton.next_power_of_2(rest) if rest > 0 else 0


@triton.constexpr_function
def _word_level(qtype: int) -> bool:
    return qtype in (2, 3, 6, 7, 8, 12, 14)


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
    QTYPE: tl.constexpr, UNITS: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    if QTYPE == 8:
        part = _dot_q8_0(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, HAS_NORM)
    elif QTYPE == 12:
        part = _dot_q4_k(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, HAS_NORM)
    elif QTYPE == 14:
        part = _dot_q6_k(raw, x_ptr, norm_ptr, unit0, n_units, UNITS, HAS_NORM)
    else:
        part = _dot_q32(raw, x_ptr, norm_ptr, unit0, n_units, QTYPE, UNITS, HAS_NORM)
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
    K: tl.constexpr, QTYPE: tl.constexpr, BN: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """W[rows] @ x, with x times the norm weight but not yet divided by its rms: (BN,) float32."""
    first, last = prefetched
    row, rmask = _row_starts(w_ptr, rows, N, K, QTYPE)
    if _word_level(QTYPE):
        UNITS: tl.constexpr = _units(QTYPE, K)
        STEP: tl.constexpr = _step(QTYPE, K)
        acc = tl.sum(_dot(first, x_ptr, norm_ptr, 0, UNITS, QTYPE, STEP, HAS_NORM), axis=1)
        for unit0 in tl.range(STEP, _end(QTYPE, K), STEP):
            raw = _load(row, rmask, unit0, UNITS, QTYPE, STEP)
            acc += tl.sum(_dot(raw, x_ptr, norm_ptr, unit0, UNITS, QTYPE, STEP, HAS_NORM), axis=1)
        if _tail(QTYPE, K) > 0:
            tail = _dot(
                last, x_ptr, norm_ptr, _end(QTYPE, K), UNITS, QTYPE, _tail(QTYPE, K), HAS_NORM
            )
            acc += tl.sum(tail, axis=1)
    else:
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, K, GENERIC_BLOCK_K):
            tile = dequant_tile(
                w_ptr, rows, rmask, k0, _row_bytes(QTYPE, K), K, QTYPE, BN, GENERIC_BLOCK_K
            )
            cols = k0 + tl.arange(0, GENERIC_BLOCK_K)
            acc += tl.sum(tile * _x(x_ptr, norm_ptr, cols, cols < K, HAS_NORM)[None, :], axis=1)
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
    K: tl.constexpr, QTYPE: tl.constexpr, BN: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    rows = block * BN + tl.arange(0, BN)
    mask = rows < N
    weights = _prefetch(w_ptr, rows, N, K, QTYPE)
    if PDL:
        tl.extra.cuda.gdc_wait()
    squares = _squares(x_ptr, K, HAS_NORM)
    y = _dot_rows(weights, w_ptr, rows, N, x_ptr, norm_ptr, K, QTYPE, BN, HAS_NORM)
    y *= _inverse_rms(squares, K, eps, HAS_NORM)
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
    MATRICES: tl.constexpr, SWIGLU: tl.constexpr, HAS_NORM: tl.constexpr,
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
        squares = _squares(x_ptr, K, HAS_NORM)
        gate = _dot_rows(gate_weights, a_ptr, rows, a_rows, x_ptr, norm_ptr, K, QA, BN, HAS_NORM)
        up = _dot_rows(up_weights, b_ptr, rows, b_rows, x_ptr, norm_ptr, K, QB, BN, HAS_NORM)
        scale = _inverse_rms(squares, K, eps, HAS_NORM)
        gate, up = gate * scale, up * scale
        tl.store(a_out + rows, gate * tl.sigmoid(gate) * up, mask=rows < a_rows)
    elif MATRICES == 1:
        _project(
            a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
            K, QA, BN, HAS_NORM, HAS_BIAS, HAS_RESIDUAL, PDL,
        )  # fmt: skip
    else:
        a_blocks = tl.cdiv(a_rows, BN)
        b_blocks = tl.cdiv(b_rows, BN)
        if pid < a_blocks:
            _project(
                a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
                K, QA, BN, HAS_NORM, HAS_BIAS, False, PDL,
            )  # fmt: skip
        elif pid < a_blocks + b_blocks:
            _project(
                b_ptr, b_bias, b_out, b_rows, pid - a_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QB, BN, HAS_NORM, HAS_BIAS, False, PDL,
            )  # fmt: skip
        else:
            _project(
                c_ptr, c_bias, c_out, c_rows, pid - a_blocks - b_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QC, BN, HAS_NORM, HAS_BIAS, False, PDL,
            )  # fmt: skip


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows per program
    num_warps: int


def gemv_config(qtype: GGMLQuantizationType, n: int, k: int, matrices: int = 1) -> GemvConfig:
    """A fixed choice per shape, never autotuned (see the module docstring), from
    bench/tile_sweep.py's timings on the real matrices (BENCHMARKS.md)."""
    if n >= 65536:  # an output head
        return GemvConfig(32, 4)
    if k >= 4096:  # long rows: an FFN's down projection
        return GemvConfig(4, 4)
    if n >= 4096:  # an FFN's gate and up
        return GemvConfig(8, 4)
    return GemvConfig(32 if matrices == 3 else 16, 8)  # q, k and v; other square projections


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
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    pdl = uses_pdl(x.device)
    _gemv_kernel[(programs,)](
        x, norm_weight, eps, residual if residual is not None else x, *per_matrix,
        K=x.numel(), QA=qtypes[0], QB=qtypes[1], QC=qtypes[2],
        MATRICES=len(matrices), SWIGLU=swiglu, HAS_NORM=norm is not None,
        HAS_BIAS=any(b is not None for b in biases), HAS_RESIDUAL=residual is not None,
        BN=config.block_n, PDL=pdl, num_warps=config.num_warps, launch_pdl=pdl,
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
