"""The batched integer matmul (`mmq`) against the GEMV's torch reference, and bit for bit against
the GEMV itself, row by row and whatever the number of rows beside a row: the kernels' part of
batch invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from tests.kernels.test_quant_gemv import TOLERANCE, Weight, inputs, product, relative_error
from worker_orcd.kernels.integer_dot import INTEGER_DOT
from worker_orcd.kernels.quant_gemv import gemv, gemv_qkv, gemv_swiglu
from worker_orcd.kernels.quant_mmq import MmqConfig, _split_buffers, mmq
from worker_orcd.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def crowd(k: int, m: int, seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """m random rows of length k, and an RMSNorm's (weight, eps) on the device."""
    x, norm = inputs(k, seed)
    return rows_of(x, m, seed), (norm.weight.to(DEVICE), norm.eps)


def rows_of(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """x's row among `count` - 1 random others, at a position that depends on `count`."""
    others = torch.randn(count, x.shape[1], generator=torch.Generator().manual_seed(seed)) * 3
    others[count // 2] = x[0]
    return others


@pytest.mark.parametrize("qtype", sorted(INTEGER_DOT, key=int), ids=lambda q: q.name)
def test_every_format_matches_the_reference_and_the_gemv_bit_for_bit(random_weight, qtype: T):
    n, k, m = 40, 768, 5  # partial tiles of rows and of columns; 3 super-blocks
    weight = Weight(random_weight(qtype, n, k, int(qtype)), qtype, (n, k))
    x, norm = inputs(k, int(qtype))
    x = rows_of(x, m, int(qtype))
    bias, residual = torch.randn(n), torch.randn(m, n)
    on_device = (norm.weight.to(DEVICE), norm.eps)

    (y,) = mmq(x.to(DEVICE), [weight], [bias.to(DEVICE)], residual.to(DEVICE), on_device)
    expected = residual.double() + product(x, weight, norm) + bias.double()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert relative_error(y, expected) < TOLERANCE
    for i in range(m):
        row = gemv(x[i : i + 1].to(DEVICE), weight, bias.to(DEVICE),
                   residual[i : i + 1].to(DEVICE), on_device)  # fmt: skip
        assert torch.equal(y[i : i + 1].cpu(), row.cpu()), f"row {i}"


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_a_row_is_the_same_bits_among_any_number_of_rows(random_weight, qtype: T):
    n, k = 24, 928 if qtype == T.Q5_0 else 768  # 29 blocks: a last group of one
    weight = Weight(random_weight(qtype, n, k, 7), qtype, (n, k))
    x, norm = inputs(k, 7)
    on_device = (norm.weight.to(DEVICE), norm.eps)
    alone = gemv(x.to(DEVICE), weight, norm=on_device).cpu()
    for count in (1, 2, 17, 33):  # tiles of 16, 32 and 64 rows
        (y,) = mmq(rows_of(x, count, count).to(DEVICE), [weight], [None], norm=on_device)
        assert torch.equal(y[count // 2 : count // 2 + 1].cpu(), alone), f"among {count}"


def test_swiglu_and_qkv_match_their_gemvs_bit_for_bit(random_weight):
    k, m = 512, 3
    x, on_device = crowd(k, m, 11)
    norm = RMSNorm(on_device[0].cpu(), on_device[1])
    gate = Weight(random_weight(T.Q5_0, 72, k, 1), T.Q5_0, (72, k))
    up = Weight(random_weight(T.Q4_K, 72, k, 2), T.Q4_K, (72, k))
    (y,) = mmq(x.to(DEVICE), [gate, up], [None, None], norm=on_device, swiglu=True)
    expected = F.silu(product(x, gate, norm)) * product(x, up, norm)
    assert relative_error(y, expected) < TOLERANCE

    shapes = [(T.Q5_0, 56), (T.Q5_0, 8), (T.Q8_0, 8)]  # 7 query heads, 1 KV head of 8
    qkv = [Weight(random_weight(q, n, k, n + i), q, (n, k)) for i, (q, n) in enumerate(shapes)]
    biases = [torch.randn(n).to(DEVICE) for _, n in shapes]
    outputs = mmq(x.to(DEVICE), qkv, biases, norm=on_device)
    for i in range(m):
        row = x[i : i + 1].to(DEVICE)
        assert torch.equal(y[i : i + 1], gemv_swiglu(row, gate, up, on_device))
        for out, alone in zip(outputs, gemv_qkv(row, qkv, biases, on_device), strict=True):
            assert torch.equal(out[i : i + 1], alone)


def test_k_split_across_programs_gives_the_same_bits_and_leaves_zeros(random_weight):
    k, m = 768, 20
    x, on_device = crowd(k, m, 13)
    gate = Weight(random_weight(T.Q4_K, 40, k, 3), T.Q4_K, (40, k))
    up = Weight(random_weight(T.Q6_K, 40, k, 4), T.Q6_K, (40, k))
    whole, split = MmqConfig(32, 64, 1), MmqConfig(16, 32, 3)  # 12 chunks, 6 halves: 3 splits
    q = Weight(random_weight(T.Q5_0, 24, k, 5), T.Q5_0, (24, k))
    for swiglu, matrices in ((True, [gate, up]), (False, [up]), (False, [q, gate, up])):
        args = (x.to(DEVICE), matrices, [None] * len(matrices), None, on_device, swiglu)
        for a, b in zip(mmq(*args, config=split), mmq(*args, config=whole), strict=True):
            assert torch.equal(a, b)
    sums, arrived = _split_buffers(torch.device(DEVICE))
    assert not sums.any() and not arrived.any()


def test_formats_without_an_integer_path_are_refused(random_weight):
    weight = Weight(random_weight(T.F16, 16, 256, 0), T.F16, (16, 256))
    with pytest.raises(ValueError, match="F16"):
        mmq(torch.zeros(2, 256, device=DEVICE), [weight], [None])
