"""Decode's matrix-vector products over weights kept in their GGUF blocks, with the layer's
neighbours fused in.

At batch 1 a matmul is one pass over the weight bytes, and a token's launches cost more than its
arithmetic. So a program reads whole 16- or 32-bit words of packed quants (never one byte per
element) and unpacks them with shifts in registers into words of four 8-bit quants. x is rounded
to 8 bits per 32-element block (`quantize_activation`, llama.cpp's Q8_1), so one `dp4a`
multiplies four weights by four elements of x and sums them in integers; per-block scales
multiply the integer sums (llama.cpp's mmvq computes the same way). x is rounded either by each
program, once per tile, or once by a launch of its own (`quantize_x`) whose output every program
gathers: where the programs are many or x is long, and wherever an RMSNorm comes first (its rms
is a sum whose order follows the launch, and `quant_mmq` must see the same bits). Formats
without a word-level reader (F32, F16, BF16, Q5_K, MXFP4) take the generic tile dequantizer and
float x. Up to `MAX_ROWS` tokens share a launch: each program loads its weights once and
computes its outputs for every row in turn, with the one-row arithmetic.

Batch invariance: a unit's float contribution and the sums of units come from
`integer_dot`, which `quant_mmq` shares, so a row's result is the same bits here as in `mmq`'s
tiles of many rows.

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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from worker_orcd.kernels.blocks import SUPPORTED, dequant_tile
from worker_orcd.kernels.integer_dot import (
    INTEGER_DOT,
    INTERPRET,
    X_FLOAT,
    X_NORMED,
    X_QUANTIZED,
    Matrix,
    combine_q4_k,
    combine_q8_0,
    combine_q32,
    from_fixed,
    half_float,
    inverse_rms,
    lane_squares,
    load_x,
    quantize_x,
    quarter_q6_k,
    row_bytes,
    to_fixed,
    units_per_group,
    units_per_row,
    uses_pdl,
    x_block,
)

T = GGMLQuantizationType
UNIT_CAP = 64  # units (blocks or K-quant chunks) per tile: bounds a program's registers
GENERIC_BLOCK_K = tl.constexpr(256)  # elements per step for formats read by `dequant_tile`
MAX_ROWS = 8  # rows of x per launch: each program computes every row, one after another


@triton.jit
def _dp4a(a, b, acc):
    """acc + the dot product of a's and b's four signed bytes: one instruction on the GPU,
    emulated in Triton's interpreter, which runs no inline assembly."""
    if INTERPRET:
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
def _dot_words(weights, x_words):
    """Sum over the last axis of dp4a(weights, x): (rows, units, words), x broadcast."""
    x_words = tl.broadcast_to(x_words, weights.shape)
    return tl.sum(_dp4a(weights, x_words, tl.zeros(weights.shape, dtype=tl.int32)), axis=2)


