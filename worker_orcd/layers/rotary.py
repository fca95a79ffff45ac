"""Rotary position embeddings in the two layouts GGUF files use.

llama.cpp's converter permutes llama's Q/K weights so that rotated pairs are adjacent
(`interleaved`, ggml's NORM mode), while qwen2, gemma and phi3 keep pairs half a head apart
(`neox`). Rotating with the layout the file was written for reproduces the original model.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class RopeStyle(Enum):
    INTERLEAVED = "interleaved"
    NEOX = "neox"


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, style: RopeStyle, max_positions: int):
        super().__init__()
        self.style = style
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (base**exponents)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.cos = freqs.cos()  # (max_positions, head_dim // 2)
        self.sin = freqs.sin()

    def to(self, device: torch.device) -> RotaryEmbedding:  # type: ignore[override]
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """What the fused kernel (`rope_and_cache_`) needs: cos, sin, whether interleaved."""
        return self.cos, self.sin, self.style is RopeStyle.INTERLEAVED

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x` of shape (tokens, heads, head_dim) by each token's position: the
        reference of `kernels.fused.rope_and_cache_`, which CUDA runs instead."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if self.style is RopeStyle.INTERLEAVED:
            first, second = x[..., 0::2], x[..., 1::2]
        else:
            first, second = x.chunk(2, dim=-1)
        rotated_first = first * cos - second * sin
        rotated_second = second * cos + first * sin
        if self.style is RopeStyle.INTERLEAVED:
            return torch.stack((rotated_first, rotated_second), dim=-1).flatten(-2)
        return torch.cat((rotated_first, rotated_second), dim=-1)
