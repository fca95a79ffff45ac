"""Fused RMSNorm, RoPE with the cache write, and SwiGLU kernels against the layers' torch code
(their CPU path)."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.kernels.fused import rms_norm, rope_and_cache_, silu_mul
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
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(14, 2, 64), (4, 4, 256), (9, 3, 64)])
def test_rope_and_cache(style: RopeStyle, heads: int, kv_heads: int, head_dim: int):
    rotary = RotaryEmbedding(head_dim, 10_000.0, style, max_positions=300)
    q, k, v = (torch.randn(6, n, head_dim) for n in (heads, kv_heads, kv_heads))
    positions = torch.tensor([0, 1, 2, 57, 200, 299])
    slots = torch.tensor([9, 3, 0, 17, 4, 11])
    keys, values = (torch.zeros(20, kv_heads, head_dim, dtype=torch.float16) for _ in range(2))
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[slots] = rotary(k, positions).half()  # the torch path
    expected_values[slots] = v.half()
    expected_q = rotary(q, positions)
    on_device = rotary.to(torch.device(DEVICE))  # in place: `rotary` is on the device now
    keys, values = keys.to(DEVICE), values.to(DEVICE)
    actual = rope_and_cache_(
        *(t.clone().to(DEVICE) for t in (q, k, v)),
        positions.to(DEVICE),
        on_device.tables,
        keys,
        values,
        slots.to(DEVICE),
    )
    assert close(actual, expected_q)
    # float16 rounding of nearly equal float32 values: equal, or one half-ulp apart
    assert torch.allclose(keys.cpu().float(), expected_keys.float(), rtol=1e-3, atol=1e-6)
    assert torch.equal(values.cpu(), expected_values)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots] = False
    assert not keys.cpu()[untouched].any() and not values.cpu()[untouched].any()


def test_silu_mul():
    gate, up = torch.randn(3, 4864), torch.randn(3, 4864)
    expected = SiluAndMul()(gate, up)
    assert close(silu_mul(gate.to(DEVICE), up.to(DEVICE)), expected)