@triton.jit
def _word(low, high):
    """int32 words from their 16-bit halves (blocks of these formats are 2-byte aligned)."""
    return low.to(tl.int32) | (high.to(tl.int32) << 16)


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
    x_low, x_high, x_scale, x_sum, x_sum_high = x_block(
        x_ptr, norm_ptr, 32 * b, b < n_units, scale.shape[0], X
    )
    v = _word(quants[0], quants[1])
    q_low, q_high = v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F
    if HAS_HIGH:
        bits = _word(low, high)[:, :, None] >> (4 * tl.arange(0, 4)[None, None, :])
        q_low |= _spread_bits(bits) << 4
        q_high |= _spread_bits(bits >> 16) << 4
    dot = _dot_words(q_low, x_low) + _dot_words(q_high, x_high)
    return combine_q32(dot, x_sum + x_sum_high, x_scale, scale, minimum, QTYPE)


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
    x_first, x_second, x_scale, _, _ = x_block(
        x_ptr, norm_ptr, 32 * b, b < n_units, scale.shape[0], X
    )
    dot = _dot_words(_word(first[0], first[1]), x_first)
    dot += _dot_words(_word(second[0], second[1]), x_second)
    return combine_q8_0(dot, x_scale, scale)


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
def _dot_q4_k(raw, x_ptr, norm_ptr, unit0, n_units, G: tl.constexpr, X: tl.constexpr):
    """Byte i of a chunk's word w holds its elements 4w+i (low nibble) and 32+4w+i (high)."""
    first, second, header, scales, mins, extra = raw
    c = unit0 + tl.arange(0, G)
    cmask = c < n_units
    low_x = x_block(x_ptr, norm_ptr, 64 * c, cmask, header.shape[0], X)
    high_x = x_block(x_ptr, norm_ptr, 64 * c + 32, cmask, header.shape[0], X)
    low_dot = _dot_words(first & 0x0F0F0F0F, low_x[0])
    low_dot += _dot_words(second & 0x0F0F0F0F, low_x[1])
    high_dot = _dot_words((first >> 4) & 0x0F0F0F0F, high_x[0])
    high_dot += _dot_words((second >> 4) & 0x0F0F0F0F, high_x[1])
    return combine_q4_k(
        low_dot, high_dot, low_x[3] + low_x[4], high_x[3] + high_x[4], low_x[2], high_x[2],
        header, scales, mins, extra, 2 * (c % 4)[None, :],
    )  # fmt: skip


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
        x = x_block(x_ptr, norm_ptr, 128 * c + 32 * k, cmask, d.shape[0], X)
        shift = 4 * (k // 2)
        ql = ql_low if k % 2 == 0 else ql_high
        q_first = ((ql[0] >> shift) & 0x0F0F0F0F) | (((qh[0] >> (2 * k)) & 0x03030303) << 4)
        q_second = ((ql[1] >> shift) & 0x0F0F0F0F) | (((qh[1] >> (2 * k)) & 0x03030303) << 4)
        total += quarter_q6_k(
            _dot_words(q_first, x[0]), _dot_words(q_second, x[1]), x[3], x[4], x[2], scales[k]
        )
    return half_float(d) * total


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


@triton.constexpr_function
def _step(qtype: int, k: int) -> int:
    """Units per full tile, a power of two, at most UNIT_CAP (registers): the row's units
    rounded up if that pads them by at most 1/8, else rounded down (a tail tile takes the
    rest); whole groups."""
    units = units_per_row(qtype, k)
    up = triton.next_power_of_2(units)
    return max(min(up if 8 * units >= 7 * up else up // 2, UNIT_CAP), units_per_group(qtype))


@triton.constexpr_function
def _end(qtype: int, k: int) -> int:
    """Where the full tiles end: the first tile is loaded even when it is masked."""
    step = _step(qtype, k)
    return max(step, units_per_row(qtype, k) // step * step)


@triton.constexpr_function
def _tail(qtype: int, k: int) -> int:
    """Units in the last, partial tile (a power of two, masked), or 0."""
    rest = units_per_row(qtype, k) - _end(qtype, k)
    return max(triton.next_power_of_2(rest), units_per_group(qtype)) if rest > 0 else 0


@triton.constexpr_function
def _word_level(qtype: int) -> bool:
    return qtype in INTEGER_DOT


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
    return w_ptr + rows.to(tl.int64) * row_bytes(QTYPE, K), rows < N


@triton.jit
def _prefetch(w_ptr, rows, N, K: tl.constexpr, QTYPE: tl.constexpr):
    """The raw words of W[rows]'s first and last tiles: whole rows up to 2 * UNIT_CAP units.
    Weights do not depend on the previous kernel, so they load before waiting for it."""
    row, rmask = _row_starts(w_ptr, rows, N, K, QTYPE)
    if _word_level(QTYPE):
        UNITS: tl.constexpr = units_per_row(QTYPE, K)
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
    `x_block`): (BN,) float32."""
    first, last = prefetched
    row, rmask = _row_starts(w_ptr, rows, N, K, QTYPE)
    if _word_level(QTYPE):
        UNITS: tl.constexpr = units_per_row(QTYPE, K)
        STEP: tl.constexpr = _step(QTYPE, K)
        G: tl.constexpr = units_per_group(QTYPE)
        part = _dot(first, x_ptr, norm_ptr, 0, UNITS, QTYPE, STEP, X)
        acc = tl.sum(to_fixed(_grouped(part, G)), axis=1)
        for unit0 in tl.range(STEP, _end(QTYPE, K), STEP):
            raw = _load(row, rmask, unit0, UNITS, QTYPE, STEP)
            part = _dot(raw, x_ptr, norm_ptr, unit0, UNITS, QTYPE, STEP, X)
            acc += tl.sum(to_fixed(_grouped(part, G)), axis=1)
        if _tail(QTYPE, K) > 0:
            tail = _dot(last, x_ptr, norm_ptr, _end(QTYPE, K), UNITS, QTYPE, _tail(QTYPE, K), X)
            acc += tl.sum(to_fixed(_grouped(tail, G)), axis=1)
        acc = from_fixed(acc)
    else:
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, K, GENERIC_BLOCK_K):
            tile = dequant_tile(
                w_ptr, rows, rmask, k0, row_bytes(QTYPE, K), K, QTYPE, BN, GENERIC_BLOCK_K
            )
            cols = k0 + tl.arange(0, GENERIC_BLOCK_K)
            acc += tl.sum(
                tile * load_x(x_ptr, norm_ptr, cols, cols < K, X == X_NORMED)[None, :], axis=1
            )
    return acc


@triton.constexpr_function
def _x_stride(k: int, x: int) -> int:
    """Elements (int32 words for a `QuantizedX`) from one row of x to the next."""
    return k // 32 * 12 if x == X_QUANTIZED else k


@triton.jit
def _project(
    w_ptr, bias_ptr, out_ptr, N, block, x_ptr, norm_ptr, eps, residual_ptr,
    K: tl.constexpr, QTYPE: tl.constexpr, BN: tl.constexpr, X: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, M: tl.constexpr,
):  # fmt: skip
    """W[rows] @ x for each of x's M rows in turn, with one load of the weights: a row's
    arithmetic is the same as when it comes alone."""
    rows = block * BN + tl.arange(0, BN)
    mask = rows < N
    weights = _prefetch(w_ptr, rows, N, K, QTYPE)
    if PDL:
        tl.extra.cuda.gdc_wait()
    for m in tl.static_range(M):
        x_row = x_ptr + m * _x_stride(K, X)
        squares = lane_squares(x_row, K, X == X_NORMED)
        y = _dot_rows(weights, w_ptr, rows, N, x_row, norm_ptr, K, QTYPE, BN, X)
        y *= inverse_rms(squares, K, eps, X == X_NORMED)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + m * N + rows, mask=mask, other=0.0)
        tl.store(out_ptr + m * N + rows, y, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, norm_ptr, eps, residual_ptr,
    a_ptr, a_bias, a_out, a_rows,
    b_ptr, b_bias, b_out, b_rows,
    c_ptr, c_bias, c_out, c_rows,
    K: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QC: tl.constexpr,
    MATRICES: tl.constexpr, SWIGLU: tl.constexpr, X: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr,
    M: tl.constexpr,
):  # fmt: skip
    """Programs 0.. cover A's rows, then B's, then C's; with SWIGLU each covers A's and B's;
    each program computes its rows for every one of x's M rows.
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
        for m in tl.static_range(M):
            x_row = x_ptr + m * _x_stride(K, X)
            squares = lane_squares(x_row, K, X == X_NORMED)
            gate = _dot_rows(gate_weights, a_ptr, rows, a_rows, x_row, norm_ptr, K, QA, BN, X)
            up = _dot_rows(up_weights, b_ptr, rows, b_rows, x_row, norm_ptr, K, QB, BN, X)
            scale = inverse_rms(squares, K, eps, X == X_NORMED)
            gate, up = gate * scale, up * scale
            out = gate * tl.sigmoid(gate) * up
            tl.store(a_out + m * a_rows + rows, out, mask=rows < a_rows)
    elif MATRICES == 1:
        _project(
            a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
            K, QA, BN, X, HAS_BIAS, HAS_RESIDUAL, PDL, M,
        )  # fmt: skip
    else:
        a_blocks = tl.cdiv(a_rows, BN)
        b_blocks = tl.cdiv(b_rows, BN)
        if pid < a_blocks:
            _project(
                a_ptr, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
                K, QA, BN, X, HAS_BIAS, False, PDL, M,
            )  # fmt: skip
        elif pid < a_blocks + b_blocks:
            _project(
                b_ptr, b_bias, b_out, b_rows, pid - a_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QB, BN, X, HAS_BIAS, False, PDL, M,
            )  # fmt: skip
        else:
            _project(
                c_ptr, c_bias, c_out, c_rows, pid - a_blocks - b_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QC, BN, X, HAS_BIAS, False, PDL, M,
            )  # fmt: skip


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
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"the GEMV takes at most {MAX_ROWS} rows, got {m}")
    x = x.contiguous()
    produced = matrices[:1] if swiglu else matrices  # SwiGLU writes one output for two
    outputs = [torch.empty(m, w.shape[0], device=x.device, dtype=torch.float32) for w in produced]
    config = config or gemv_config(matrices[0].qtype, matrices[0].shape[0], k, len(matrices))
    programs = sum(triton.cdiv(w.shape[0], config.block_n) for w in produced)
    per_matrix = []  # the kernel takes three matrices; unused slots repeat the first
    for i in range(3):
        matrix = matrices[i] if i < len(matrices) else matrices[0]
        bias = biases[i] if i < len(biases) and biases[i] is not None else outputs[0]
        out = outputs[i] if i < len(outputs) else outputs[0]
        per_matrix += [matrix.blocks, bias, out, matrix.shape[0]]
    qtypes = [int(matrices[min(i, len(matrices) - 1)].qtype) for i in range(3)]
    mode = X_NORMED if norm is not None else X_FLOAT
    # A norm's rms is a sum over the row whose order follows the launch shape: the rows it
    # normalizes are rounded in `quantize_x`, which `mmq` shares, so both see the same bits.
    integer = all(w.qtype in INTEGER_DOT for w in matrices)
    if integer and (config.quantize_first or norm is not None):
        x, norm, mode = quantize_x(x, norm), None, X_QUANTIZED
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    pdl = uses_pdl(x.device)
    _gemv_kernel[(programs,)](
        x, norm_weight, eps, residual if residual is not None else outputs[0], *per_matrix,
        K=k, QA=qtypes[0], QB=qtypes[1], QC=qtypes[2],
        MATRICES=len(matrices), SWIGLU=swiglu, X=mode,
        HAS_BIAS=any(b is not None for b in biases), HAS_RESIDUAL=residual is not None,
        BN=config.block_n, PDL=pdl, M=m, num_warps=config.num_warps, launch_pdl=pdl,
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
    """Up to MAX_ROWS tokens: `rmsnorm(x) @ W.T + bias + residual` (each part when given). x
    (M, K) float32, `norm` an RMSNorm's (weight, eps); returns (M, N) float32."""
    return _launch(x, [matrix], [bias], residual, norm, swiglu=False, config=config)[0]


def gemv_swiglu(
    x: torch.Tensor,
    gate: Matrix,
    up: Matrix,
    norm: tuple[torch.Tensor, float] | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Up to MAX_ROWS tokens: `silu(x' @ G.T) * (x' @ U.T)` with x' = rmsnorm(x) when `norm`
    is given."""
    return _launch(x, [gate, up], [None, None], None, norm, swiglu=True, config=config)[0]


def gemv_qkv(
    x: torch.Tensor,
    matrices: list[Matrix],
    biases: list[torch.Tensor | None],
    norm: tuple[torch.Tensor, float] | None = None,
    config: GemvConfig | None = None,
) -> list[torch.Tensor]:
    """Up to MAX_ROWS tokens, three matrices of one input (q, k and v) in one launch: each
    `rmsnorm(x) @ W.T + bias`. Biases are all given or all None."""
    if len(matrices) != 3 or len({b is None for b in biases}) > 1:
        raise ValueError("expected three matrices with biases all given or all None")
    return _launch(x, matrices, biases, None, norm, swiglu=False, config=config)
