"""One token's attention over the KV cache, for decode, with its rotary embedding and its cache
write in the same launch.

The position is read from device memory, not passed from the host, so the kernel replays inside
a CUDA graph as the sequence grows, and it visits only the filled positions. One program serves
one query head (a program per KV head, with its whole group of query heads, spilled registers
and left most of the GPU idle); the heads of a group read the same cached keys, from L2. Each
program rotates its q and the new k, the group's first program stores the new k and v, and each
starts its online softmax (float32) from the new token held in registers, so no program reads
back what was just written. The torch reference is the layers' own path: rotary
embedding, cache write, then `F.scaled_dot_product_attention` over the filled positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(first, second, cos, sin):
    return first * cos - second * sin, second * cos + first * sin


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, keys_ptr, values_ptr, out_ptr, position_ptr, cos_ptr, sin_ptr, scale,
    stride_kpos, stride_khead,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    kv_head = head // GROUP
    position = tl.load(position_ptr)
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.arange(0, HALF)
    if INTERLEAVED:  # rotated pairs (2i, 2i+1)
        first, second = 2 * i, 2 * i + 1
    else:  # pairs (i, i + half)
        first, second = i, i + HALF
    cos = tl.load(cos_ptr + position * HALF + i)
    sin = tl.load(sin_ptr + position * HALF + i)
    q1, q2 = _rotate(
        tl.load(q_ptr + head * HEAD_DIM + first),
        tl.load(q_ptr + head * HEAD_DIM + second),
        cos,
        sin,
    )
    k1, k2 = _rotate(
        tl.load(k_ptr + kv_head * HEAD_DIM + first),
        tl.load(k_ptr + kv_head * HEAD_DIM + second),
        cos,
        sin,
    )
    dims = tl.arange(0, HEAD_DIM)
    v = tl.load(v_ptr + kv_head * HEAD_DIM + dims)
    if head % GROUP == 0:  # one program per KV head writes the cache
        slot = position * stride_kpos + kv_head * stride_khead
        tl.store(keys_ptr + slot + first, k1)
        tl.store(keys_ptr + slot + second, k2)
        tl.store(values_ptr + slot + dims, v)
    best = (tl.sum(q1 * k1, axis=0) + tl.sum(q2 * k2, axis=0)) * scale
    total = 1.0
    acc = v
    for start in range(0, position, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        valid = positions < position
        base = positions[:, None] * stride_kpos + kv_head * stride_khead
        keys1 = tl.load(keys_ptr + base + first[None, :], mask=valid[:, None], other=0.0)
        keys2 = tl.load(keys_ptr + base + second[None, :], mask=valid[:, None], other=0.0)
        values = tl.load(values_ptr + base + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.sum(q1[None, :] * keys1, axis=1) + tl.sum(q2[None, :] * keys2, axis=1)
        scores = tl.where(valid, scores * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        correction = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        total = total * correction + tl.sum(weights, axis=0)
        acc = acc * correction + tl.sum(weights[:, None] * values, axis=0)
        best = new_best
    tl.store(out_ptr + head * HEAD_DIM + dims, acc / total)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    scale: float,
) -> torch.Tensor:
    """q (heads * dim,), k and v (kv_heads * dim,) of one token, float32 and not yet rotated;
    keys, values (positions, kv_heads, dim) the layer's cache, filled below `position` (a
    one-element int tensor on the device); `cos`, `sin` (positions, dim // 2) rotary tables.
    Writes the token's rotated k and its v at `position`; returns its attention, (heads * dim,)."""
    kv_heads, head_dim = keys.shape[1], keys.shape[2]
    heads = q.numel() // head_dim
    group = heads // kv_heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(heads,)](
        q, k, v, keys, values, out, position, cos, sin, scale, keys.stride(0), keys.stride(1),
        GROUP=group, HEAD_DIM=head_dim, INTERLEAVED=interleaved, BLOCK=128, num_warps=4,
    )  # fmt: skip
    return out
