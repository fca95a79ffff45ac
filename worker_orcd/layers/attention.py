"""Rotary grouped-query attention over a KV cache: rotary embedding, cache write and torch SDPA
for prefill; on CUDA, one Triton kernel does all three for a decode token. Positions past the
filled length are never read, so the cache starts uninitialized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_orcd.kernels.decode_attention import decode_attention
from worker_orcd.layers.rotary import RopeStyle, RotaryEmbedding


class KVCache:
    """Keys and values for every layer: (layers, positions, kv_heads, head_dim)."""

    def __init__(
        self,
        layers: int,
        max_positions: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (layers, max_positions, kv_heads, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)

    @property
    def max_positions(self) -> int:
        return self.keys.shape[1]


class Attention(nn.Module):
    def __init__(
        self,
        layer_index: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
    ):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rotary = rotary
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        cache: KVCache,
    ) -> torch.Tensor:
        """q (tokens, heads * dim); k, v (tokens, kv_heads * dim), not yet rotated, at
        `positions` = start, start + 1, ... (`start` is not read by a CUDA decode step, whose
        position lives on the device); returns (tokens, heads * dim)."""
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        tokens = q.shape[0]
        if tokens == 1 and q.is_cuda:
            rotary = self.rotary
            interleaved = rotary.style is RopeStyle.INTERLEAVED
            out = decode_attention(
                q, k, v, keys, values, positions, rotary.cos, rotary.sin, interleaved, self.scale
            )
            return out.view(1, -1)
        q = self.rotary(q.view(tokens, -1, self.head_dim), positions)
        k = self.rotary(k.view(tokens, -1, self.head_dim), positions)
        keys.index_copy_(0, positions, k)  # positions stay on the device: graph-safe
        values.index_copy_(0, positions, v.view(tokens, -1, self.head_dim))
        end = start + tokens
        mask = None
        if start > 0:  # new tokens see the cached prefix and the new tokens up to themselves
            mask = torch.ones(tokens, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys[:end].transpose(0, 1),
            values[:end].transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None and tokens > 1,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(0, 1).reshape(tokens, -1)
