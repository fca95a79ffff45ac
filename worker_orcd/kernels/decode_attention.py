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

from worker_orcd.kernels.quant_gemv import uses_pdl


@triton.jit
def _rotate(first, second, cos, sin):
    return first * cos - second * sin, second * cos + first * sin


@triton.jit
def _load_cached(keys_ptr, values_ptr, start, position, kv_head, stride_kpos, stride_khead,
                 first, second, dims, BLOCK: tl.constexpr):  # fmt: skip
    """Cached keys (as their rotary halves) and values at positions start.. below `position`."""
    positions = start + tl.arange(0, BLOCK)
    valid = positions < position
    base = positions[:, None] * stride_kpos + kv_head * stride_khead
    keys1 = tl.load(keys_ptr + base + first[None, :], mask=valid[:, None], other=0.0)
    keys2 = tl.load(keys_ptr + base + second[None, :], mask=valid[:, None], other=0.0)
    values = tl.load(values_ptr + base + dims[None, :], mask=valid[:, None], other=0.0)
    return keys1, keys2, values, valid


@triton.jit
def _attend(state, cached, q1, q2, scale):
    """One online-softmax step over a block of cached positions."""
    best, total, acc = state
    keys1, keys2, values, valid = cached
    scores = tl.sum(q1[None, :] * keys1, axis=1) + tl.sum(q2[None, :] * keys2, axis=1)
    scores = tl.where(valid, scores * scale, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, axis=0))
    correction = tl.exp(best - new_best)
    weights = tl.exp(scores - new_best)
    total = total * correction + tl.sum(weights, axis=0)
    acc = acc * correction + tl.sum(weights[:, None] * values, axis=0)
    return new_best, total, acc


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, keys_ptr, values_ptr, out_ptr, position_ptr, cos_ptr, sin_ptr, scale,
    stride_kpos, stride_khead,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Under programmatic dependent launch (PDL) the position, the rotary tables and the first
    block of the cache (all written before the previous kernel began) load before waiting for
    the previous kernel, which wrote q, k and v."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    head = tl.program_id(0)
    kv_head = head // GROUP
    position = tl.load(position_ptr)
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.arange(0, HALF)
    if INTERLEAVED:  # rotated pairs (2i, 2i+1)
        first, second = 2 * i, 2 * i + 1
    else:  # pairs (i, i + half)
        first, second = i, i + HALF
    dims = tl.arange(0, HEAD_DIM)
    cos = tl.load(cos_ptr + position * HALF + i)
    sin = tl.load(sin_ptr + position * HALF + i)
    cached = _load_cached(
        keys_ptr, values_ptr, 0, position, kv_head, stride_kpos, stride_khead,
        first, second, dims, BLOCK,
    )  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
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
    v = tl.load(v_ptr + kv_head * HEAD_DIM + dims)
    if head % GROUP == 0:  # one program per KV head writes the cache
        slot = position * stride_kpos + kv_head * stride_khead
        tl.store(keys_ptr + slot + first, k1)
        tl.store(keys_ptr + slot + second, k2)
        tl.store(values_ptr + slot + dims, v)
    # the online softmax starts from the new token, held in registers
    state = ((tl.sum(q1 * k1, axis=0) + tl.sum(q2 * k2, axis=0)) * scale, 1.0, v)
    state = _attend(state, cached, q1, q2, scale)
    for start in range(BLOCK, position, BLOCK):
        cached = _load_cached(
            keys_ptr, values_ptr, start, position, kv_head, stride_kpos, stride_khead,
            first, second, dims, BLOCK,
        )  # fmt: skip
        state = _attend(state, cached, q1, q2, scale)
    _, total, acc = state
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
    pdl = uses_pdl(q.device)
    _decode_attention_kernel[(heads,)](
        q, k, v, keys, values, out, position, cos, sin, scale, keys.stride(0), keys.stride(1),
        GROUP=group, HEAD_DIM=head_dim, INTERLEAVED=interleaved, BLOCK=128, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    return out
