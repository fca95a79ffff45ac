"""The dequantize-in-the-matmul kernel against its torch reference, `x @ dequantize(W).T`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from worker_orcd.gguf.dequant import dequantize
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels.quant_matmul import DOT_MIN_ROWS, SUPPORTED, quant_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tf32 in tl.dot on a GPU (~3e-4); exact float32 in the interpreter and on the GEMV path.
TOLERANCE = 2e-3 if DEVICE == "cuda" else 1e-5


def weight(qtype: T, rows: int, cols: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if qtype == T.BF16:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        data = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif qtype == T.MXFP4:
        _, type_size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows * cols // 32, type_size), dtype=np.uint8)
        data[:, 0] = rng.integers(110, 140, len(data))  # exponents near 2^0
    else:
        data = random_blocks(qtype, rows, cols, rng)
    return torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).to(DEVICE)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED, key=int), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, DOT_MIN_ROWS + 1])
def test_matches_the_torch_reference(qtype: T, rows: int):
    n, k = 40, 512  # 40 output rows: a partial tile of 16 and of 64
    blocks = weight(qtype, n, k, seed=rows)
    x = torch.randn(rows, k, device=DEVICE)
    expected = x.double() @ dequantize(blocks, qtype, (n, k)).double().T
    y = quant_matmul(x, blocks, qtype, (n, k))
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert ((y.double() - expected).norm() / expected.norm()).item() < TOLERANCE


def test_a_row_length_that_is_not_a_multiple_of_the_tile():
    """Qwen2.5's hidden size, 896, is 3.5 super-blocks and 7 GEMV tiles of 128."""
    blocks = weight(T.Q5_0, 24, 896 + 32, seed=0)
    x = torch.randn(2, 928, device=DEVICE)
    expected = x.double() @ dequantize(blocks, T.Q5_0, (24, 928)).double().T
    y = quant_matmul(x, blocks, T.Q5_0, (24, 928))
    assert ((y.double() - expected).norm() / expected.norm()).item() < TOLERANCE


def test_unsupported_types_are_refused():
    with pytest.raises(ValueError, match="Q2_K"):
        quant_matmul(torch.zeros(1, 256), torch.zeros(84, dtype=torch.uint8), T.Q2_K, (1, 256))
