"""Prefill's quantized matmul (dequantize kernel + cuBLAS) and the dequantize kernel against
the torch reference, `x @ dequantize(W).T`."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.gguf.dequant import dequantize
from worker_orcd.kernels.blocks import SUPPORTED
from worker_orcd.kernels.quant_matmul import dequantize_rows, quant_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tf32 on a GPU (~3e-4); exact float32 in the interpreter.
TOLERANCE = 2e-3 if DEVICE == "cuda" else 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("qtype", sorted(SUPPORTED, key=int), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [2, 17])
def test_matches_the_torch_reference(random_weight, qtype: T, rows: int):
    n, k = 40, 512  # 40 output rows: a partial tile of 16 and of 64
    blocks = random_weight(qtype, n, k, rows)
    x = torch.randn(rows, k)
    expected = x.double() @ dequantize(blocks, qtype, (n, k)).cpu().double().T
    y = quant_matmul(x.to(DEVICE), blocks, qtype, (n, k))
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < TOLERANCE


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_bias_and_residual(random_weight, with_bias: bool, with_residual: bool):
    rows = 3
    blocks = random_weight(T.Q8_0, 48, 256, rows)
    x, bias, residual = torch.randn(rows, 256), torch.randn(48), torch.randn(rows, 48)
    expected = x @ dequantize(blocks, T.Q8_0, (48, 256)).cpu().T
    expected += (bias if with_bias else 0) + (residual if with_residual else 0)
    actual = quant_matmul(
        x.to(DEVICE), blocks, T.Q8_0, (48, 256),
        bias.to(DEVICE) if with_bias else None, residual.to(DEVICE) if with_residual else None,
    )  # fmt: skip
    assert relative_error(actual, expected.double()) < TOLERANCE


def test_a_row_length_that_is_not_a_multiple_of_the_tile(random_weight):
    """Qwen2.5's hidden size, 896, is 3.5 super-blocks."""
    blocks = random_weight(T.Q5_0, 24, 928, 0)
    x = torch.randn(5, 928)
    expected = x.double() @ dequantize(blocks, T.Q5_0, (24, 928)).cpu().double().T
    assert (
        relative_error(quant_matmul(x.to(DEVICE), blocks, T.Q5_0, (24, 928)), expected) < TOLERANCE
    )


@pytest.mark.parametrize("qtype", sorted(SUPPORTED, key=int), ids=lambda q: q.name)
def test_dequantize_rows_is_exact(random_weight, qtype: T):
    n, k = 20, 768
    blocks = random_weight(qtype, n, k, 7)
    expected = dequantize(blocks, qtype, (n, k)).cpu()
    assert torch.equal(dequantize_rows(blocks, qtype, (n, k)).cpu(), expected)
    ids = torch.tensor([19, 0, 7, 7])  # an embedding lookup: any order, repeats
    gathered = dequantize_rows(blocks, qtype, (n, k), ids.to(DEVICE))
    assert torch.equal(gathered.cpu(), expected[ids])


def test_unsupported_types_are_refused():
    with pytest.raises(ValueError, match="Q2_K"):
        quant_matmul(torch.zeros(1, 256), torch.zeros(84, dtype=torch.uint8), T.Q2_K, (1, 256))
