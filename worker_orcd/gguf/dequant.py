"""Torch dequantizers for GGUF tensor blocks, bit-exact with `gguf.quants.dequantize`.

The weights stay in their GGUF block encoding until they are needed, so dequantization has to
run where the weights live (CPU or CUDA): everything here is plain torch, vectorized over all
blocks. Each format follows the float32 operation order of gguf's numpy reference, e.g.
`(d * sc) * q - dmin * m` for Q4_K. Bit-exactness does not actually hinge on that order: an f16
scale has 11 significant bits, sub-block scales at most 7 and quants at most 5, so every product
is exact in float32 and the only rounding is the final `+ m` / `- dmin * m` (hence a fused
multiply-add gives the same bits too). The tests compare every format bitwise, on CPU and CUDA.

Block layouts follow ggml-quants.c; every format packs its quants so that the fields taken from
one bit position of `group` consecutive bytes are consecutive elements (see `_unpack`).
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType

# Twice the OCP MX e2m1 values, as ggml stores them; the block scale carries the missing 1/2.
_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian f16 field at byte `start` of each block, as an (n_blocks, 1) float32."""
    return blocks[:, start : start + 2].view(torch.float16).to(torch.float32)


def _unpack(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Split each byte of `packed` (n_blocks, k) into 8 // bits fields, low bits first.

    Fields come out ordered by (run of `group` bytes, bit position, byte within the run), the
    order in which all ggml formats store their quants: e.g. Q4_0 (bits=4, group=16) puts the
    low nibbles of its 16 bytes first, then the high nibbles; group=1 reads a little-endian
    bitmask (Q5_0's qh) bit by bit.
    """
    n, k = packed.shape
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = packed.reshape(n, k // group, 1, group) >> shifts.view(1, 1, -1, 1)
    return (fields & ((1 << bits) - 1)).reshape(n, k * (8 // bits))


def _plain(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """F32, F16, BF16: one value per block; always a fresh tensor, never a view of the bytes."""
    if qtype == T.BF16:
        # bf16 is the top half of an f32: shift the bits instead of trusting a float conversion,
        # so NaN payloads survive exactly as in the reference.
        bits = blocks.view(torch.int16).to(torch.int32) << 16
        return bits.view(torch.float32)
    dtype = torch.float32 if qtype == T.F32 else torch.float16
    return blocks.view(dtype).to(torch.float32, copy=True)


def _legacy(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Q4_0, Q4_1, Q5_0, Q5_1: `d, [m], [qh: 32 high bits], qs: 32 nibbles`.

    Symmetric types (no m) centre q on zero: `d * (q - 8 or 16)`; the others `d * q + m`.
    """
    has_min = qtype in (T.Q4_1, T.Q5_1)
    five_bit = qtype in (T.Q5_0, T.Q5_1)
    d = _f16(blocks, 0)
    pos = 4 if has_min else 2
    qs_start = pos + 4 if five_bit else pos
    q = _unpack(blocks[:, qs_start:], 4, 16)
    if five_bit:
        q = q | (_unpack(blocks[:, pos:qs_start], 1, 1) << 4)
    if has_min:
        return d * q.to(torch.float32) + _f16(blocks, 2)
    return d * (q.to(torch.int8) - (16 if five_bit else 8)).to(torch.float32)


def _q8_0(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Q8_0: `d, qs: 32 int8`."""
    return blocks[:, 2:].view(torch.int8).to(torch.float32) * _f16(blocks, 0)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks: 12 bytes -> 6-bit scales and mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high).
    """
    n = scales.shape[0]
    sc, mn, low = scales.reshape(n, 3, 4).unbind(1)
    scale = torch.cat([sc & 0x3F, (low & 0x0F) | ((sc >> 2) & 0x30)], dim=1)
    minimum = torch.cat([mn & 0x3F, (low >> 4) | ((mn >> 2) & 0x30)], dim=1)
    return scale, minimum


def _q45_k(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Q4_K, Q5_K: `d, dmin, scales: 12, [qh: 32], qs: 128`, 8 sub-blocks of 32.

    Element = (d * scale) * q - (dmin * min), as in the reference.
    """
    n = blocks.shape[0]
    five_bit = qtype == T.Q5_K
    scale, minimum = _scale_min_k4(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scale.to(torch.float32)).view(n, 8, 1)
    dm = (_f16(blocks, 2) * minimum.to(torch.float32)).view(n, 8, 1)
    q = _unpack(blocks[:, 48:] if five_bit else blocks[:, 16:], 4, 32)
    if five_bit:
        q = q | (_unpack(blocks[:, 16:48], 1, 32) << 4)
    return (d * q.view(n, 8, 32).to(torch.float32) - dm).view(n, 256)


def _q6_k(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Q6_K: `ql: 128 nibbles, qh: 64 (2 bits each), scales: 16 int8, d`, 16 sub-blocks of 16.

    Element = (d * scale) * (q - 32).
    """
    n = blocks.shape[0]
    q = _unpack(blocks[:, :128], 4, 64) | (_unpack(blocks[:, 128:192], 2, 32) << 4)
    q = (q.to(torch.int8) - 32).to(torch.float32).view(n, 16, 16)
    d = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)
    return (d.view(n, 16, 1) * q).view(n, 256)


def _mxfp4(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """MXFP4: `e: e8m0 exponent, qs: 32 e2m1 nibbles`; element = 2^(e-128) * (2 * e2m1).

    The scale is built from its bits like ggml_e8m0_to_fp32_half, including the two subnormal
    exponents 0 and 1, rather than computed with pow().
    """
    e = blocks[:, :1].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    values = torch.tensor(_MXFP4_VALUES, dtype=torch.float32, device=blocks.device)
    return bits.view(torch.float32) * values[_unpack(blocks[:, 1:], 4, 16).long()]


# (n_blocks, type_size) uint8 blocks, their type -> (n_blocks, block_size) float32 values
_Decoder = Callable[[torch.Tensor, GGMLQuantizationType], torch.Tensor]

_DEQUANTIZERS: dict[GGMLQuantizationType, _Decoder] = {
    T.F32: _plain,
    T.F16: _plain,
    T.BF16: _plain,
    T.Q4_0: _legacy,
    T.Q4_1: _legacy,
    T.Q5_0: _legacy,
    T.Q5_1: _legacy,
    T.Q8_0: _q8_0,
    T.Q4_K: _q45_k,
    T.Q5_K: _q45_k,
    T.Q6_K: _q6_k,
    T.MXFP4: _mxfp4,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DEQUANTIZERS)


def dequantize(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode a tensor's raw GGUF bytes into a new float32 tensor of `shape`.

    `blocks` is a uint8 tensor of exactly the tensor's bytes (any shape, on any device); `shape`
    is outermost dimension first (ggml's ne reversed), the last dimension being the row along
    which blocks run. The result is on the same device and never shares memory with `blocks`.
    Raises ValueError for an unsupported type or bytes that do not match the shape.
    """
    decode = _DEQUANTIZERS.get(qtype)
    name = getattr(qtype, "name", str(qtype))
    if decode is None:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"cannot dequantize GGUF type {name}: supported types are {supported}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(dim) for dim in shape)
    if not shape or min(shape) < 0 or shape[-1] % block_size:
        raise ValueError(
            f"{name} tensor shape {shape}: expected non-negative dimensions with the last one "
            f"a multiple of the block size {block_size}"
        )
    if blocks.dtype != torch.uint8:
        raise ValueError(f"{name} tensor: expected uint8 bytes, found dtype {blocks.dtype}")
    n_blocks = prod(shape) // block_size
    if blocks.numel() != n_blocks * type_size:
        raise ValueError(
            f"{name} tensor of shape {shape}: expected {n_blocks * type_size} bytes "
            f"({n_blocks} blocks of {type_size}), found {blocks.numel()}"
        )
    rows = blocks.reshape(n_blocks, type_size)
    if rows.storage_offset() % 4:
        rows = rows.clone()  # dtype views (f16 scales, f32 data) need an aligned start
    return decode(rows, qtype).reshape(shape)
