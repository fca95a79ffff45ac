"""The fused decode attention kernel (rotary, cache write, attention) against the attention
layer's torch path: rotary embedding, cache write, then scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.kernels.decode_attention import decode_attention
from worker_orcd.layers.attention import Attention, KVCache
from worker_orcd.layers.rotary import RopeStyle, RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected.double()).norm() / expected.norm()).item()


@pytest.mark.parametrize("style", list(RopeStyle))
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "position"),
    [(14, 2, 64, 0), (14, 2, 64, 130), (9, 3, 64, 77), (4, 1, 256, 64), (8, 8, 32, 63)],
)
def test_matches_the_layers_torch_path(style, heads, kv_heads, head_dim, position):
    generator = torch.Generator().manual_seed(position)
    rotary = RotaryEmbedding(head_dim, 10_000.0, style, max_positions=200)
    layer = Attention(0, heads, kv_heads, head_dim, rotary)
    cache = KVCache(1, 200, kv_heads, head_dim, torch.device("cpu"))
    cache.keys[0].copy_(torch.randn(200, kv_heads, head_dim, generator=generator))
    cache.values[0].copy_(torch.randn(200, kv_heads, head_dim, generator=generator))
    cache.keys[0, position + 1 :] = float("nan")  # past the position: never read
    cache.values[0, position + 1 :] = float("nan")
    q = torch.randn(1, heads * head_dim, generator=generator)
    k, v = torch.randn(2, 1, kv_heads * head_dim, generator=generator)
    keys, values = cache.keys[0].to(DEVICE), cache.values[0].to(DEVICE)
    on_device = RotaryEmbedding(head_dim, 10_000.0, style, max_positions=200).to(DEVICE)

    expected = layer(q, k, v, torch.tensor([position]), position, cache)  # writes the CPU cache
    out = decode_attention(
        q[0].to(DEVICE), k[0].to(DEVICE), v[0].to(DEVICE), keys, values,
        torch.tensor([position], device=DEVICE), on_device.cos, on_device.sin,
        interleaved=style is RopeStyle.INTERLEAVED, scale=head_dim**-0.5,
    )  # fmt: skip
    assert relative_error(out, expected[0]) < 1e-5
    assert relative_error(keys[position], cache.keys[0, position]) < 1e-6
    assert torch.equal(values[position].cpu(), cache.values[0, position])
