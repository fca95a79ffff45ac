"""Matmuls of many rows over weights in their GGUF blocks, on 8-bit tensor cores (llama.cpp's
mmq): decode batches and prefill chunks alike.

x is rounded per 32-element block (`quantize_x`, after the RMSNorm when there is one) and each
weight block is unpacked in registers to int8 quants; `tl.dot` multiplies a tile of x's rows by
a tile of the matrix's rows one 32-element block at a time, in int32, exactly. Each block's
integer products become its float contribution through the GEMV's `combine_*` functions
(`integer_dot`), and contributions are summed in fixed point (`to_fixed`), exact in any order.
So a row's result is the same bits here as in the one-row GEMV and whatever rows share its tile:
a request's tokens do not depend on the batch it runs in (batch invariance), and the weights are
read once per tile of rows rather than once per row. The torch reference is the GEMV's:
`quantize_activation(norm(x)) @ dequantize(W).T`. Formats without an integer path (F16, BF16,
F32, Q5_K, MXFP4) go through `quant_matmul`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from worker_orcd.kernels.integer_dot import (
    INTEGER_DOT,
    Matrix,
    combine_q4_k,
    combine_q8_0,
    combine_q32,
    from_fixed,
    half_float,
    quantize_x,
    quarter_q6_k,
    row_bytes,
    to_fixed,
    units_per_group,
    units_per_row,
    uses_pdl,
)

T = GGMLQuantizationType


@triton.jit
def _x_tile(x_ptr, first, rmask, block):
    """Block `block` of the QuantizedX rows starting at word `first` (BM,): its int8 quants
    (BM, 32), scale and the sums of its halves' quants (BM, 1)."""
    at = first + block * 12
    quants = (x_ptr.to(tl.pointer_type(tl.int8)) + 4 * at)[:, None] + tl.arange(0, 32)[None, :]
    quants = tl.load(quants, mask=rmask[:, None], other=0)
    scale = tl.load(x_ptr + at + 8, mask=rmask, other=0).to(tl.float32, bitcast=True)
    sum_low = tl.load(x_ptr + at + 9, mask=rmask, other=0)
    sum_high = tl.load(x_ptr + at + 10, mask=rmask, other=0)
    return quants, scale[:, None], sum_low[:, None], sum_high[:, None]


@triton.jit
def _idot(x, w):
    """x (BM, 32) int8 times w (BN, 32) int8, transposed: (BM, BN) int32, exact."""
    return tl.dot(x, tl.trans(w), out_dtype=tl.int32)


@triton.jit
def _bytes(base, offsets, cmask):
    """The bytes at `offsets` (1, 32) of each row's block `base` (BN,): (BN, 32) int32."""
    return tl.load(base[:, None] + offsets, mask=cmask[:, None], other=0).to(tl.int32)


@triton.jit
def _half(base, offset, cmask):
    """16-bit words at byte `offset` of each row's block (BN,)."""
    return tl.load((base + offset).to(tl.pointer_type(tl.uint16)), mask=cmask, other=0)


