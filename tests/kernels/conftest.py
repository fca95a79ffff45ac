"""Random weights in any supported GGUF format, on the device the kernels run on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from worker_orcd.gguf.synth import random_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_weight(qtype: T, rows: int, cols: int, seed: int) -> torch.Tensor:
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


@pytest.fixture
def random_weight() -> Callable[[T, int, int, int], torch.Tensor]:
    """`random_weight(qtype, rows, cols, seed)`: the matrix's GGUF bytes, uint8."""
    return _random_weight
