"""The decode GEMV and what rides in its launch, against the layers' torch code: RMSNorm, then
`x @ dequantize(W).T`, bias, residual, SwiGLU. Formats multiplied in integers see x as
`quantize_activation` rounds it, so their reference rounds x the same way."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from worker_orcd.gguf.dequant import dequantize
from worker_orcd.kernels.blocks import SUPPORTED
from worker_orcd.kernels.integer_dot import INTEGER_DOT, quantize_activation
from worker_orcd.kernels.quant_gemv import MAX_ROWS, GemvConfig, gemv, gemv_qkv, gemv_swiglu
from worker_orcd.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5  # float32, and sums in fixed point at 2^-32
ROUNDING_TOLERANCE = 2e-2  # x rounded to 8 bits per block, against unrounded x


@dataclass(frozen=True)
class Weight:
    blocks: torch.Tensor
    qtype: T
    shape: tuple[int, int]

    def dense(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.shape).cpu().double()


def product(x: torch.Tensor, weight: Weight, norm: RMSNorm | None = None) -> torch.Tensor:
    """What the kernel computes for `norm(x) @ W.T`: x times the norm weight, rounded for integer
    formats, times W, times 1/rms(x), which factors out of every dot product."""
    inverse_rms = 1.0
    if norm is not None:
        inverse_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps).double()
        x = x * norm.weight
    if weight.qtype in INTEGER_DOT:
        x = quantize_activation(x)
    return inverse_rms * (x.double() @ weight.dense().T)


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
    assert relative_error(plain, product(x, weight)) < TOLERANCE
    assert relative_error(plain, x.double() @ weight.dense().T) < ROUNDING_TOLERANCE

    fused = gemv(
        x.to(DEVICE), weight, bias.to(DEVICE), residual.to(DEVICE),
        (norm.weight.to(DEVICE), norm.eps),
    )  # fmt: skip
    expected = residual.double() + product(x, weight, norm) + bias.double()
    assert relative_error(fused, expected) < TOLERANCE
    unrounded = residual.double() + norm(x).double() @ weight.dense().T + bias.double()
    assert relative_error(fused, unrounded) < ROUNDING_TOLERANCE


@pytest.mark.parametrize(
    "qtype, cols",
    [
        (T.Q5_0, 896),  # Qwen2.5's hidden size: 28 blocks, one tile of 32 with 4 masked
        (T.Q5_0, 4864),  # its FFN size: 152 blocks, a tile of 64, a loop step, a tail of 24
        (T.Q4_K, 4864),  # 76 chunks: a tile of 64 and a tail of 12
        (T.Q6_K, 4864),  # 38 halves of super-blocks: a tile of 32 and a tail of 6
    ],
)
def test_rows_of_the_real_lengths(random_weight, qtype: T, cols: int):
    weight = Weight(random_weight(qtype, 24, cols, 0), qtype, (24, cols))
    x, _ = inputs(cols, 0)
    assert relative_error(gemv(x.to(DEVICE), weight), product(x, weight)) < TOLERANCE


def test_swiglu_of_two_formats_after_the_norm(random_weight):
    gate = Weight(random_weight(T.Q5_0, 72, 512, 1), T.Q5_0, (72, 512))
    up = Weight(random_weight(T.Q4_K, 72, 512, 2), T.Q4_K, (72, 512))
    x, norm = inputs(512, 3)
    y = gemv_swiglu(x.to(DEVICE), gate, up, (norm.weight.to(DEVICE), norm.eps))
    expected = F.silu(product(x, gate, norm)) * product(x, up, norm)
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
        expected = product(x, weight, norm)
        if bias is not None:
            expected += bias.double()
        assert out.shape == (1, weight.shape[0])
        assert relative_error(out, expected) < TOLERANCE


@pytest.mark.parametrize("qtype", sorted(INTEGER_DOT, key=int), ids=lambda q: q.name)
def test_x_rounded_once_in_a_launch_of_its_own(random_weight, qtype: T):
    # the path of long rows, of the output head and of every normed x: one launch rounds x and
    # the GEMV gathers it, to the same bits as the GEMV's programs rounding it themselves
    n, k = 40, 768
    weight = Weight(random_weight(qtype, n, k, int(qtype) + 1), qtype, (n, k))
    x, _ = inputs(k, int(qtype) + 1)
    residual = torch.randn(1, n).to(DEVICE)
    once = gemv(x.to(DEVICE), weight, residual=residual,
                config=GemvConfig(8, 4, quantize_first=True))  # fmt: skip
    each = gemv(x.to(DEVICE), weight, residual=residual, config=GemvConfig(8, 4))
    assert relative_error(once, residual.cpu().double() + product(x, weight)) < TOLERANCE
    assert torch.equal(once, each)


@pytest.mark.parametrize("qtype", sorted(INTEGER_DOT, key=int), ids=lambda q: q.name)
def test_rows_in_one_launch_get_the_bits_each_gets_alone(random_weight, qtype: T):
    # up to MAX_ROWS tokens share a launch; a row's result must not depend on its neighbours
    n, k = 40, 768
    weight = Weight(random_weight(qtype, n, k, int(qtype) + 2), qtype, (n, k))
    x, norm = inputs(k, int(qtype) + 2)
    rows = torch.cat([x, torch.randn(MAX_ROWS - 1, k, generator=torch.Generator().manual_seed(5))])
    bias, residual = torch.randn(n).to(DEVICE), torch.randn(MAX_ROWS, n).to(DEVICE)
    fused = (norm.weight.to(DEVICE), norm.eps)
    config = GemvConfig(8, 4, quantize_first=int(qtype) % 2 == 0)  # both x paths over the formats
    plain = gemv(rows.to(DEVICE), weight, config=config)
    normed = gemv(rows.to(DEVICE), weight, bias, residual, fused, config=config)
    assert plain.shape == normed.shape == (MAX_ROWS, n)
    for i in (0, 3, MAX_ROWS - 1):
        row = rows[i : i + 1].to(DEVICE)
        assert torch.equal(plain[i : i + 1], gemv(row, weight, config=config))
        alone = gemv(row, weight, bias, residual[i : i + 1], fused, config=config)
        assert torch.equal(normed[i : i + 1], alone)
    assert relative_error(plain, product(rows, weight)) < TOLERANCE


def test_swiglu_and_q_k_v_over_several_rows_get_each_row_s_bits(random_weight):
    gate = Weight(random_weight(T.Q5_0, 72, 256, 6), T.Q5_0, (72, 256))
    up = Weight(random_weight(T.Q4_K, 72, 256, 7), T.Q4_K, (72, 256))
    shapes = [(T.Q5_0, 56), (T.Q5_0, 8), (T.Q8_0, 8)]
    qkv = [Weight(random_weight(q, n, 256, 8 + i), q, (n, 256)) for i, (q, n) in enumerate(shapes)]
    biases = [torch.randn(n).to(DEVICE) for _, n in shapes]
    _, norm = inputs(256, 9)
    fused = (norm.weight.to(DEVICE), norm.eps)
    rows = torch.randn(5, 256, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    swiglu = gemv_swiglu(rows, gate, up, fused)
    q, k, v = gemv_qkv(rows, qkv, biases, fused)
    assert swiglu.shape == (5, 72) and q.shape == (5, 56)
    for i in range(5):
        row = rows[i : i + 1]
        assert torch.equal(swiglu[i : i + 1], gemv_swiglu(row, gate, up, fused))
        for together, alone in zip((q, k, v), gemv_qkv(row, qkv, biases, fused), strict=True):
            assert torch.equal(together[i : i + 1], alone)


def test_more_rows_than_a_launch_takes_are_refused(random_weight):
    weight = Weight(random_weight(T.Q8_0, 8, 64, 0), T.Q8_0, (8, 64))
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.randn(MAX_ROWS + 1, 64).to(DEVICE), weight)


def test_activation_rounding_is_within_half_a_step_per_block():
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 32:64] = 0.0  # an all-zero block stays zero
    rounded = quantize_activation(x).reshape(8, 32)
    blocks = x.reshape(8, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((rounded - blocks).abs() <= step / 2 + 1e-6)
    assert torch.all(rounded[1] == 0)
    levels = torch.round(rounded / step.clamp_min(1e-30))
    assert torch.all(levels.abs() <= 127) and torch.all(levels.abs().amax(dim=1)[[0, 2]] == 127)


def test_unsupported_types_are_refused():
    weight = Weight(torch.zeros(84, dtype=torch.uint8), T.Q2_K, (1, 256))
    with pytest.raises(ValueError, match="Q2_K"):
        gemv(torch.zeros(1, 256), weight)
