"""A step's batch padded to a CUDA graph's fixed sizes (no model, no GPU): the graph's every
buffer is filled exactly, the real rows keep their values, and padding writes only the spare
block and attends only to an empty sequence or to itself."""

from __future__ import annotations

import random

import pytest

from worker_orcd.engine.cuda_graph import GraphShape
from worker_orcd.engine.forward_batch import FIELDS, HostBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.sampling_params import SamplingParams

BLOCK, SPARE = 16, 999


def random_step(rng: random.Random, max_tokens: int, max_seqs: int, decode: bool):
    """Chunks of up to `max_tokens` tokens in all over up to `max_seqs` sequences."""
    chunks, tokens, next_block = [], 0, 0
    while len(chunks) < max_seqs and tokens < max_tokens:
        count = 1 if decode else rng.randint(1, min(40, max_tokens - tokens))
        start = rng.randint(0, 300)
        seq = Sequence(list(range(start + count)), SamplingParams())
        blocks = -(-(start + count) // BLOCK)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        chunks.append(ScheduledChunk(seq, start, count, samples=decode or rng.random() < 0.5))
        tokens += count
    return chunks


@pytest.mark.parametrize("decode", [False, True])
def test_padding_fills_the_graph_exactly_and_touches_only_the_spare_block(decode):
    rng = random.Random(0)
    for _ in range(200):
        max_seqs = rng.choice([1, 3, 8, 64])
        if decode:
            shape = GraphShape.for_decode(max_seqs)
            chunks = random_step(rng, max_seqs, max_seqs, decode=True)
        else:
            shape = GraphShape.for_mixed(rng.choice([16, 64, 256]), max_seqs)
            chunks = random_step(rng, shape.num_tokens, max_seqs, decode=False)
        host = HostBatch.of(chunks, BLOCK)
        real = {name: list(getattr(host, name)) for name in FIELDS}
        real_tables = [list(table) for table in host.tables]
        shape.pad(host, SPARE, BLOCK)

        assert len(host.input_ids) == shape.num_tokens
        assert len(host.context_lens) == len(host.tables) == shape.num_seqs
        assert len(host.tile_seqs) == len(host.tile_starts) == shape.num_tiles
        assert len(host.logits_indices) == shape.num_seqs
        for name in FIELDS:  # the real rows first, unchanged
            assert getattr(host, name)[: len(real[name])] == real[name]
        assert host.tables[: len(real_tables)] == real_tables
        padding = len(real["input_ids"])
        assert all(s // BLOCK == SPARE for s in host.slot_mapping[padding:])
        assert all(set(table) <= {SPARE} for table in host.tables[len(real_tables) :])
        for seq, start in zip(host.tile_seqs, host.tile_starts, strict=True):
            # every tile lies within its sequence, or belongs to an empty one
            first, end = host.query_starts[seq], host.query_starts[seq + 1]
            assert first <= start < end or host.context_lens[seq] == 0
