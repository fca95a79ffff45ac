"""`y = x @ W.T` where W stays in its GGUF blocks: weights are dequantized in registers, tile by
tile, inside the matmul, and never exist as a full-precision copy.

The kernel reads the file's own block layout (no repacking, so VRAM holds exactly the tensor's
bytes): for each weight element it computes which block, which byte and which bits hold it, as
ggml-quants.c lays them out. Few rows (decode) take a broadcast-and-reduce path; many rows
(prefill) use `tl.dot` on the dequantized tile in tf32. The torch reference is
`x @ dequantize(blocks).T`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
SUPPORTED = frozenset(
    {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4}
)
DOT_MIN_ROWS = 16  # tl.dot needs 16-row tiles; fewer rows are a GEMV


@triton.jit
def _u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _i8(ptr, mask):
    value = _u8(ptr, mask)
    return value - ((value >> 7) << 8)


@triton.jit
def _f16(ptr, mask):
    """The little-endian f16 at byte `ptr` (GGUF scales are not 2-byte aligned in general)."""
    bits = (_u8(ptr, mask) | (_u8(ptr + 1, mask) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble_32(qs, j, mask):
    """Element j of a 32-element block whose 16 bytes hold j in the low, j+16 in the high half."""
    byte = _u8(qs + (j % 16), mask)
    return tl.where(j < 16, byte & 15, byte >> 4)


@triton.jit
def _k_scale_min(scales, sub, mask):
    """Sub-block `sub` (0..7)'s 6-bit scale and min from Q4_K/Q5_K's 12 packed bytes."""
    low = sub < 4
    a = _u8(scales + tl.where(low, sub, sub + 4), mask)
    b = _u8(scales + tl.where(low, sub + 4, sub - 4), mask)
    c = _u8(scales + sub, mask)
    scale = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
    minimum = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _dequant(w_ptr, rows, cols, row_bytes, mask, QTYPE: tl.constexpr):
    """float32 values of W[rows, cols] (rows as a column, cols as a row of the tile)."""
    row = w_ptr + rows.to(tl.int64) * row_bytes
    if QTYPE == 0:  # F32
        return tl.load((row + cols * 4).to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
    elif QTYPE == 1:  # F16
        ptr = (row + cols * 2).to(tl.pointer_type(tl.float16))
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    elif QTYPE == 30:  # BF16
        ptr = (row + cols * 2).to(tl.pointer_type(tl.bfloat16))
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    elif QTYPE == 2:  # Q4_0: d, 16 bytes of nibbles
        block, j = row + (cols // 32) * 18, cols % 32
        return _f16(block, mask) * (_nibble_32(block + 2, j, mask) - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1: d, m, nibbles
        block, j = row + (cols // 32) * 20, cols % 32
        q = _nibble_32(block + 4, j, mask).to(tl.float32)
        return _f16(block, mask) * q + _f16(block + 2, mask)
    elif QTYPE == 6:  # Q5_0: d, 32 high bits, nibbles
        block, j = row + (cols // 32) * 22, cols % 32
        high = (_u8(block + 2 + j // 8, mask) >> (j % 8)) & 1
        q = _nibble_32(block + 6, j, mask) | (high << 4)
        return _f16(block, mask) * (q - 16).to(tl.float32)
    elif QTYPE == 7:  # Q5_1: d, m, 32 high bits, nibbles
        block, j = row + (cols // 32) * 24, cols % 32
        high = (_u8(block + 4 + j // 8, mask) >> (j % 8)) & 1
        q = (_nibble_32(block + 8, j, mask) | (high << 4)).to(tl.float32)
        return _f16(block, mask) * q + _f16(block + 2, mask)
    elif QTYPE == 8:  # Q8_0: d, 32 int8
        block, j = row + (cols // 32) * 34, cols % 32
        return _f16(block, mask) * _i8(block + 2 + j, mask).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, [qh], qs
        size: tl.constexpr = 144 if QTYPE == 12 else 176
        qs_at: tl.constexpr = 16 if QTYPE == 12 else 48
        block, j = row + (cols // 256) * size, cols % 256
        chunk, within = j // 64, j % 64
        sub = 2 * chunk + (within >= 32).to(tl.int32)
        byte = _u8(block + qs_at + chunk * 32 + within % 32, mask)
        q = tl.where(within < 32, byte & 15, byte >> 4)
        if QTYPE == 13:
            q = q | (((_u8(block + 16 + within % 32, mask) >> sub) & 1) << 4)
        scale, minimum = _k_scale_min(block + 4, sub, mask)
        d, dmin = _f16(block, mask), _f16(block + 2, mask)
        return d * scale * q.to(tl.float32) - dmin * minimum
    elif QTYPE == 14:  # Q6_K: ql (128), qh (64), int8 scales (16), d
        block, j = row + (cols // 256) * 210, cols % 256
        half, rest = j // 128, j % 128
        quarter, lane = rest // 32, rest % 32
        low = _u8(block + 64 * half + lane + 32 * (quarter % 2), mask)
        low = tl.where(quarter < 2, low & 15, low >> 4)
        high = (_u8(block + 128 + 32 * half + lane, mask) >> (2 * quarter)) & 3
        scale = _i8(block + 192 + 8 * half + lane // 16 + 2 * quarter, mask).to(tl.float32)
        return _f16(block + 208, mask) * scale * ((low | (high << 4)) - 32).to(tl.float32)
    else:  # MXFP4 (39): e8m0 exponent, 16 bytes of e2m1 nibbles
        block, j = row + (cols // 32) * 17, cols % 32
        e = _u8(block, mask)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        code = _nibble_32(block + 1, j, mask)
        magnitude = code & 7
        # e2m1 doubled, as ggml stores it: 0 1 2 3 4 6 8 12
        value = tl.where(magnitude < 4, magnitude, (2 + (magnitude & 1)) << ((magnitude >> 1) - 1))
        value = tl.where(code >= 8, -value, value)
        return scale * value.to(tl.float32)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, row_bytes, stride_xm, stride_ym,
    QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if BLOCK_M == 1:  # decode: products accumulate per element, one reduction at the end
        partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = _dequant(w_ptr, offs_n[:, None], offs_k[None, :], row_bytes, w_mask, QTYPE)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        if BLOCK_M == 1:
            partial += w * x
        elif USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision="tf32")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if BLOCK_M == 1:
        acc = tl.sum(partial, axis=1)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=y_mask)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def tile_config(m: int, n: int, k: int) -> TileConfig:
    """A fixed choice per shape, never autotuned: the tiling fixes the order of the sums, so the
    same request must always get the same one (results reproduce across restarts). The choices
    are bench/tile_sweep.py's fastest on an H100 for the Qwen2.5-0.5B matrices (BENCHMARKS.md)."""
    if m >= DOT_MIN_ROWS:
        return TileConfig(128, 64, 32, 8) if n >= 4096 else TileConfig(64, 64, 32, 4)
    if m == 1:
        if n > 65536:  # an output head: many rows, each short
            return TileConfig(1, 8, 256, 2)
        return TileConfig(1, 1, 512, 8 if k > 2048 else 4)
    return TileConfig(triton.next_power_of_2(m), 16, 128, 4)


def quant_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    config: TileConfig | None = None,
) -> torch.Tensor:
    """`x` (M, K) float32 times the (N, K) weight held as GGUF `blocks`: (M, N) float32."""
    if qtype not in SUPPORTED:
        raise ValueError(f"no quantized matmul for {qtype.name}")
    n, k = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    x = x.contiguous()
    m = x.shape[0]
    config = config or tile_config(m, n, k)
    y = torch.empty((m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _quant_matmul_kernel[grid](
        x, blocks, y, m, n, k, k // block_size * type_size, x.stride(0), y.stride(0),
        QTYPE=int(qtype), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, USE_DOT=config.block_m >= DOT_MIN_ROWS,
        num_warps=config.num_warps,
    )  # fmt: skip
    return y
