"""Reading GGUF blocks inside Triton kernels, in the file's own byte layout (ggml-quants.c).

`dequant_tile` gives a (rows, cols) float32 tile of any supported format: the prefill GEMM and
the dequantize kernel use it, and the decode GEMV uses it for the formats it has no word-level
path for. Scales and other per-group fields are loaded once per group and broadcast over it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGMLQuantizationType

T = GGMLQuantizationType
SUPPORTED = frozenset(
    {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4}
)


@triton.jit
def u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def i8(ptr, mask):
    value = u8(ptr, mask)
    return value - ((value >> 7) << 8)


@triton.jit
def f16(ptr, mask):
    """The little-endian f16 at byte `ptr` (GGUF scales are not 2-byte aligned in general)."""
    bits = (u8(ptr, mask) | (u8(ptr + 1, mask) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble_32(qs, j, mask):
    """Element j of a 32-element block whose 16 bytes hold j in the low, j+16 in the high half."""
    byte = u8(qs + (j % 16), mask)
    return tl.where(j < 16, byte & 15, byte >> 4)


@triton.jit
def k_scale_min(scales, sub, mask):
    """Sub-block `sub` (0..7)'s 6-bit scale and min from Q4_K/Q5_K's 12 packed bytes."""
    low = sub < 4
    a = u8(scales + tl.where(low, sub, sub + 4), mask)
    b = u8(scales + tl.where(low, sub + 4, sub - 4), mask)
    c = u8(scales + sub, mask)
    scale = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
    minimum = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _expand(values, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """Per-group values (BLOCK_N, GROUPS), repeated over each group's GROUP elements."""
    repeated = tl.broadcast_to(values[:, :, None], (BLOCK_N, GROUPS, GROUP))
    return tl.reshape(repeated, (BLOCK_N, GROUPS * GROUP))


@triton.jit
def dequant_tile(
    w_ptr, rows, row_mask, k0, row_bytes, K,
    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """float32 values of W[rows, k0:k0 + BLOCK_K] (zero where `row_mask` is false).

    Scales and other per-group fields are loaded once per group of 32 elements (16 for Q6_K)
    and broadcast over it; only the quants themselves are read per element.
    """
    row = w_ptr + rows[:, None].to(tl.int64) * row_bytes
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]
    mask = row_mask[:, None] & (cols < K)
    GROUP: tl.constexpr = 16 if QTYPE == 14 else 32
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    first = k0 + tl.arange(0, GROUPS)[None, :] * GROUP  # each group's first column
    group_mask = row_mask[:, None] & (first < K)
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
            bits = u8(group + qh_at, group_mask) | (u8(group + qh_at + 1, group_mask) << 8)
            bits = bits | (u8(group + qh_at + 2, group_mask) << 16)
            bits = bits | (u8(group + qh_at + 3, group_mask) << 24)
            q = q | (((_expand(bits, BLOCK_N, GROUPS, GROUP) >> j) & 1) << 4)
        d = _expand(f16(group, group_mask), BLOCK_N, GROUPS, GROUP)
        if has_min:
            return d * q.to(tl.float32) + _expand(
                f16(group + 2, group_mask), BLOCK_N, GROUPS, GROUP
            )
        offset: tl.constexpr = 16 if has_high else 8
        return d * (q - offset).to(tl.float32)
    elif QTYPE == 8:  # Q8_0: d, 32 int8
        d = _expand(f16(row + (first // 32) * 34, group_mask), BLOCK_N, GROUPS, GROUP)
        return d * i8(row + (cols // 32) * 34 + 2 + cols % 32, mask).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, [qh], qs
        size: tl.constexpr = 144 if QTYPE == 12 else 176
        qs_at: tl.constexpr = 16 if QTYPE == 12 else 48
        group = row + (first // 256) * size
        scale, minimum = k_scale_min(group + 4, (first % 256) // 32, group_mask)
        factor = _expand(f16(group, group_mask) * scale, BLOCK_N, GROUPS, GROUP)
        offset = _expand(f16(group + 2, group_mask) * minimum, BLOCK_N, GROUPS, GROUP)
        block, j = row + (cols // 256) * size, cols % 256
        chunk, within = j // 64, j % 64
        byte = u8(block + qs_at + chunk * 32 + within % 32, mask)
        q = tl.where(within < 32, byte & 15, byte >> 4)
        if QTYPE == 13:
            sub = 2 * chunk + (within >= 32).to(tl.int32)
            q = q | (((u8(block + 16 + within % 32, mask) >> sub) & 1) << 4)
        return factor * q.to(tl.float32) - offset
    elif QTYPE == 14:  # Q6_K: ql (128), qh (64), int8 scales (16), d; one scale per 16
        group, g = row + (first // 256) * 210, first % 256
        index = 8 * (g // 128) + ((g % 128) % 32) // 16 + 2 * ((g % 128) // 32)
        scale = i8(group + 192 + index, group_mask).to(tl.float32)
        factor = _expand(f16(group + 208, group_mask) * scale, BLOCK_N, GROUPS, GROUP)
        block, j = row + (cols // 256) * 210, cols % 256
        half, rest = j // 128, j % 128
        quarter, lane = rest // 32, rest % 32
        low = u8(block + 64 * half + lane + 32 * (quarter % 2), mask)
        low = tl.where(quarter < 2, low & 15, low >> 4)
        high = (u8(block + 128 + 32 * half + lane, mask) >> (2 * quarter)) & 3
        return factor * ((low | (high << 4)) - 32).to(tl.float32)
    else:  # MXFP4 (39): e8m0 exponent, 16 bytes of e2m1 nibbles
        e = u8(row + (first // 32) * 17, group_mask)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        code = _nibble_32(row + (cols // 32) * 17 + 1, cols % 32, mask)
        magnitude = code & 7
        # e2m1 doubled, as ggml stores it: 0 1 2 3 4 6 8 12
        value = tl.where(magnitude < 4, magnitude, (2 + (magnitude & 1)) << ((magnitude >> 1) - 1))
        value = tl.where(code >= 8, -value, value)
        return _expand(scale, BLOCK_N, GROUPS, GROUP) * value.to(tl.float32)
