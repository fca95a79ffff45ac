"""Decode attention over the KV cache against torch's scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_orcd.kernels.decode_attention import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length"),
    [(14, 2, 64, 1), (14, 2, 64, 130), (9, 3, 64, 77), (4, 1, 256, 65), (8, 8, 32, 64)],
)
def test_matches_sdpa_over_the_filled_positions(heads, kv_heads, head_dim, length):
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(heads, head_dim, generator=generator).to(DEVICE)
    keys = torch.randn(200, kv_heads, head_dim, generator=generator).to(DEVICE)
    values = torch.randn(200, kv_heads, head_dim, generator=generator).to(DEVICE)
    keys[length:] = float("nan")  # positions past the length must never be read
    values[length:] = float("nan")
    length_tensor = torch.tensor([length], device=DEVICE)
    out = decode_attention(q, keys, values, length_tensor, head_dim**-0.5)
    expected = F.scaled_dot_product_attention(
        q[:, None, :].double(),
        keys[:length].transpose(0, 1).double(),
        values[:length].transpose(0, 1).double(),
        scale=head_dim**-0.5,
        enable_gqa=True,
    )[:, 0]
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5