@triton.jit
def _unit_q32(x_ptr, xrow, rmask, base, cmask, u, QTYPE: tl.constexpr):
    """Q4_0..Q5_1 block u: f16 scale (and min), 32 high bits (Q5), 16 bytes of nibbles."""
    HAS_MIN: tl.constexpr = QTYPE == 3 or QTYPE == 7
    HAS_HIGH: tl.constexpr = QTYPE == 6 or QTYPE == 7
    SIZE: tl.constexpr = 18 if QTYPE == 2 else (20 if QTYPE == 3 else (22 if QTYPE == 6 else 24))
    HIGH_AT: tl.constexpr = 4 if HAS_MIN else 2  # in bytes
    QS_AT: tl.constexpr = HIGH_AT + (4 if HAS_HIGH else 0)
    block = base + u * SIZE
    e = tl.arange(0, 32)[None, :]
    nibbles = _bytes(block, QS_AT + e % 16, cmask)
    quants = (nibbles >> (4 * (e // 16))) & 15
    scale = _half(block, 0, cmask)[None, :]
    minimum = scale
    if HAS_MIN:
        minimum = _half(block, 2, cmask)[None, :]
    if HAS_HIGH:
        high = _half(block, HIGH_AT, cmask).to(tl.int32)
        high |= _half(block, HIGH_AT + 2, cmask).to(tl.int32) << 16
        quants |= ((high[:, None] >> e) & 1) << 4
    x, x_scale, sum_low, sum_high = _x_tile(x_ptr, xrow, rmask, u)
    # One return: Triton compiles the statements after a return inside a constexpr `if` too,
    # and `combine_q32` of a format with a min cannot take the literal 0 below.
    if HAS_MIN:
        part = combine_q32(
            _idot(x, quants.to(tl.int8)), sum_low + sum_high, x_scale, scale, minimum, QTYPE
        )
    else:
        # Q4_0, Q5_0: the offset taken off each weight, once per tile, rather than x's sum
        # times the offset off each product: the same integer, so the same bits as the GEMV's
        OFFSET: tl.constexpr = 16 if HAS_HIGH else 8
        dot = _idot(x, (quants - OFFSET).to(tl.int8))
        part = combine_q32(dot, 0, x_scale, scale, minimum, QTYPE)
    return part


@triton.jit
def _unit_q8_0(x_ptr, xrow, rmask, base, cmask, u):
    block = base + u * 34
    quants = _bytes(block, 2 + tl.arange(0, 32)[None, :], cmask)
    x, x_scale, _, _ = _x_tile(x_ptr, xrow, rmask, u)
    dot = _idot(x, quants.to(tl.int8))  # the low byte: the signed quant
    return combine_q8_0(dot, x_scale, _half(block, 0, cmask)[None, :])


@triton.jit
def _unit_q4_k(x_ptr, xrow, rmask, base, cmask, u):
    """Q4_K chunk u (64 elements): byte l of its 32 holds element l (low nibble) and 32 + l."""
    block = base + (u // 4) * 144
    words = block.to(tl.pointer_type(tl.int32))
    header = tl.load(words, mask=cmask, other=0)[None, :]
    scales = tl.load(words + 1, mask=cmask, other=0)[None, :]
    mins = tl.load(words + 2, mask=cmask, other=0)[None, :]
    extra = tl.load(words + 3, mask=cmask, other=0)[None, :]
    packed = _bytes(block, 16 + 32 * (u % 4) + tl.arange(0, 32)[None, :], cmask)
    low_x, low_scale, low_sum0, low_sum1 = _x_tile(x_ptr, xrow, rmask, 2 * u)
    high_x, high_scale, high_sum0, high_sum1 = _x_tile(x_ptr, xrow, rmask, 2 * u + 1)
    low_dot = _idot(low_x, (packed & 15).to(tl.int8))
    high_dot = _idot(high_x, (packed >> 4).to(tl.int8))
    return combine_q4_k(
        low_dot, high_dot, low_sum0 + low_sum1, high_sum0 + high_sum1, low_scale, high_scale,
        header, scales, mins, extra, 2 * (u % 4),
    )  # fmt: skip


@triton.jit
def _unit_q6_k(x_ptr, xrow, rmask, base, cmask, u, BM: tl.constexpr, BN: tl.constexpr):
    """Q6_K half u (128 elements) of its super-block (see quant_gemv's `_load_q6_k`): quarter
    k takes nibble k // 2 of ql's bytes 32 (k % 2).., bits 2k of qh, scales 2k and 2k + 1."""
    block = base + (u // 2) * 210
    half = u % 2
    e = tl.arange(0, 32)[None, :]
    total = tl.zeros((BM, BN), tl.float32)
    for k in tl.static_range(4):
        ql = _bytes(block, 64 * half + 32 * (k % 2) + e, cmask)
        qh = _bytes(block, 128 + 32 * half + e, cmask)
        quants = (((ql >> (4 * (k // 2))) & 15) | (((qh >> (2 * k)) & 3) << 4)) - 32
        x, x_scale, _, _ = _x_tile(x_ptr, xrow, rmask, 4 * u + k)
        dot_first = _idot(tl.where(e < 16, x, 0).to(tl.int8), quants.to(tl.int8))
        dot_second = _idot(tl.where(e >= 16, x, 0).to(tl.int8), quants.to(tl.int8))
        pair = _half(block, 192 + 8 * half + 2 * k, cmask)[None, :]
        total += quarter_q6_k(dot_first, dot_second, 0, 0, x_scale, pair)  # offset taken off
    return half_float(_half(block, 208, cmask)[None, :]) * total


@triton.jit
def _unit(
    x_ptr, xrow, rmask, base, cmask, u, QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """Unit u's contribution, (BM, BN) float32: a block, or a Q4_K chunk, or a Q6_K half, as
    the GEMV counts them (`units_per_row`)."""
    if QTYPE == 8:
        part = _unit_q8_0(x_ptr, xrow, rmask, base, cmask, u)
    elif QTYPE == 12:
        part = _unit_q4_k(x_ptr, xrow, rmask, base, cmask, u)
    elif QTYPE == 14:
        part = _unit_q6_k(x_ptr, xrow, rmask, base, cmask, u, BM, BN)
    else:
        part = _unit_q32(x_ptr, xrow, rmask, base, cmask, u, QTYPE)
    return part


@triton.jit
def _matmul(
    x_ptr, xrow, rmask, w_ptr, cols, N, split, splits,
    K: tl.constexpr, QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Split `split`'s share of x[rows] @ W[cols].T in fixed point, (BM, BN) int64: each
    group's units added in order in float32, as the GEMV's `_grouped` adds them."""
    base = w_ptr + cols.to(tl.int64) * row_bytes(QTYPE, K)
    cmask = cols < N
    units = units_per_row(QTYPE, K)
    G: tl.constexpr = units_per_group(QTYPE)
    groups = tl.cdiv(units, G)
    acc = tl.zeros((BM, BN), tl.int64)
    for g in tl.range(split * groups // splits, (split + 1) * groups // splits):
        part = _unit(x_ptr, xrow, rmask, base, cmask, g * G, QTYPE, BM, BN)
        for j in tl.static_range(1, G):
            u = g * G + j  # past the row's end only in its last group: zeros, exactly
            part += _unit(x_ptr, xrow, rmask & (u < units), base, cmask & (u < units), u,
                          QTYPE, BM, BN)  # fmt: skip
        acc += to_fixed(part)
    return acc


@triton.jit
def _mmq_kernel(
    x_ptr, M, residual_ptr, sums_ptr, arrived_ptr, splits,
    a_ptr, a_bias, a_out, a_n, b_ptr, b_bias, b_out, b_n, c_ptr, c_bias, c_out, c_n,
    K: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QC: tl.constexpr,
    MATRICES: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Programs along axis 0 cover A's column tiles, then B's, then C's (q, k and v in one
    launch); with SWIGLU each covers A's and B's (gate and up) for one output."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    if SWIGLU or MATRICES == 1:
        _tile(
            x_ptr, M, a_ptr, b_ptr, a_n, a_bias, residual_ptr, a_out, sums_ptr, arrived_ptr,
            pid, splits, K, QA, QB, SWIGLU, HAS_BIAS, HAS_RESIDUAL, BM, BN, SPLIT,
        )  # fmt: skip
    else:
        a_tiles = tl.cdiv(a_n, BN)
        b_tiles = tl.cdiv(b_n, BN)
        if pid < a_tiles:
            _tile(
                x_ptr, M, a_ptr, a_ptr, a_n, a_bias, residual_ptr, a_out, sums_ptr,
                arrived_ptr, pid, splits, K, QA, QA, False, HAS_BIAS, False, BM, BN, SPLIT,
            )  # fmt: skip
        elif pid < a_tiles + b_tiles:
            _tile(
                x_ptr, M, b_ptr, b_ptr, b_n, b_bias, residual_ptr, b_out, sums_ptr + M * a_n,
                arrived_ptr, pid - a_tiles, splits, K, QB, QB, False, HAS_BIAS, False, BM, BN,
                SPLIT,
            )  # fmt: skip
        else:
            _tile(
                x_ptr, M, c_ptr, c_ptr, c_n, c_bias, residual_ptr, c_out,
                sums_ptr + M * (a_n + b_n), arrived_ptr, pid - a_tiles - b_tiles, splits, K,
                QC, QC, False, HAS_BIAS, False, BM, BN, SPLIT,
            )  # fmt: skip


@triton.jit
def _tile(
    x_ptr, M, a_ptr, b_ptr, N, bias_ptr, residual_ptr, out_ptr, sums_ptr, arrived_ptr, tile_n,
    splits, K: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, SWIGLU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One (BM, BN) tile, column tile `tile_n` of one output, of `x @ A.T` (+ bias, +
    residual), or of silu(x @ A.T) * (x @ B.T) with SWIGLU, over split `program_id(2)` of
    `splits` along K. With SPLIT, splits add their fixed-point sums into `sums` atomically
    (integers: the order of arrival cannot change a bit); the last to arrive reads them, leaves
    zeros behind for the next launch, and writes the tile. The epilogue's operations are the
    GEMV's, in its order."""
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    rmask = rows < M
    xrow = rows.to(tl.int64) * (K // 32 * 12)
    a = _matmul(x_ptr, xrow, rmask, a_ptr, cols, N, split, splits, K, QA, BM, BN)
    b = a
    if SWIGLU:
        b = _matmul(x_ptr, xrow, rmask, b_ptr, cols, N, split, splits, K, QB, BM, BN)
    at = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = rmask[:, None] & (cols < N)[None, :]
    if not SPLIT:
        _epilogue(a, b, cols, N, at, mask, bias_ptr, residual_ptr, out_ptr,
                  SWIGLU, HAS_BIAS, HAS_RESIDUAL)  # fmt: skip
    else:
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.atomic_add(sums_ptr + at, a, mask=mask, sem="relaxed")
        if SWIGLU:
            tl.atomic_add(sums_ptr + M * N + at, b, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's sums issued before the tile counts this split
        if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == splits - 1:
            a = tl.atomic_xchg(sums_ptr + at, tl.zeros_like(a), mask=mask)
            if SWIGLU:
                b = tl.atomic_xchg(sums_ptr + M * N + at, tl.zeros_like(b), mask=mask)
            tl.atomic_xchg(arrived_ptr + tile, 0)
            _epilogue(a, b, cols, N, at, mask, bias_ptr, residual_ptr, out_ptr,
                      SWIGLU, HAS_BIAS, HAS_RESIDUAL)  # fmt: skip


@triton.jit
def _epilogue(
    a, b, cols, N, at, mask, bias_ptr, residual_ptr, out_ptr,
    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    y = from_fixed(a)
    if SWIGLU:
        up = from_fixed(b)
        y = y * tl.sigmoid(y) * up
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + at, mask=mask, other=0.0)
    tl.store(out_ptr + at, y, mask=mask)


SPLIT_SUMS = 1 << 21  # int64s in a device's split-K buffer (16 MiB): 2 * M * N at most
SPLIT_TILES = 1 << 14


@functools.cache
def _split_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros that split launches add into and leave as zeros: one pair per device, allocated
    before any CUDA graph captures a launch that uses them and never freed."""
    return (
        torch.zeros(SPLIT_SUMS, dtype=torch.int64, device=device),
        torch.zeros(SPLIT_TILES, dtype=torch.int32, device=device),
    )


@dataclass(frozen=True)
class MmqConfig:
    block_m: int
    block_n: int
    split: int  # programs along K; their sums are exact, so any split gives the same bits
    num_warps: int = 4
    num_stages: int = 3


def mmq_config(
    m: int, sizes: list[int], units: int, outputs: int, device: torch.device
) -> MmqConfig:
    """Tiles by shape (`sizes`: the columns of each matrix the launch covers); K split across
    programs, up to about two per SM, where the tiles alone leave most SMs idle and the buffer
    allows. Results do not depend on either (see `to_fixed`), only the speed does.
    `bench/tile_sweep.py --skip-gemv` at 128 rows on an H100 (2026-12-07): q/k/v's 72 tiles
    took 28.9 us split in 3 and 20.5 whole, the down projection's 56 tiles 55.0 split in 4
    and 125 whole; SwiGLU's two matrices 66.8 us at 8 warps and 83.5 at 4 (721 and 731 at
    2,048 rows), where every other launch was as fast or faster at 4."""
    block_m = min(max(16, triton.next_power_of_2(m)), 64)
    block_n = 32  # bench/tile_sweep.py: ahead of 64 and 128 at 8 to 2048 rows (H200)
    tiles = triton.cdiv(m, block_m) * sum(triton.cdiv(n, block_n) for n in sizes)
    split = 1
    if device.type == "cuda" and outputs * m * sum(sizes) <= SPLIT_SUMS and tiles <= SPLIT_TILES:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if 2 * tiles < sms:
            split = max(1, min(2 * sms // tiles, units // 4))
    warps = 8 if outputs == 2 and block_m == 64 else 4
    return MmqConfig(block_m, block_n, split, warps)


def mmq(
    x: torch.Tensor,
    matrices: list[Matrix],
    biases: list[torch.Tensor | None],
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    swiglu: bool = False,
    config: MmqConfig | None = None,
) -> list[torch.Tensor]:
    """`rmsnorm(x) @ W.T + bias (+ residual)` for each of up to three matrices of one input
    x (M, K) float32, rounded once, in one launch; with `swiglu`, `silu(x' @ G.T) * (x' @ U.T)`
    for matrices (G, U). Every matrix is in an `INTEGER_DOT` format; a residual goes with one
    matrix only, biases with all or none. Returns one (M, N) float32 per output."""
    for matrix in matrices:
        if matrix.qtype not in INTEGER_DOT:
            raise ValueError(f"no integer matmul for {matrix.qtype.name}")
    if len(matrices) > 3 or (residual is not None and len(matrices) > 1 + swiglu):
        raise ValueError("expected at most three matrices, and a residual with one only")
    if not swiglu and len({bias is None for bias in biases[: len(matrices)]}) > 1:
        raise ValueError("expected biases all given or all None")
    m, k = x.shape
    quantized = quantize_x(x.contiguous(), norm)
    produced = matrices[:1] if swiglu else matrices
    sizes = [matrix.shape[0] for matrix in produced]
    units = min(units_per_row(int(matrix.qtype), k) for matrix in matrices)
    c = config or mmq_config(m, sizes, units, 1 + swiglu, x.device)
    sums, arrived = _split_buffers(x.device) if c.split > 1 else (quantized, quantized)
    outputs = [torch.empty(m, n, device=x.device, dtype=torch.float32) for n in sizes]
    per_matrix = []  # the kernel takes three matrices; unused slots repeat the last
    for i in range(3):
        matrix = matrices[min(i, len(matrices) - 1)]
        bias = biases[i] if i < len(biases) and biases[i] is not None else None
        out = outputs[min(i, len(outputs) - 1)]
        per_matrix += [matrix.blocks, out if bias is None else bias, out, matrix.shape[0]]
    qtypes = [int(matrices[min(i, len(matrices) - 1)].qtype) for i in range(3)]
    pdl = uses_pdl(x.device)
    grid = (sum(triton.cdiv(n, c.block_n) for n in sizes), triton.cdiv(m, c.block_m), c.split)
    _mmq_kernel[grid](
        quantized, m, residual if residual is not None else outputs[0], sums, arrived, c.split,
        *per_matrix, K=k, QA=qtypes[0], QB=qtypes[1], QC=qtypes[2], MATRICES=len(matrices),
        SWIGLU=swiglu, HAS_BIAS=any(b is not None for b in biases),
        HAS_RESIDUAL=residual is not None, BM=c.block_m, BN=c.block_n, SPLIT=c.split > 1,
        PDL=pdl, num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl,
        enable_fp_fusion=False,
    )  # fmt: skip
    return outputs
