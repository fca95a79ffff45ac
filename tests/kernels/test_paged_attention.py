"""The paged attention kernel against its torch reference, through Triton's interpreter on the
CPU: prefill chunks over cached prefixes, decode tokens, contexts over several KV splits, GQA
groups that are not powers of two, a head size that is not one either; and batch invariance,
bit for bit, also as compiled for Hopper. The kernel's float16 operands (flash attention's) keep
it within 2e-3 of the float32 reference on unit-scale values."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.cuda_graph import GraphShape
from worker_orcd.engine.forward_batch import ForwardBatch, HostBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.kernels import paged_attention as kernel_module
from worker_orcd.kernels.paged_attention import paged_attention_kernel
from worker_orcd.layers.attention import paged_attention
from worker_orcd.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BLOCK = 16


def scene(heads, kv_heads, dim, spans, seed=0, graph: GraphShape | None = None):
    """A shuffled pool holding each sequence's keys up to its span's end, and the q rows; with
    `graph`, the batch padded to that CUDA graph's sizes as the runner pads a step (its padding
    rows' q last, in a block of their own)."""
    generator = torch.Generator().manual_seed(seed)
    pool_blocks = 384
    keys = torch.randn(pool_blocks * BLOCK, kv_heads, dim, generator=generator).half()
    values = torch.randn(pool_blocks * BLOCK, kv_heads, dim, generator=generator).half()
    free = list(range(pool_blocks))
    random.Random(seed).shuffle(free)
    chunks = []
    for start, count in spans:
        seq = Sequence(list(range(start + count)), SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-(start + count) // BLOCK))]
        chunks.append(ScheduledChunk(seq, start, count, True))
    if graph is None:
        batch = ForwardBatch.build(chunks, BLOCK, torch.device(DEVICE))
    else:
        host = HostBatch.of(chunks, BLOCK)
        graph.pad(host, free.pop(), BLOCK)
        width = host.table_width
        fields, tables, _ = host.unpack(host.packed(width).to(DEVICE), width)
        graph_context = 1024  # a graph sizes its splits by the longest context
        batch = ForwardBatch.view(fields, tables, host, BLOCK, graph_context, graph.query_tile)
    q = torch.randn(sum(c for _, c in spans), heads, dim, generator=generator)
    padding = torch.randn(batch.input_ids.numel() - len(q), heads, dim, generator=generator)
    return torch.cat([q, padding]).to(DEVICE), keys.to(DEVICE), values.to(DEVICE), batch


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 16), (7, 1, 16), (4, 4, 24)])
def test_the_kernel_matches_the_reference(heads, kv_heads, dim):
    # (cached positions, new tokens): one split, then across split boundaries, then a decode
    # token over more splits than a merge loads at once
    spans = [(0, 21), (40, 1), (3, 17), (70, 2), (300, 5), (500, 40), (4400, 1)]
    q, keys, values, batch = scene(heads, kv_heads, dim, spans)
    expected = paged_attention(q.cpu(), keys.cpu(), values.cpu(), _on_cpu(batch), dim**-0.5)
    out = paged_attention_kernel(q, keys, values, batch, dim**-0.5)
    torch.testing.assert_close(out.cpu(), expected, atol=2e-3, rtol=0)


def test_a_launch_leaves_its_arrival_counters_at_zero():
    # a CUDA graph replays launches over the same counters: each must find them at zero
    spans = [(500, 40), (0, 21), (520, 1), (260, 3)]
    q, keys, values, batch = scene(6, 2, 16, spans, seed=5)
    first = paged_attention_kernel(q, keys, values, batch, 0.25)
    assert not kernel_module._arrival_counters(q.device).any()
    assert torch.equal(paged_attention_kernel(q, keys, values, batch, 0.25), first)


@pytest.mark.parametrize(
    ("spans", "graph"),
    [
        ([(0, 21), (40, 1), (300, 5), (500, 40)], GraphShape.for_mixed(128, max_num_seqs=8)),
        ([(40, 1), (300, 1), (3, 1)], GraphShape.for_decode(4)),
    ],
)
def test_padding_a_step_to_a_graphs_sizes_changes_no_row(spans, graph):
    q, keys, values, batch = scene(6, 2, 16, spans, seed=7)
    alone = paged_attention_kernel(q, keys, values, batch, 0.25)
    q, keys, values, padded = scene(6, 2, 16, spans, seed=7, graph=graph)
    assert padded.input_ids.numel() == graph.num_tokens
    assert padded.tile_seqs.numel() == graph.num_tiles
    out = paged_attention_kernel(q, keys, values, padded, 0.25)
    assert torch.equal(out[: len(alone)], alone)
    assert not kernel_module._arrival_counters(q.device).any()


def test_a_row_is_the_same_alone_and_in_any_tile():
    spans = [(0, 300)]
    q, keys, values, batch = scene(6, 2, 16, spans, seed=3)
    whole = paged_attention_kernel(q, keys, values, batch, 0.25)
    # the same sequence as decode tokens at positions 30 and 290, and as chunks 20..36 and
    # 250..290 (across the split at 256)
    seq = batch_seq(batch, spans)
    for start, count in [(30, 1), (290, 1), (20, 17), (250, 41)]:
        part = ForwardBatch.build([ScheduledChunk(seq, start, count, True)], BLOCK, q.device)
        out = paged_attention_kernel(q[start : start + count], keys, values, part, 0.25)
        assert torch.equal(out, whole[start : start + count])


def test_decode_and_prefill_tiles_sum_a_row_in_one_order_on_hopper():
    # A decode step's one-token tiles and prefill's 16-token ones compile to other tensor-core
    # instructions (mma.sync at 1 warp, wgmma at 4), so a row's bits agree only if its scores
    # lie alike among threads, and so are summed in one order. bench/kernel_resources.py
    # compiles the split kernel for sm_90 (no GPU needed; outside the interpreter, hence a
    # process of its own) and reads the layouts; that both instructions round alike, the GPU
    # run of the test above checks.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[2] / "bench" / "kernel_resources.py"
    run = subprocess.run(
        [sys.executable, str(script), "layouts"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    for group, steps in json.loads(run.stdout).items():
        assert steps["decode"] == steps["prefill"], f"GQA groups of {group}"


def batch_seq(batch: ForwardBatch, spans) -> Sequence:
    seq = Sequence(list(range(sum(spans[0]))), SamplingParams())
    seq.block_table = batch.tables[0]
    return seq


def _on_cpu(batch: ForwardBatch) -> ForwardBatch:
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return ForwardBatch(**fields)
