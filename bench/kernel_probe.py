"""Design questions for the next kernels, answered on the device.

    python3 bench/kernel_probe.py {matmuls,attention,rows}

1. Decode attention: a decode row's tile holds 16 query slots of 8 (padded) heads, 128 rows of
   which a GQA group of 7 is real. With tiles of 2 query slots (16 rows) the softmax does an
   eighth of the work. Does a row keep its bits (the guarantee that a token gets the same bits
   in a prefill chunk as in a decode step), and how much faster is it? First run (H100,
   2026-12-07, 4 warps): tiles of 2 were 1.9x faster at B=1 and 2.2x at B=128 (context 2,048:
   63.5 against 142.9 us), but gave other bits than tiles of 16 (mma.sync against wgmma); 64
   keys per split instead of 256 halved B=1 decode at 200 positions and doubled an 8,192-token
   prefill's attention. Second run (H100, 2026-12-07, afternoon): a decode row (one query per
   sequence) gets the same bits from tiles of 2 at 1 warp as from tiles of 16 at 4 warps, in
   all five decode shapes, 1.7x faster at B=1 (200 positions: 11.0 against 18.6 us; 16,384:
   16.4 against 25.8) and 2.3x at B=128 over 2,048 positions (62.2 against 143.1); at 2 or 4
   warps tiles of 2 give other bits. Its prefill rows were void (see `probe_attention`). But
   the guarantee does not need today's bits, only one configuration for decode and prefill
   alike; so the probe now times (tile, warps, keys per step) configurations and checks, within
   each, that a token decoded alone gets its row of a 2,048-token prefill. Offline
   (`kernel_resources.py attention`): 1 warp spills at tiles of 8 or 16 tokens; tiles of 2 at
   4 warps and 64 keys a step take 108 registers. Not yet run on a device.
2. Batched matmuls: a matmul that dequantizes a tile of the GGUF blocks to float16 in
   registers (`dequant_tile`, any format) and multiplies on the tensor cores (`tl.dot`, float32
   sums) has no per-output scale work, unlike `mmq`. First run: bits equal at tile heights 16
   and 32 (mma.sync) for any row count, other bits at 64 and 128 (wgmma). Second run (H100,
   2026-12-07, `matmuls`): at tile heights 16 and 32, sums per 128 elements of K added in
   fixed point, a row keeps its bits across tile shapes, K splits and row counts on every
   shape, but the kernel is 3-6x slower than the GEMV at one row and slower than `mmq` at 32
   to 2,048 rows on the Q5_0 matrices (gate at 128 rows 68 against 38 us, at 2,048 681 against
   352 us); it wins only on the small Q8_0 matrix and ties on Q4_K down. Unpacking each weight
   element from its byte costs more than `mmq`'s per-output scale work, so the integer kernels
   stay.
3. Rows 2 to 8 (`rows`): the GEMV over every row against `mmq`, per shape (the same bits).
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
from gguf import GGMLQuantizationType as T

from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels import paged_attention
from worker_orcd.kernels.blocks import dequant_tile
from worker_orcd.kernels.integer_dot import from_fixed, row_bytes, to_fixed
from worker_orcd.kernels.paged_attention import paged_attention_kernel
from worker_orcd.kernels.quant_gemv import gemv, gemv_config
from worker_orcd.kernels.quant_matmul import dequantize_rows
from worker_orcd.kernels.quant_mmq import SPLIT_SUMS, _split_buffers, mmq
from worker_orcd.sampling_params import SamplingParams


@triton.jit
def _mma_kernel(
    x_ptr, w_ptr, out_ptr, sums_ptr, arrived_ptr, M, N, splits,
    K: tl.constexpr, QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """x (M, K) float32 @ W.T with x and each dequantized weight rounded to float16, float32
    sums on the tensor cores per GROUP elements of K, groups added in fixed point (any split
    along K gives the same bits)."""
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask, cmask = rows < M, cols < N
    groups = tl.cdiv(K, GROUP)
    split = tl.program_id(2)
    acc = tl.zeros((BM, BN), tl.int64)
    for g in tl.range(split * groups // splits, (split + 1) * groups // splits):
        part = tl.zeros((BM, BN), tl.float32)
        for kk in tl.static_range(0, GROUP, BK):
            ks = g * GROUP + kk + tl.arange(0, BK)
            x = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
                rmask[:, None] & (ks < K)[None, :],
                0.0,
            )
            w = dequant_tile(w_ptr, cols, cmask, g * GROUP + kk, row_bytes(QTYPE, K), K, QTYPE,
                             BN, BK)  # fmt: skip
            part = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), part)
        acc += to_fixed(part)
    at = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if not SPLIT:
        tl.store(out_ptr + at, from_fixed(acc), mask=mask)
    else:
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.atomic_add(sums_ptr + at, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == splits - 1:
            acc = tl.atomic_xchg(sums_ptr + at, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(arrived_ptr + tile, 0)
            tl.store(out_ptr + at, from_fixed(acc), mask=mask)


def mma_matmul(
    x: torch.Tensor,
    matrix: SimpleNamespace,
    bm: int,
    bn: int,
    bk: int = 64,
    group: int = 128,
    split: int | None = None,
    warps: int = 4,
) -> torch.Tensor:
    """The probe's float16 tensor-core matmul; `split` None: about two programs per SM."""
    (m, k), n = x.shape, matrix.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    groups = triton.cdiv(k, group)
    if split is None:
        programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
        split = max(1, min(programs // tiles, groups // 2))
        split = split if m * n <= SPLIT_SUMS else 1
    out = torch.empty(m, n, device=x.device, dtype=torch.float32)
    sums, arrived = _split_buffers(x.device)
    _mma_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
        x, matrix.blocks, out, sums, arrived, m, n, split, K=k, QTYPE=int(matrix.qtype),
        BM=bm, BN=bn, BK=bk, GROUP=group, SPLIT=split > 1, num_warps=warps,
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
    16, a batch of each one's last `queries` tokens, and the chunks it was built from."""
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
    return q, keys, values, batch, chunks


def retile(batch: ForwardBatch, tile: int) -> ForwardBatch:
    """The batch with the attention kernel's work list cut into tiles of `tile` query tokens."""
    seqs, starts = [], []
    for i in range(batch.num_seqs):
        for row in range(batch.query_starts[i], batch.query_starts[i + 1], tile):
            seqs.append(i)
            starts.append(row)
    device, dtype = batch.tile_seqs.device, batch.tile_seqs.dtype
    return dataclasses.replace(
        batch,
        query_tile=tile,
        tile_seqs=torch.tensor(seqs, device=device, dtype=dtype),
        tile_starts=torch.tensor(starts, device=device, dtype=dtype),
    )


def probe_attention() -> None:
    """First what a decode graph's splits, sized for the longest context, cost. Then per shape,
    time per launch pair (split + merge) by (query tile, warps, keys per inner step), and each
    configuration's largest difference from prefill's (16, 4, 32) (decode steps take (1, 1, 32),
    which for Qwen's groups of 7 is the 16 rows of (2, 1, 32)). Last whether, within one
    configuration, a token's row of a 2,048-token prefill has the bits of the same token
    decoded alone: the guarantee needs this within the configuration used everywhere, not
    agreement with another configuration. (Offline on sm_90, `kernel_resources.py attention`:
    1 warp spills at tiles of 8 or 16 tokens; tiles of 2 at 4 warps and 64 keys a step take
    108 registers.)"""
    generator = torch.Generator(device="cuda").manual_seed(0)
    kept = paged_attention.split_warps, paged_attention.BLOCK_N
    configs = ((16, 4, 32), (2, 1, 32), (2, 2, 64), (2, 4, 32), (2, 4, 64), (2, 4, 128),
               (4, 4, 64))  # fmt: skip
    shapes = ((1, 200, 1), (1, 2048, 1), (1, 16384, 1), (128, 256, 1), (128, 2048, 1))

    def run(q, keys, values, batch, config):
        tile, warps, block_n = config
        paged_attention.split_warps, paged_attention.BLOCK_N = (lambda rows: warps), block_n
        tiled = retile(batch, tile)
        launch = partial(paged_attention_kernel, q, keys, values, tiled, 0.125)
        return launch(), launch

    # A decode graph sizes the splits by the longest context it may meet (16,640 positions
    # here, as compare_llamacpp.sh's --ctx-size): the programs past a row's last split exit
    # at once, but they are many. What do they cost at B=128 over 256 positions?
    q, keys, values, batch, _ = attention_batch(128, 256, 1, generator)
    graph_sized = dataclasses.replace(batch, max_context=16640)
    cells = []
    for config in configs:
        fitted, graphed = (run(q, keys, values, b, config)[1] for b in (batch, graph_sized))
        cells.append(f"{config}: {microseconds(fitted):.1f} against {microseconds(graphed):.1f}")
    print("attention B=128 context=256, splits for 256 against 16,640: " + "; ".join(cells))
    for seqs, context, queries in (*shapes, (1, 2048, 2048), (1, 8192, 2048)):
        q, keys, values, batch, _ = attention_batch(seqs, context, queries, generator)
        results = {}
        for config in configs:
            out, launch = run(q, keys, values, batch, config)
            results[config] = (out, microseconds(launch))
        today = results[16, 4, 32][0]
        cells = [
            f"{t}/{w}/{n}: {us:.1f} us (diff {(out - today).abs().max().item():.0e})"
            for (t, w, n), (out, us) in results.items()
        ]
        print(f"attention B={seqs} context={context} queries={queries}: " + "; ".join(cells))
    q, keys, values, prefill, chunks = attention_batch(1, 2048, 2048, generator)
    for config in configs:
        whole = run(q, keys, values, prefill, config)[0]
        same = []
        for position in (0, 1000, 2047):
            chunk = ScheduledChunk(chunks[0].seq, position, 1, True)
            alone = ForwardBatch.build([chunk], 16, torch.device("cuda"))
            row = run(q[position : position + 1], keys, values, alone, config)[0]
            same.append(torch.equal(row, whole[position : position + 1]))
        print(f"attention {config}: decode rows at 0/1000/2047 have the prefill's bits: {same}")
    paged_attention.split_warps, paged_attention.BLOCK_N = kept


SHAPES = (  # the Qwen2.5-0.5B Q4_K_M matrices: name, type, rows, cols
    ("q Q5_0", T.Q5_0, 896, 896),
    ("v Q8_0", T.Q8_0, 128, 896),
    ("gate Q5_0", T.Q5_0, 4864, 896),
    ("down Q4_K", T.Q4_K, 896, 4864),
    ("down Q6_K", T.Q6_K, 896, 4864),
    ("head Q8_0", T.Q8_0, 151936, 896),
)


def probe_matmuls() -> None:
    """Per real shape: whether a row keeps its bits in the float16 tensor-core matmul across
    tile shapes, K splits and row counts, its error against float16 operands summed in float32,
    and its time against today's integer kernels (GEMV up to 8 rows, `mmq` above)."""
    rng = np.random.default_rng(0)
    for name, qtype, n, k in SHAPES:
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        matrix = SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))
        x = torch.randn(2048 if n < 65536 else 128, k, device="cuda")
        weight = dequantize_rows(blocks, qtype, (n, k)).half().float()
        reference = x[:128].half().float() @ weight.T
        error = (mma_matmul(x[:128], matrix, 32, 64) - reference).abs().max()
        alone = mma_matmul(x[:1], matrix, 16, 64)
        configs = ((16, 64, 64, None), (32, 64, 64, 1), (32, 128, 128, 1), (16, 32, 64, 3))
        same = all(
            torch.equal(mma_matmul(x[:m], matrix, bm, bn, bk, split=s)[:1], alone)
            for bm, bn, bk, s in configs
            for m in (1, 7, 128)
        )
        print(
            f"{name}: error {error / reference.abs().max():.1e} of max; row 0's bits "
            f"across tiles, splits and row counts: {same}",
            flush=True,
        )
        for m in (1, 8, 32, 128, 2048):
            if m > x.shape[0]:
                continue
            xm = x[:m].contiguous()
            ours = microseconds(
                partial(gemv, xm, matrix) if m <= 8 else partial(mmq, xm, [matrix], [None])
            )
            timed = {
                (bm, bn): microseconds(partial(mma_matmul, xm, matrix, bm, bn))
                for bm in (16, 32)
                for bn in (64, 128)
            }
            (bm, bn), best = min(timed.items(), key=lambda item: item[1])
            print(
                f"  M={m:5d}: {'gemv' if m <= 8 else 'mmq'} {ours:8.1f} us, float16 mma "
                f"{best:8.1f} us (BM {bm}, BN {bn}); all: "
                + " ".join(f"{c}:{t:.1f}" for c, t in timed.items()),
                flush=True,
            )


def probe_rows() -> None:
    """Per real shape and 2 to 8 rows: the GEMV over every row (as configured, and with x
    rounded by a launch of its own) against `mmq` (the same bits)."""
    rng = np.random.default_rng(0)
    for name, qtype, n, k in SHAPES:
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        matrix = SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))
        first = dataclasses.replace(gemv_config(qtype, n, k), quantize_first=True)
        cells = []
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, device="cuda")
            gemvs = (microseconds(partial(gemv, x, matrix, config=c)) for c in (None, first))
            mmq_us = microseconds(partial(mmq, x, [matrix], [None]))
            cells.append(
                "M={} gemv {:.1f} quantized first {:.1f} mmq {:.1f}".format(m, *gemvs, mmq_us)
            )
        print(f"{name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    import sys

    {"rows": probe_rows, "matmuls": probe_matmuls, "attention": probe_attention}[sys.argv[1]]()
