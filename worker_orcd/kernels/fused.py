"""Fused elementwise kernels for the decoder layer: RMSNorm, rotary embedding, SwiGLU's gate.

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
def _rope_kernel(
    x_ptr, positions_ptr, cos_ptr, sin_ptr, heads, head_dim,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + position * HALF + i)
    sin = tl.load(sin_ptr + position * HALF + i)
    base = x_ptr + token * heads * head_dim + h * head_dim
    if INTERLEAVED:  # pairs (2i, 2i+1)
        first_ptr, second_ptr = base + 2 * i, base + 2 * i + 1
    else:  # pairs (i, i + half)
        first_ptr, second_ptr = base + i, base + i + HALF
    mask = (h < heads) & (i < HALF)
    first = tl.load(first_ptr, mask=mask)
    second = tl.load(second_ptr, mask=mask)
    tl.store(first_ptr, first * cos - second * sin, mask=mask)
    tl.store(second_ptr, second * cos + first * sin, mask=mask)


def rope_(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:
    """Rotate x (tokens, heads, head_dim), contiguous float32, in place; `cos` and `sin` are
    (positions, head_dim // 2) tables."""
    tokens, heads, head_dim = x.shape
    _rope_kernel[(tokens,)](
        x, positions, cos, sin, heads, head_dim,
        HALF=head_dim // 2, INTERLEAVED=interleaved, BLOCK_H=triton.next_power_of_2(heads),
    )  # fmt: skip
    return x


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
