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
def _expand(values, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """Per-group values (BLOCK_N, GROUPS), repeated over each group's GROUP elements."""
    repeated = tl.broadcast_to(values[:, :, None], (BLOCK_N, GROUPS, GROUP))
    return tl.reshape(repeated, (BLOCK_N, GROUPS * GROUP))


@triton.jit
def _dequant(
    w_ptr, offs_n, k0, row_bytes, N, K,
    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """float32 values of W[offs_n, k0:k0 + BLOCK_K].

    Scales and other per-group fields are loaded once per group of 32 elements (16 for Q6_K)
    and broadcast over it; only the quants themselves are read per element.
    """
    row = w_ptr + offs_n[:, None].to(tl.int64) * row_bytes
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]
    mask = (offs_n[:, None] < N) & (cols < K)
    GROUP: tl.constexpr = 16 if QTYPE == 14 else 32
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    first = k0 + tl.arange(0, GROUPS)[None, :] * GROUP  # each group's first column
    group_mask = (offs_n[:, None] < N) & (first < K)
    if QTYPE == 0:  # F32
        return tl.load((row + cols * 4).to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
    elif QTYPE == 1:  # F16
        ptr = (row + cols * 2).to(tl.pointer_type(tl.float16))
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    elif QTYPE == 30:  # BF16
        ptr = (row + cols * 2).to(tl.pointer_type(tl.bfloat16))
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
        size: tl.constexpr = (
            18 if QTYPE == 2 else (20 if QTYPE == 3 else (22 if QTYPE == 6 else 24))
        )
        has_min: tl.constexpr = QTYPE == 3 or QTYPE == 7
        has_high: tl.constexpr = QTYPE == 6 or QTYPE == 7
        qh_at: tl.constexpr = 4 if has_min else 2
        qs_at: tl.constexpr = qh_at + (4 if has_high else 0)
        group = row + (first // 32) * size
        block, j = row + (cols // 32) * size, cols % 32
        q = _nibble_32(block + qs_at, j, mask)
        if has_high:
            bits = _u8(group + qh_at, group_mask) | (_u8(group + qh_at + 1, group_mask) << 8)
            bits = bits | (_u8(group + qh_at + 2, group_mask) << 16)
            bits = bits | (_u8(group + qh_at + 3, group_mask) << 24)
            q = q | (((_expand(bits, BLOCK_N, GROUPS, GROUP) >> j) & 1) << 4)
        d = _expand(_f16(group, group_mask), BLOCK_N, GROUPS, GROUP)
        if has_min:
            return d * q.to(tl.float32) + _expand(
                _f16(group + 2, group_mask), BLOCK_N, GROUPS, GROUP
            )
        offset: tl.constexpr = 16 if has_high else 8
        return d * (q - offset).to(tl.float32)
    elif QTYPE == 8:  # Q8_0: d, 32 int8
        d = _expand(_f16(row + (first // 32) * 34, group_mask), BLOCK_N, GROUPS, GROUP)
        return d * _i8(row + (cols // 32) * 34 + 2 + cols % 32, mask).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, [qh], qs
        size: tl.constexpr = 144 if QTYPE == 12 else 176
        qs_at: tl.constexpr = 16 if QTYPE == 12 else 48
        group = row + (first // 256) * size
        scale, minimum = _k_scale_min(group + 4, (first % 256) // 32, group_mask)
        factor = _expand(_f16(group, group_mask) * scale, BLOCK_N, GROUPS, GROUP)
        offset = _expand(_f16(group + 2, group_mask) * minimum, BLOCK_N, GROUPS, GROUP)
        block, j = row + (cols // 256) * size, cols % 256
        chunk, within = j // 64, j % 64
        byte = _u8(block + qs_at + chunk * 32 + within % 32, mask)
        q = tl.where(within < 32, byte & 15, byte >> 4)
        if QTYPE == 13:
            sub = 2 * chunk + (within >= 32).to(tl.int32)
            q = q | (((_u8(block + 16 + within % 32, mask) >> sub) & 1) << 4)
        return factor * q.to(tl.float32) - offset
    elif QTYPE == 14:  # Q6_K: ql (128), qh (64), int8 scales (16), d; one scale per 16
        group, g = row + (first // 256) * 210, first % 256
        index = 8 * (g // 128) + ((g % 128) % 32) // 16 + 2 * ((g % 128) // 32)
        scale = _i8(group + 192 + index, group_mask).to(tl.float32)
        factor = _expand(_f16(group + 208, group_mask) * scale, BLOCK_N, GROUPS, GROUP)
        block, j = row + (cols // 256) * 210, cols % 256
        half, rest = j // 128, j % 128
        quarter, lane = rest // 32, rest % 32
        low = _u8(block + 64 * half + lane + 32 * (quarter % 2), mask)
        low = tl.where(quarter < 2, low & 15, low >> 4)
        high = (_u8(block + 128 + 32 * half + lane, mask) >> (2 * quarter)) & 3
        return factor * ((low | (high << 4)) - 32).to(tl.float32)
    else:  # MXFP4 (39): e8m0 exponent, 16 bytes of e2m1 nibbles
        e = _u8(row + (first // 32) * 17, group_mask)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        code = _nibble_32(row + (cols // 32) * 17 + 1, cols % 32, mask)
        magnitude = code & 7
        # e2m1 doubled, as ggml stores it: 0 1 2 3 4 6 8 12
        value = tl.where(magnitude < 4, magnitude, (2 + (magnitude & 1)) << ((magnitude >> 1) - 1))
        value = tl.where(code >= 8, -value, value)
        return _expand(scale, BLOCK_N, GROUPS, GROUP) * value.to(tl.float32)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, residual_ptr, M, N, K, row_bytes, stride_xm, stride_ym,
    QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if BLOCK_M == 1:  # decode: products accumulate per element, one reduction at the end
        partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant(w_ptr, offs_n, k0, row_bytes, N, K, QTYPE, BLOCK_N, BLOCK_K)
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
    y_offsets = offs_m[:, None] * stride_ym + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + y_offsets, mask=y_mask, other=0.0)
    tl.store(y_ptr + y_offsets, acc, mask=y_mask)


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
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """`x` (M, K) float32 times the (N, K) weight held as GGUF `blocks`, plus `bias` (N,) and
    `residual` (M, N) when given, added in the same kernel: (M, N) float32."""
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
        x, blocks, y, y if bias is None else bias,
        y if residual is None else residual.contiguous(),
        m, n, k, k // block_size * type_size, x.stride(0), y.stride(0),
        QTYPE=int(qtype), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, USE_DOT=config.block_m >= DOT_MIN_ROWS,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        num_warps=config.num_warps,
    )  # fmt: skip
    return y
