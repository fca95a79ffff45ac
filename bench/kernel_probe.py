"""Two design questions for the next kernels, answered on the device.

    python3 bench/kernel_probe.py

1. Decode attention: a decode row's tile holds 16 query slots of 8 (padded) heads, 128 rows of
   which a GQA group of 7 is real. With tiles of 2 query slots (16 rows) the softmax does an
   eighth of the work. Does a row keep its bits (the guarantee that a token gets the same bits
   in a prefill chunk as in a decode step), and how much faster is it? First run (H100,
   2026-12-07, 4 warps): tiles of 2 were 1.9x faster at B=1 and 2.2x at B=128 (context 2,048:
   63.5 against 142.9 us), but gave other bits than tiles of 16 (mma.sync against wgmma); 64
   keys per split instead of 256 halved B=1 decode at 200 positions and doubled an 8,192-token
   prefill's attention. So the probe now asks whether tiles of 16 at 2 warps (mma.sync) give
   the bits of tiles of 2, and what that costs prefill.
2. Batched matmuls: a fused kernel that dequantizes a tile of the GGUF blocks to float16 in
   registers (`dequant_tile`, any format) and multiplies on the tensor cores (`tl.dot`, float32
   sums) does no per-output scale work, unlike `mmq`. Is it faster than the GEMV (one row) and
   `mmq` (many), and does a row keep its bits across tile heights and row counts? First run:
   bits equal at tile heights 16 and 32 (mma.sync) for any row count, other bits at 64 and 128
   (wgmma); at 2,048 rows 3.8x faster than `mmq` on Q4_K down (125 against 476 us), 1.8x on
   Q5_0 gate; at 1 row 6 to 20x slower than the GEMV.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels import paged_attention
from worker_orcd.kernels.blocks import dequant_tile
from worker_orcd.kernels.paged_attention import paged_attention_kernel
from worker_orcd.kernels.quant_gemv import gemv
from worker_orcd.kernels.quant_matmul import dequantize_rows
from worker_orcd.kernels.quant_mmq import mmq
from worker_orcd.sampling_params import SamplingParams


@triton.jit
def _dequant_dot_kernel(
    x_ptr, w_ptr, out_ptr, M, N, row_bytes,
    K: tl.constexpr, QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], rows[:, None] < M, 0.0)
        w = dequant_tile(w_ptr, cols, cols < N, k0, row_bytes, K, QTYPE, BN, BK)
        acc = tl.dot(x, tl.trans(w.to(tl.float16)), acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc, mask=mask)


def dequant_dot(
    x: torch.Tensor, matrix: SimpleNamespace, bm: int, bn: int = 64, bk: int = 64, warps: int = 4
) -> torch.Tensor:
    """x (M, K) float16 @ W.T, W dequantized tile by tile: (M, N) float32."""
    (m, k), n = x.shape, matrix.shape[0]
    block_size, type_size = GGML_QUANT_SIZES[matrix.qtype]
    out = torch.empty(m, n, device=x.device, dtype=torch.float32)
    _dequant_dot_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, matrix.blocks, out, m, n, k // block_size * type_size,
        K=k, QTYPE=int(matrix.qtype), BM=bm, BN=bn, BK=bk, num_warps=warps,
    )  # fmt: skip
    return out


def microseconds(launch: Callable[[], object], reps: int = 50) -> float:
    """Per launch, over `reps` launches replayed from one CUDA graph."""
    launch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            launch()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def attention_batch(seqs: int, context: int, queries: int, generator: torch.Generator):
    """Random keys and values for `seqs` sequences of `context` positions in shuffled blocks of
    16, and a batch of each one's last `queries` tokens."""
    per_seq = -(-context // 16)
    keys, values = (
        torch.randn(seqs * per_seq * 16, 2, 64, device="cuda", generator=generator).half()
        for _ in range(2)
    )
    free = list(range(seqs * per_seq))
    random.Random(0).shuffle(free)
    chunks = []
    for _ in range(seqs):
        seq = Sequence(list(range(context)), SamplingParams())
        seq.block_table = [free.pop() for _ in range(per_seq)]
        chunks.append(ScheduledChunk(seq, context - queries, queries, True))
    batch = ForwardBatch.build(chunks, 16, torch.device("cuda"))
    q = torch.randn(seqs * queries, 14, 64, device="cuda", generator=generator)
    return q, keys, values, batch


def probe_attention() -> None:
    """Per shape, time per launch pair (split + merge) by query tile and warps, and whether a
    decode configuration gives a row the bits of a prefill one (the guarantee that a token gets
    the same bits in a prefill chunk as in a decode step). Tiles of 16 query slots are 128
    rows: wgmma at 4 warps, mma.sync at 2; tiles of 2 are 16 rows: mma.sync."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    configs = ((16, 4), (16, 2), (2, 1), (2, 2), (2, 4))
    shapes = ((1, 200, 1), (1, 2048, 1), (1, 16384, 1), (128, 256, 1), (128, 2048, 1))
    for seqs, context, queries in (*shapes, (1, 2048, 2048), (1, 8192, 2048)):
        q, keys, values, batch = attention_batch(seqs, context, queries, generator)
        results = {}
        for tile, warps in configs:
            paged_attention.SPLIT_WARPS = warps
            tiled = dataclasses.replace(batch, query_tile=tile)
            out = paged_attention_kernel(q, keys, values, tiled, 0.125)
            us = microseconds(partial(paged_attention_kernel, q, keys, values, tiled, 0.125))
            results[tile, warps] = (out, us)
        wgmma, mma = results[16, 4][0], results[16, 2][0]
        cells = [
            f"tile {t} warps {w}: {us:.1f} us, bits of (16, 4) {torch.equal(out, wgmma)}, "
            f"of (16, 2) {torch.equal(out, mma)}"
            for (t, w), (out, us) in results.items()
        ]
        print(f"attention B={seqs} context={context} queries={queries}: " + "; ".join(cells))
    paged_attention.SPLIT_WARPS = 4


def probe_matmuls() -> None:
    rng = np.random.default_rng(0)
    for name, qtype, n, k in (("gate Q5_0", T.Q5_0, 4864, 896), ("down Q4_K", T.Q4_K, 896, 4864)):
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        matrix = SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))
        x = torch.randn(2048, k, device="cuda")
        x16 = x.half()
        weight = dequantize_rows(blocks, qtype, (n, k)).half().float()
        error = (dequant_dot(x16[:128], matrix, 64) - x16[:128].float() @ weight.T).abs().max()
        alone = dequant_dot(x16[:1], matrix, 16)
        same = {
            (bm, m): torch.equal(dequant_dot(x16[:m], matrix, bm)[:1], alone)
            for bm in (16, 32, 64, 128)
            for m in (1, 7, 128, 2048)
        }
        print(f"{name}: max abs error {error:.2e}; row 0's bits at (BM, M): {same}", flush=True)
        for m in (1, 128, 2048):
            xm, x16m = x[:m].contiguous(), x16[:m].contiguous()
            ours = microseconds(
                partial(gemv, xm, matrix) if m == 1 else partial(mmq, xm, [matrix], [None])
            )
            best = min(
                (microseconds(partial(dequant_dot, x16m, matrix, bm, bn)), bm, bn)
                for bm in (16, 64, 128)
                if bm <= max(16, 2 * m)
                for bn in (64, 128)
            )
            print(
                f"  M={m:5d}: {'gemv' if m == 1 else 'mmq'} {ours:8.1f} us, dequantize+dot "
                f"{best[0]:8.1f} us (BM {best[1]}, BN {best[2]})",
                flush=True,
            )


if __name__ == "__main__":
    probe_attention()
    probe_matmuls()
