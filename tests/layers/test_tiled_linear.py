"""The CPU matmul's batch invariance, at the default model's shapes: a row's bits do not depend
on how many rows share the call or where it sits among them."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.layers.quant_linear import tiled_linear


@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 576), (3072, 576), (576, 1536)])
def test_a_row_is_the_same_bits_in_any_company(n: int, k: int):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=generator)
    row = torch.randn(1, k, generator=generator)
    alone = tiled_linear(row, weight)
    assert torch.allclose(alone, row @ weight.T, rtol=1e-4, atol=1e-4)
    for rows, at in [(2, 1), (8, 7), (9, 8), (17, 3), (100, 50)]:
        batch = torch.randn(rows, k, generator=generator)
        batch[at] = row[0]
        assert torch.equal(tiled_linear(batch, weight)[at], alone[0]), (rows, at)
