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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from worker_orcd.kernels.blocks import SUPPORTED, dequant_tile, k_scale_min

T = GGMLQuantizationType


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
def _half(ptr, mask):
    """The f16 at a 16-bit-word pointer."""
    return tl.load(ptr, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dot_q32(
    row, rmask, x_ptr, norm_ptr, block0, n_blocks,
    QTYPE: tl.constexpr, NB: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """Q4_0, Q4_1, Q5_0, Q5_1: f16 scale (and min), 32 high bits (Q5), then 16 bytes whose low
    nibbles are elements 0-15 and high nibbles 16-31. As 8 16-bit words, word w holds elements
    2w and 2w+1 (low nibbles of its two bytes) and 2w+16 and 2w+17 (high nibbles)."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    HAS_HIGH: tl.constexpr = QTYPE == 6 or QTYPE == 7
    SIZE: tl.constexpr = 18 if QTYPE == 2 else (20 if QTYPE == 3 else (22 if QTYPE == 6 else 24))
    HIGH_AT: tl.constexpr = 2 if HAS_MIN else 1  # in 16-bit words
    QS_AT: tl.constexpr = HIGH_AT + (2 if HAS_HIGH else 0)
    b = block0 + tl.arange(0, NB)
    bmask = b < n_blocks
    mask = rmask[:, None] & bmask[None, :]
    words = (row[:, None] + b[None, :] * SIZE).to(tl.pointer_type(tl.uint16))
    w = tl.arange(0, 8)
    v = tl.load(words[:, :, None] + QS_AT + w[None, None, :], mask=mask[:, :, None], other=0)
    v = v.to(tl.int32)
    index = 32 * b[:, None] + 2 * w[None, :]
    x0 = _x(x_ptr, norm_ptr, index, bmask[:, None], HAS_NORM)[None, :, :]
    x1 = _x(x_ptr, norm_ptr, index + 1, bmask[:, None], HAS_NORM)[None, :, :]
    x16 = _x(x_ptr, norm_ptr, index + 16, bmask[:, None], HAS_NORM)[None, :, :]
    x17 = _x(x_ptr, norm_ptr, index + 17, bmask[:, None], HAS_NORM)[None, :, :]
    q0, q1, q16, q17 = v & 15, (v >> 8) & 15, (v >> 4) & 15, (v >> 12) & 15
    if HAS_HIGH:
        low = tl.load(words + HIGH_AT, mask=mask, other=0).to(tl.int32)
        high = tl.load(words + HIGH_AT + 1, mask=mask, other=0).to(tl.int32)
        low = low[:, :, None] >> (2 * w[None, None, :])
        high = high[:, :, None] >> (2 * w[None, None, :])
        q0 |= (low & 1) << 4
        q1 |= (low & 2) << 3
        q16 |= (high & 1) << 4
        q17 |= (high & 2) << 3
    products = q0.to(tl.float32) * x0 + q1.to(tl.float32) * x1
    products += q16.to(tl.float32) * x16 + q17.to(tl.float32) * x17
    dot = tl.sum(products, axis=2)
    x_sum = tl.sum(x0 + x1 + x16 + x17, axis=2)
    d = _half(words, mask)
    if HAS_MIN:
        part = d * dot + _half(words + 1, mask) * x_sum
    else:
        OFFSET: tl.constexpr = 16 if HAS_HIGH else 8
        part = d * (dot - OFFSET * x_sum)
    return tl.sum(part, axis=1)


@triton.jit
def _dot_q8_0(
    row, rmask, x_ptr, norm_ptr, block0, n_blocks, NB: tl.constexpr, HAS_NORM: tl.constexpr
):
    """Q8_0: f16 scale, 32 int8s; as 16 16-bit words of two elements each."""
    b = block0 + tl.arange(0, NB)
    bmask = b < n_blocks
    mask = rmask[:, None] & bmask[None, :]
    words = (row[:, None] + b[None, :] * 34).to(tl.pointer_type(tl.int16))
    w = tl.arange(0, 16)
    v = tl.load(words[:, :, None] + 1 + w[None, None, :], mask=mask[:, :, None], other=0)
    v = v.to(tl.int32)  # sign-extended: the high byte is v >> 8
    low = ((v & 255) ^ 128) - 128
    index = 32 * b[:, None] + 2 * w[None, :]
    even = _x(x_ptr, norm_ptr, index, bmask[:, None], HAS_NORM)[None, :, :]
    odd = _x(x_ptr, norm_ptr, index + 1, bmask[:, None], HAS_NORM)[None, :, :]
    dot = tl.sum(low.to(tl.float32) * even + (v >> 8).to(tl.float32) * odd, axis=2)
    return tl.sum(_half(words, mask) * dot, axis=1)


@triton.jit
def _dot_q4_k(
    row, rmask, x_ptr, norm_ptr, chunk0, n_chunks, G: tl.constexpr, HAS_NORM: tl.constexpr
):
    """Q4_K super-blocks (256 elements, 144 bytes): f16 d and dmin, 12 bytes of 6-bit scales and
    mins for 8 sub-blocks, then 4 chunks of 32 bytes, chunk c's low nibbles being sub-block 2c
    and its high nibbles 2c+1. As 8 32-bit words per chunk, byte i of word w holds the chunk's
    elements 4w+i (low nibble) and 32+4w+i (high)."""
    c = chunk0 + tl.arange(0, G)
    cmask = c < n_chunks
    mask = rmask[:, None] & cmask[None, :]
    block = row[:, None] + (c // 4)[None, :] * 144
    w = tl.arange(0, 8)
    words = (block + 16 + 32 * (c % 4)[None, :]).to(tl.pointer_type(tl.int32))
    v = tl.load(words[:, :, None] + w[None, None, :], mask=mask[:, :, None], other=0)
    index = 64 * c[:, None] + 4 * w[None, :]
    low_dot = tl.zeros(v.shape, dtype=tl.float32)
    high_dot = tl.zeros(v.shape, dtype=tl.float32)
    low_sum = tl.zeros(index.shape, dtype=tl.float32)
    high_sum = tl.zeros(index.shape, dtype=tl.float32)
    for i in tl.static_range(4):
        x_low = _x(x_ptr, norm_ptr, index + i, cmask[:, None], HAS_NORM)
        x_high = _x(x_ptr, norm_ptr, index + 32 + i, cmask[:, None], HAS_NORM)
        low_dot += ((v >> (8 * i)) & 15).to(tl.float32) * x_low[None, :, :]
        high_dot += ((v >> (8 * i + 4)) & 15).to(tl.float32) * x_high[None, :, :]
        low_sum += x_low
        high_sum += x_high
    sub = 2 * (c % 4)[None, :]
    low_scale, low_min = k_scale_min(block + 4, sub, mask)
    high_scale, high_min = k_scale_min(block + 4, sub + 1, mask)
    halves = block.to(tl.pointer_type(tl.uint16))
    scaled = low_scale * tl.sum(low_dot, axis=2) + high_scale * tl.sum(high_dot, axis=2)
    mins = low_min * tl.sum(low_sum, axis=1)[None, :] + high_min * tl.sum(high_sum, axis=1)[None, :]
    part = _half(halves, mask) * scaled - _half(halves + 1, mask) * mins
    return tl.sum(part, axis=1)


@triton.jit
def _dot_q6_k(
    row, rmask, x_ptr, norm_ptr, chunk0, n_chunks, G: tl.constexpr, HAS_NORM: tl.constexpr
):
    """Q6_K super-blocks (256 elements, 210 bytes): 128 bytes of low nibbles (ql), 64 of 2-bit
    high pairs (qh), 16 int8 scales (one per 16 elements), f16 d. Half h of the block uses
    ql[64h:][:64] and qh[32h:][:32]: for l < 32, ql[64h+l] holds elements 128h+l (low nibble) and
    128h+64+l (high), ql[64h+32+l] holds 128h+32+l and 128h+96+l, qh[32h+l] their high pairs.
    A chunk here is (super-block, h, l // 16): 8 16-bit words of each array, 64 elements under
    4 scales."""
    c = chunk0 + tl.arange(0, G)
    cmask = c < n_chunks
    mask = rmask[:, None] & cmask[None, :]
    block = row[:, None] + (c // 4)[None, :] * 210
    half, part16 = ((c % 4) // 2)[None, :], (c % 2)[None, :]
    w = tl.arange(0, 8)[None, None, :]
    ql = (block + 64 * half + 16 * part16).to(tl.pointer_type(tl.uint16))[:, :, None] + w
    qh = (block + 128 + 32 * half + 16 * part16).to(tl.pointer_type(tl.uint16))[:, :, None] + w
    ql_first = tl.load(ql, mask=mask[:, :, None], other=0).to(tl.int32)
    ql_second = tl.load(ql + 16, mask=mask[:, :, None], other=0).to(tl.int32)
    high = tl.load(qh, mask=mask[:, :, None], other=0).to(tl.int32)
    first = 256 * (c // 4) + 128 * ((c % 4) // 2) + 16 * (c % 2)
    index = first[:, None] + 2 * tl.arange(0, 8)[None, :]
    total = tl.zeros(mask.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        source = ql_first if k % 2 == 0 else ql_second
        dot = tl.zeros(high.shape, dtype=tl.float32)
        x_sum = tl.zeros(index.shape, dtype=tl.float32)
        for p in tl.static_range(2):
            q = ((source >> (8 * p + 4 * (k // 2))) & 15) | (((high >> (8 * p + 2 * k)) & 3) << 4)
            xs = _x(x_ptr, norm_ptr, index + 32 * k + p, cmask[:, None], HAS_NORM)
            dot += q.to(tl.float32) * xs[None, :, :]
            x_sum += xs
        scales = (block + 192 + 8 * half + part16 + 2 * k).to(tl.pointer_type(tl.int8))
        scale = tl.load(scales, mask=mask, other=0).to(tl.float32)
        total += scale * (tl.sum(dot, axis=2) - 32 * tl.sum(x_sum, axis=1)[None, :])
    d = _half((block + 208).to(tl.pointer_type(tl.uint16)), mask)
    return tl.sum(d * total, axis=1)


@triton.jit
def _dot_rows(
    w_ptr, row_bytes, rows, N, x_ptr, norm_ptr, K,
    QTYPE: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """W[rows] @ x, with x times the norm weight but not yet divided by its rms: (BN,) float32;
    and, with a norm, the sum of x's squares (loaded in the same loop, so it adds no latency)."""
    rmask = rows < N
    row = w_ptr + rows.to(tl.int64) * row_bytes
    acc = tl.zeros((BN,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if HAS_NORM:
            cols = k0 + tl.arange(0, BLOCK_K)
            value = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            squares += value * value
        if QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:
            acc += _dot_q32(
                row, rmask, x_ptr, norm_ptr, k0 // 32, K // 32, QTYPE, BLOCK_K // 32, HAS_NORM
            )
        elif QTYPE == 8:
            acc += _dot_q8_0(
                row, rmask, x_ptr, norm_ptr, k0 // 32, K // 32, BLOCK_K // 32, HAS_NORM
            )
        elif QTYPE == 12:
            acc += _dot_q4_k(
                row, rmask, x_ptr, norm_ptr, k0 // 64, K // 64, BLOCK_K // 64, HAS_NORM
            )
        elif QTYPE == 14:
            acc += _dot_q6_k(
                row, rmask, x_ptr, norm_ptr, k0 // 64, K // 64, BLOCK_K // 64, HAS_NORM
            )
        else:
            tile = dequant_tile(w_ptr, rows, rmask, k0, row_bytes, K, QTYPE, BN, BLOCK_K)
            cols = k0 + tl.arange(0, BLOCK_K)
            acc += tl.sum(tile * _x(x_ptr, norm_ptr, cols, cols < K, HAS_NORM)[None, :], axis=1)
    return acc, tl.sum(squares, axis=0)


@triton.jit
def _inverse_rms(squares, K, eps, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        return tl.rsqrt(squares / K + eps)
    return 1.0


@triton.jit
def _project(
    w_ptr, row_bytes, bias_ptr, out_ptr, N, block, x_ptr, norm_ptr, eps, residual_ptr, K,
    QTYPE: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    rows = block * BN + tl.arange(0, BN)
    mask = rows < N
    y, squares = _dot_rows(
        w_ptr, row_bytes, rows, N, x_ptr, norm_ptr, K, QTYPE, BN, BLOCK_K, HAS_NORM
    )
    y *= _inverse_rms(squares, K, eps, HAS_NORM)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=mask, other=0.0)
    tl.store(out_ptr + rows, y, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, norm_ptr, eps, K, residual_ptr,
    a_ptr, a_bytes, a_bias, a_out, a_rows,
    b_ptr, b_bytes, b_bias, b_out, b_rows,
    c_ptr, c_bytes, c_bias, c_out, c_rows,
    QA: tl.constexpr, QB: tl.constexpr, QC: tl.constexpr, MATRICES: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Programs 0.. cover A's rows, then B's, then C's; with SWIGLU each covers A's and B's."""
    pid = tl.program_id(0)
    if SWIGLU:
        rows = pid * BN + tl.arange(0, BN)
        gate, squares = _dot_rows(
            a_ptr, a_bytes, rows, a_rows, x_ptr, norm_ptr, K, QA, BN, BLOCK_K, HAS_NORM
        )
        up, _ = _dot_rows(
            b_ptr, b_bytes, rows, b_rows, x_ptr, norm_ptr, K, QB, BN, BLOCK_K, HAS_NORM
        )
        scale = _inverse_rms(squares, K, eps, HAS_NORM)
        gate, up = gate * scale, up * scale
        tl.store(a_out + rows, gate * tl.sigmoid(gate) * up, mask=rows < a_rows)
    elif MATRICES == 1:
        _project(
            a_ptr, a_bytes, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr, K,
            QA, BN, BLOCK_K, HAS_NORM, HAS_BIAS, HAS_RESIDUAL,
        )  # fmt: skip
    else:
        a_blocks = tl.cdiv(a_rows, BN)
        b_blocks = tl.cdiv(b_rows, BN)
        if pid < a_blocks:
            _project(
                a_ptr, a_bytes, a_bias, a_out, a_rows, pid, x_ptr, norm_ptr, eps, residual_ptr,
                K, QA, BN, BLOCK_K, HAS_NORM, HAS_BIAS, False,
            )  # fmt: skip
        elif pid < a_blocks + b_blocks:
            _project(
                b_ptr, b_bytes, b_bias, b_out, b_rows, pid - a_blocks, x_ptr, norm_ptr, eps,
                residual_ptr, K, QB, BN, BLOCK_K, HAS_NORM, HAS_BIAS, False,
            )  # fmt: skip
        else:
            _project(
                c_ptr, c_bytes, c_bias, c_out, c_rows, pid - a_blocks - b_blocks, x_ptr,
                norm_ptr, eps, residual_ptr, K, QC, BN, BLOCK_K, HAS_NORM, HAS_BIAS, False,
            )  # fmt: skip


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows per program
    block_k: int  # elements of a row per loop step
    num_warps: int


def gemv_config(qtype: GGMLQuantizationType, n: int, k: int) -> GemvConfig:
    """A fixed choice per shape, never autotuned (see the module docstring); bench/tile_sweep.py
    times the alternatives on the real matrices."""
    if n >= 65536:  # an output head
        return GemvConfig(16, 256, 2)
    if qtype == T.Q4_K:
        return GemvConfig(8, 1024, 4)
    if qtype == T.Q6_K:
        return GemvConfig(2, 1024, 4)
    return GemvConfig(8 if n * k >= (1 << 22) else 2, 256, 4)


def _row_bytes(matrix: Matrix) -> int:
    block_size, type_size = GGML_QUANT_SIZES[matrix.qtype]
    return matrix.shape[1] // block_size * type_size


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
    config = config or gemv_config(matrices[0].qtype, matrices[0].shape[0], x.numel())
    programs = sum(triton.cdiv(m.shape[0], config.block_n) for m in produced)
    per_matrix = []  # the kernel takes three matrices; unused slots repeat the first
    for i in range(3):
        matrix = matrices[i] if i < len(matrices) else matrices[0]
        bias = biases[i] if i < len(biases) and biases[i] is not None else outputs[0]
        out = outputs[i] if i < len(outputs) else outputs[0]
        per_matrix += [matrix.blocks, _row_bytes(matrix), bias, out, matrix.shape[0]]
    qtypes = [int(matrices[min(i, len(matrices) - 1)].qtype) for i in range(3)]
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    _gemv_kernel[(programs,)](
        x, norm_weight, eps, x.numel(), residual if residual is not None else x, *per_matrix,
        QA=qtypes[0], QB=qtypes[1], QC=qtypes[2],
        MATRICES=len(matrices), SWIGLU=swiglu, HAS_NORM=norm is not None,
        HAS_BIAS=any(b is not None for b in biases), HAS_RESIDUAL=residual is not None,
        BN=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
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
    x: torch.Tensor, gate: Matrix, up: Matrix, norm: tuple[torch.Tensor, float] | None = None
) -> torch.Tensor:
    """One token: `silu(x' @ G.T) * (x' @ U.T)` with x' = rmsnorm(x) when `norm` is given."""
    return _launch(x, [gate, up], [None, None], None, norm, swiglu=True)[0]


def gemv_qkv(
    x: torch.Tensor,
    matrices: list[Matrix],
    biases: list[torch.Tensor | None],
    norm: tuple[torch.Tensor, float] | None = None,
) -> list[torch.Tensor]:
    """One token, three matrices of one input (q, k and v) in one launch: each
    `rmsnorm(x) @ W.T + bias`. Biases are all given or all None."""
    if len(matrices) != 3 or len({b is None for b in biases}) > 1:
        raise ValueError("expected three matrices with biases all given or all None")
    return _launch(x, matrices, biases, None, norm, swiglu=False)
