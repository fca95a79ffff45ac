"""The decode GEMV and what rides in its launch, against the layers' torch code: RMSNorm, then
`x @ dequantize(W).T`, bias, residual, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from worker_orcd.gguf.dequant import dequantize
from worker_orcd.kernels.blocks import SUPPORTED
from worker_orcd.kernels.quant_gemv import gemv, gemv_qkv, gemv_swiglu
from worker_orcd.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5  # float32 throughout, only the order of the sums differs


@dataclass(frozen=True)
class Weight:
    blocks: torch.Tensor
    qtype: T
    shape: tuple[int, int]

    def dense(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.shape).cpu().double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.cpu().double() - expected).norm() / expected.norm()).item()


def inputs(cols: int, seed: int) -> tuple[torch.Tensor, RMSNorm]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cols, generator=generator) * 3
    return x, RMSNorm(torch.rand(cols, generator=generator) + 0.5, 1e-6)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED, key=int), ids=lambda q: q.name)
def test_every_format_with_norm_bias_and_residual(random_weight, qtype: T):
    # 40 rows: partial row tiles; 768 columns: 3 super-blocks, a partial column step
    n, k = 40, 768
    weight = Weight(random_weight(qtype, n, k, int(qtype)), qtype, (n, k))
    x, norm = inputs(k, int(qtype))
    bias, residual = torch.randn(n), torch.randn(1, n)

    plain = gemv(x.to(DEVICE), weight)
    assert plain.shape == (1, n) and plain.dtype == torch.float32
    assert relative_error(plain, x.double() @ weight.dense().T) < TOLERANCE

    fused = gemv(
        x.to(DEVICE), weight, bias.to(DEVICE), residual.to(DEVICE),
        (norm.weight.to(DEVICE), norm.eps),
    )  # fmt: skip
    expected = residual.double() + norm(x).double() @ weight.dense().T + bias.double()
    assert relative_error(fused, expected) < TOLERANCE


@pytest.mark.parametrize(
    "qtype, cols",
    [
        (T.Q5_0, 896),  # Qwen2.5's hidden size: 28 blocks, one tile of 32 with 4 masked
        (T.Q5_0, 4864),  # its FFN size: 152 blocks, a tile of 64, a loop step, a tail of 24
        (T.Q4_K, 4864),  # 76 chunks: a tile of 64 and a tail of 12
    ],
)
def test_rows_of_the_real_lengths(random_weight, qtype: T, cols: int):
    weight = Weight(random_weight(qtype, 24, cols, 0), qtype, (24, cols))
    x, _ = inputs(cols, 0)
    assert relative_error(gemv(x.to(DEVICE), weight), x.double() @ weight.dense().T) < TOLERANCE


def test_swiglu_of_two_formats_after_the_norm(random_weight):
    gate = Weight(random_weight(T.Q5_0, 72, 512, 1), T.Q5_0, (72, 512))
    up = Weight(random_weight(T.Q4_K, 72, 512, 2), T.Q4_K, (72, 512))
    x, norm = inputs(512, 3)
    y = gemv_swiglu(x.to(DEVICE), gate, up, (norm.weight.to(DEVICE), norm.eps))
    normed = norm(x).double()
    expected = F.silu(normed @ gate.dense().T) * (normed @ up.dense().T)
    assert y.shape == (1, 72)
    assert relative_error(y, expected) < TOLERANCE


@pytest.mark.parametrize("with_bias", [True, False])
def test_q_k_and_v_in_one_launch(random_weight, with_bias: bool):
    shapes = [(T.Q5_0, 56), (T.Q5_0, 8), (T.Q8_0, 8)]  # 7 query heads, 1 KV head of 8
    weights = [
        Weight(random_weight(q, n, 256, n + i), q, (n, 256)) for i, (q, n) in enumerate(shapes)
    ]
    biases = [torch.randn(n) if with_bias else None for _, n in shapes]
    x, norm = inputs(256, 4)
    outputs = gemv_qkv(
        x.to(DEVICE), weights, [b.to(DEVICE) if b is not None else None for b in biases],
        (norm.weight.to(DEVICE), norm.eps),
    )  # fmt: skip
    for out, weight, bias in zip(outputs, weights, biases, strict=True):
        expected = norm(x).double() @ weight.dense().T
        if bias is not None:
            expected += bias.double()
        assert out.shape == (1, weight.shape[0])
        assert relative_error(out, expected) < TOLERANCE


def test_unsupported_types_are_refused():
    weight = Weight(torch.zeros(84, dtype=torch.uint8), T.Q2_K, (1, 256))
    with pytest.raises(ValueError, match="Q2_K"):
        gemv(torch.zeros(1, 256), weight)
