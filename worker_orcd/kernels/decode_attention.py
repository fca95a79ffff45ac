"""Single-token attention over a KV cache, for decode.

The sequence length is read from device memory, not passed from the host, so the kernel can be
replayed inside a CUDA graph as the sequence grows; it visits only the filled positions. One
program serves one KV head and all the query heads that share it (grouped-query attention),
so each cached key and value is read once per step. Softmax is computed online in float32.
The torch reference is `F.scaled_dot_product_attention` over the filled positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, length_ptr, scale,
    stride_kpos, stride_khead,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    kv_head = tl.program_id(0)
    length = tl.load(length_ptr)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    q = tl.load(
        q_ptr + heads[:, None] * HEAD_DIM + dims[None, :], mask=row_mask[:, None], other=0.0
    )
    best = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in range(0, length, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        valid = positions < length
        offsets = positions[:, None] * stride_kpos + kv_head * stride_khead + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        correction = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + heads[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask[:, None])


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (heads, dim) float32; keys, values (positions, kv_heads, dim); `length` a one-element
    int tensor on the same device: how many cache positions are filled. Returns (heads, dim)."""
    heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(kv_heads,)](
        q.contiguous(), keys, values, out, length, scale, keys.stride(0), keys.stride(1),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 2), HEAD_DIM=head_dim,
        BLOCK=64,
    )  # fmt: skip
    return out
