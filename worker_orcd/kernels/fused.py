"""Fused elementwise kernels for the decoder layer: RMSNorm, rotary embedding with the KV-cache
write, SwiGLU's gate.

In eager torch each of these is 5 to 15 kernels; at batch 1 a layer's many tiny launches cost
more than its matmuls, so each becomes one launch. Every function here has a torch reference in
the layer that calls it (the CPU path), and the tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    variance = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, w * (x * tl.rsqrt(variance + eps)), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (rows, hidden) float32, contiguous."""
    out = torch.empty_like(x)
    n_cols = x.shape[-1]
    _rms_norm_kernel[(x.numel() // n_cols,)](
        x, weight, out, n_cols, eps, BLOCK=triton.next_power_of_2(n_cols)
    )
    return out


@triton.jit
def _rotate(x_ptr, heads, cos, sin, h, i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The rotated pairs of `heads` heads at x_ptr (h, i index heads and pairs): (first,
    second) halves of each pair, float32."""
    base = x_ptr + h * (2 * HALF)
    if INTERLEAVED:  # pairs (2i, 2i+1)
        first_at, second_at = 2 * i, 2 * i + 1
    else:  # pairs (i, i + half)
        first_at, second_at = i, i + HALF
    mask = h < heads
    first = tl.load(base + first_at, mask=mask)
    second = tl.load(base + second_at, mask=mask)
    return first * cos - second * sin, second * cos + first * sin, first_at, second_at, mask


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, slots_ptr,
    heads, kv_heads,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
):  # fmt: skip
    """One token: its q heads rotated in place; its k heads rotated and, with its v, written
    to its cache slot in the cache's dtype."""
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    slot = tl.load(slots_ptr + token)
    i = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + position * HALF + i)
    sin = tl.load(sin_ptr + position * HALF + i)
    dim: tl.constexpr = 2 * HALF
    h = tl.arange(0, BLOCK_H)[:, None]
    q = q_ptr + token * heads * dim
    first, second, first_at, second_at, mask = _rotate(q, heads, cos, sin, h, i, HALF, INTERLEAVED)
    tl.store(q + h * dim + first_at, first, mask=mask)
    tl.store(q + h * dim + second_at, second, mask=mask)
    h = tl.arange(0, BLOCK_KV)[:, None]
    k = k_ptr + token * kv_heads * dim
    first, second, first_at, second_at, mask = _rotate(
        k, kv_heads, cos, sin, h, i, HALF, INTERLEAVED
    )
    cache = slot * kv_heads * dim + h * dim
    dtype = keys_ptr.dtype.element_ty
    tl.store(keys_ptr + cache + first_at, first.to(dtype), mask=mask)
    tl.store(keys_ptr + cache + second_at, second.to(dtype), mask=mask)
    d = tl.arange(0, dim)[None, :]
    v = tl.load(v_ptr + token * kv_heads * dim + h * dim + d, mask=mask)
    tl.store(values_ptr + cache + d, v.to(dtype), mask=mask)


def rope_and_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor, bool],
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q (tokens, heads, head_dim) in place and write k (rotated) and v (tokens,
    kv_heads, head_dim), contiguous float32, to the cache (slots, kv_heads, head_dim) at each
    token's slot: one launch for what is otherwise two rotations, two casts and two scatters.
    `rotary` is the (positions, head_dim // 2) cos and sin tables and whether pairs are
    interleaved. Returns q."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    cos, sin, interleaved = rotary
    _rope_and_cache_kernel[(tokens,)](
        q, k, v, positions, cos, sin, keys, values, slot_mapping, heads, kv_heads,
        HALF=head_dim // 2, INTERLEAVED=interleaved, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_KV=triton.next_power_of_2(kv_heads),
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask)
    up = tl.load(up_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, gate * tl.sigmoid(gate) * up, mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](gate, up, out, n, BLOCK=1024)
    return out
