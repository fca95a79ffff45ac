"""Paged attention against torch's SDPA on a contiguous cache, and its batch invariance: a
query's output is the same, bit for bit, whatever else shares its step and however its
prompt was chunked."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.layers.attention import KV_SPLIT, KVCache, paged_attention
from worker_orcd.sampling_params import SamplingParams

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 16
LAYERS = 1


class World:
    """Sequences of random q/k/v per position, scattered over a shuffled block pool."""

    def __init__(self, lengths: list[int], num_blocks: int = 256, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        cpu = torch.device("cpu")  # in float16, as on a GPU
        self.cache = KVCache(LAYERS, num_blocks, BLOCK, KV_HEADS, DIM, cpu, torch.float16)
        free = list(range(num_blocks))
        random.Random(seed).shuffle(free)
        self.seqs, self.q, self.k, self.v = [], [], [], []
        for n in lengths:
            seq = Sequence(list(range(n)), SamplingParams())
            seq.block_table = [free.pop() for _ in range(-(-n // BLOCK))]
            self.seqs.append(seq)
            self.q.append(torch.randn(n, HEADS, DIM, generator=generator))
            # keys and values as float16 stores them, so the reference sees the same numbers
            self.k.append(torch.randn(n, KV_HEADS, DIM, generator=generator).half().float())
            self.v.append(torch.randn(n, KV_HEADS, DIM, generator=generator).half().float())

    def run(self, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One step over (sequence, start, count) spans: writes their k/v, returns each span's
        attention output."""
        chunks = [ScheduledChunk(self.seqs[i], s, n, False) for i, s, n in spans]
        batch = ForwardBatch.build(chunks, BLOCK, torch.device("cpu"))
        q = torch.cat([self.q[i][s : s + n] for i, s, n in spans])
        k = torch.cat([self.k[i][s : s + n] for i, s, n in spans])
        v = torch.cat([self.v[i][s : s + n] for i, s, n in spans])
        keys, values = self.cache.keys[0], self.cache.values[0]
        keys.index_copy_(0, batch.slot_mapping, k.half())
        values.index_copy_(0, batch.slot_mapping, v.half())
        out = paged_attention(q, keys, values, batch, DIM**-0.5)
        return list(out.split([n for _, _, n in spans]))

    def reference(self, i: int) -> torch.Tensor:
        k = self.k[i].repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = self.v[i].repeat_interleave(HEADS // KV_HEADS, dim=1)
        out = F.scaled_dot_product_attention(
            self.q[i].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        return out.transpose(0, 1)


def test_prefill_then_decode_match_causal_attention():
    lengths = [5, 40, KV_SPLIT + 37, 2 * KV_SPLIT]
    world = World(lengths)
    prompts = [n - 3 for n in lengths]
    outputs = world.run([(i, 0, p) for i, p in enumerate(prompts)])
    for step in range(3):  # three decode steps for every sequence at once
        decoded = world.run([(i, p + step, 1) for i, p in enumerate(prompts)])
        outputs = [torch.cat([o, d]) for o, d in zip(outputs, decoded, strict=True)]
    for i in range(len(lengths)):
        torch.testing.assert_close(outputs[i], world.reference(i), atol=2e-5, rtol=1e-4)


def test_chunking_and_company_change_no_bit():
    n = 2 * KV_SPLIT + 50
    alone = World([n, 300, 7], seed=1)
    whole = torch.cat(alone.run([(0, 0, n)]))
    chunked = World([n, 300, 7], seed=1)  # same data, new cache
    parts = []
    for start, count in [(0, 17), (17, 256), (273, 1), (274, 200), (474, n - 474)]:
        spans = [(0, start, count)]
        if start == 17:
            spans = [(1, 0, 300), *spans, (2, 0, 7)]  # neighbours on both sides
        parts.append(chunked.run(spans)[1 if start == 17 else 0])
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("company", [0, 1, 13])
def test_a_decode_token_is_the_same_alone_and_batched(company):
    lengths = [KV_SPLIT + 20] + [30 + 7 * j for j in range(company)]
    world = World(lengths, seed=2)
    world.run([(i, 0, n - 1) for i, n in enumerate(lengths)])
    batched = world.run([(i, n - 1, 1) for i, n in enumerate(lengths)])[0]
    alone = World(lengths[:1], seed=2)
    alone.run([(0, 0, lengths[0] - 1)])
    assert torch.equal(alone.run([(0, lengths[0] - 1, 1)])[0], batched)
