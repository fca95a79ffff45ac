"""Grouped-query attention over a KV cache: torch SDPA for prefill, a Triton kernel for CUDA
decode. Positions past the filled length are never read, so the cache starts uninitialized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_orcd.kernels.decode_attention import decode_attention


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
    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """q (tokens, heads, dim); k, v (tokens, kv_heads, dim) at consecutive `positions`."""
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        keys.index_copy_(0, positions, k)  # positions stay on the device: graph-safe
        values.index_copy_(0, positions, v)
        tokens = q.shape[0]
        if tokens == 1 and q.is_cuda:
            length = positions[-1:] + 1
            return decode_attention(q[0], keys, values, length, self.scale).view(1, -1)
        start = int(positions[0])
        end = start + tokens
        mask = None
        if tokens > 1:  # each new token sees the cached prefix and the new tokens up to itself
            mask = torch.ones(tokens, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys[:end].transpose(0, 1),
            values[:end].transpose(0, 1),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(0, 1).reshape(tokens, -1)
