"""The scheduler with no model: budgets, FIFO admission, chunked prefill, preemption, and a
simulated KV pool that proves no sequence ever reads a slot someone else wrote."""

from __future__ import annotations

import random

import pytest

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.scheduler import Scheduler, SchedulerOutput
from worker_orcd.engine.sequence import Sequence, SequenceStatus
from worker_orcd.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, **overrides) -> Scheduler:
    config = EngineConfig(max_model_len=4096, block_size=block_size, **overrides)
    return Scheduler(config, num_blocks)


def seq(n: int, max_tokens: int = 4, first: int = 0) -> Sequence:
    return Sequence(list(range(first, first + n)), SamplingParams(max_tokens=max_tokens))


def shape(output: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start, c.num_tokens, c.samples) for c in output.chunks]


class FakeModel:
    """Writes each token into its KV slot and checks that every read position holds the
    sequence's own token; the next token is a function of all tokens before it, so a
    sequence's output shows whether anything it read was wrong."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        size = scheduler.config.block_size
        self.pool: list[int | None] = [None] * (scheduler.block_manager.num_blocks * size)

    def slot(self, seq: Sequence, position: int) -> int:
        size = self.scheduler.config.block_size
        return seq.block_table[position // size] * size + position % size

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        for chunk in output.chunks:
            s = chunk.seq
            for position in range(chunk.start, chunk.start + chunk.num_tokens):
                self.pool[self.slot(s, position)] = s.token_ids[position]
        for chunk in output.chunks:  # attention reads after every write of the step
            s = chunk.seq
            end = chunk.start + chunk.num_tokens
            assert [self.pool[self.slot(s, p)] for p in range(end)] == s.token_ids[:end], s
        self.scheduler.update(output)
        for chunk in output.chunks:
            if chunk.samples:
                s = chunk.seq
                s.append(next_token(s.token_ids))
                if s.num_generated == s.params.max_tokens:
                    self.scheduler.finish(s)
        return output


def next_token(tokens: list[int]) -> int:
    return hash(tuple(tokens)) % 1000


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget():
    scheduler = make(max_num_batched_tokens=8)
    a = seq(20)
    scheduler.add(a)
    model = FakeModel(scheduler)
    assert [shape(model.step()) for _ in range(3)] == [
        [(a.seq_id, 0, 8, False)],
        [(a.seq_id, 8, 8, False)],
        [(a.seq_id, 16, 4, True)],
    ]
    assert shape(model.step()) == [(a.seq_id, 20, 1, True)]  # then one token per step


def test_decodes_and_a_prefill_chunk_share_a_step_first_come_first_served():
    scheduler = make(max_num_batched_tokens=6)
    model = FakeModel(scheduler)
    a, b, c = seq(3, max_tokens=8), seq(10), seq(2)
    scheduler.add(a)
    model.step()
    scheduler.add(b)
    scheduler.add(c)
    # a decodes (1 token), b takes the rest of the budget; c waits behind b
    assert shape(model.step()) == [(a.seq_id, 3, 1, True), (b.seq_id, 0, 5, False)]
    assert shape(model.step()) == [
        (a.seq_id, 4, 1, True),
        (b.seq_id, 5, 5, True),
    ]
    assert shape(model.step()) == [
        (a.seq_id, 5, 1, True),
        (b.seq_id, 10, 1, True),
        (c.seq_id, 0, 2, True),
    ]


def test_running_sequences_are_capped():
    scheduler = make(max_num_seqs=2)
    model = FakeModel(scheduler)
    for n in (3, 3, 3):
        scheduler.add(seq(n))
    model.step()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1


def test_a_full_pool_preempts_the_newest_and_recomputes_it_later():
    scheduler = make(num_blocks=6, block_size=4, enable_prefix_caching=False)
    model = FakeModel(scheduler)
    a, b = seq(7, max_tokens=10), seq(7, max_tokens=10, first=50)
    scheduler.add(a)
    scheduler.add(b)
    model.step()  # two blocks each
    while not scheduler.num_preemptions:
        output = model.step()
    assert output.preempted == (b,) and b.status is SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_generated > 0
    assert scheduler.waiting[0] is b
    while scheduler.has_unfinished():
        model.step()
    # b's recompute prefilled its prompt and the tokens it had drawn, then went on
    assert b.generated_ids == expected_output(list(range(50, 57)), 10)
    assert a.generated_ids == expected_output(list(range(7)), 10)


def test_a_waiting_sequence_starts_from_its_cached_prefix():
    scheduler = make(block_size=4)
    model = FakeModel(scheduler)
    a = seq(10, max_tokens=1)
    scheduler.add(a)
    model.step()
    b = Sequence([*range(10), 77], SamplingParams(max_tokens=1))
    scheduler.add(b)
    assert shape(model.step()) == [(b.seq_id, 8, 3, True)]
    assert b.num_cached_tokens == 8


def test_finish_frees_waiting_and_running_sequences():
    scheduler = make(num_blocks=8, max_num_seqs=1)
    model = FakeModel(scheduler)
    a, b = seq(9), seq(5)
    scheduler.add(a)
    scheduler.add(b)
    model.step()
    scheduler.finish(b)  # still waiting
    scheduler.finish(a)  # running
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 8


@pytest.mark.parametrize("seed", range(6))
def test_random_load_on_a_small_pool_loses_nothing_and_changes_no_output(seed):
    rng = random.Random(seed)
    scheduler = make(
        num_blocks=rng.randint(12, 24),
        block_size=4,
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.randint(6, 40),
    )
    model = FakeModel(scheduler)
    prefixes = [list(range(1000 + 10 * i, 1000 + 10 * i + 8)) for i in range(3)]
    sequences, cancelled = [], set()
    for step in range(400):
        if step < 60 and rng.random() < 0.5:  # arrivals, some sharing a prefix
            prompt = rng.choice(prefixes)[: rng.randint(0, 8)]
            prompt += [rng.randrange(900) for _ in range(rng.randint(1, 12))]
            s = Sequence(prompt, SamplingParams(max_tokens=rng.randint(1, 12)))
            sequences.append(s)
            scheduler.add(s)
        if sequences and rng.random() < 0.05:  # a cancel, waiting or running
            s = rng.choice(sequences)
            if s.status is not SequenceStatus.FINISHED:
                scheduler.finish(s)
                cancelled.add(s.seq_id)
        if scheduler.has_unfinished():
            output = model.step()
            assert output.num_tokens <= scheduler.config.max_num_batched_tokens
            assert len(scheduler.running) <= scheduler.config.max_num_seqs
            held = [b for s in scheduler.running for b in s.block_table]
            manager = scheduler.block_manager
            assert all(manager.ref_counts[b] == held.count(b) for b in set(held))
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    for s in sequences:
        if s.seq_id not in cancelled:
            prompt = s.token_ids[: s.num_prompt_tokens]
            assert s.generated_ids == expected_output(prompt, s.params.max_tokens)
