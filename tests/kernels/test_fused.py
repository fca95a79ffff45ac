"""Fused RMSNorm, RoPE and SwiGLU kernels against the layers' torch code (their CPU path)."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.kernels.fused import rms_norm, rope_, silu_mul
from worker_orcd.layers.activation import SiluAndMul
from worker_orcd.layers.norm import RMSNorm
from worker_orcd.layers.rotary import RopeStyle, RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return ((actual.cpu() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("hidden", [576, 896, 640])
def test_rms_norm(hidden: int):
    x, weight = torch.randn(5, hidden), torch.rand(hidden) + 0.5
    expected = RMSNorm(weight, 1e-6)(x)  # a CPU tensor: the torch path
    assert close(rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-6), expected)


@pytest.mark.parametrize("style", list(RopeStyle))
@pytest.mark.parametrize(("heads", "head_dim"), [(14, 64), (2, 64), (4, 256), (9, 64)])
def test_rope(style: RopeStyle, heads: int, head_dim: int):
    rotary = RotaryEmbedding(head_dim, 10_000.0, style, max_positions=300)
    x = torch.randn(6, heads, head_dim)
    positions = torch.tensor([0, 1, 2, 57, 200, 299])
    expected = rotary(x, positions)
    on_device = rotary.to(torch.device(DEVICE))
    actual = rope_(
        x.clone().to(DEVICE),
        positions.to(DEVICE),
        on_device.cos,
        on_device.sin,
        interleaved=style is RopeStyle.INTERLEAVED,
    )
    assert close(actual, expected)


def test_silu_mul():
    gate, up = torch.randn(3, 4864), torch.randn(3, 4864)
    expected = SiluAndMul()(gate, up)
    assert close(silu_mul(gate.to(DEVICE), up.to(DEVICE)), expected)
