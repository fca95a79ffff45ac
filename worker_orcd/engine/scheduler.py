"""Which sequences run in the next step, and how many of their tokens.

Continuous batching under one token budget per step, as vLLM's scheduler does: running sequences
first, in the order they were admitted (a decode costs one token, a prompt being prefilled costs
its next chunk), then waiting ones, first come first served, while budget, sequence slots and KV
blocks last. A waiting sequence starts from its longest cached prefix. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: it lets go of
its blocks and goes back to the head of the queue, to be recomputed (its full blocks usually
still sit in the prefix cache). No torch: the engine runs what this decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens `start` to `start + num_tokens` of `seq` are computed this step; when they reach
    its last known token (`samples`), the step draws its next one."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int):
        self.config = config
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order admitted
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache, all told
        # Sequences allowed to run at once: max_num_seqs, or fewer after a step ran out of
        # device memory, until the running set empties.
        self.max_running = config.max_num_seqs

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Decide the next step and count its tokens as computed (the caller runs it)."""
        if not self.running:
            self.max_running = self.config.max_num_seqs
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        manager = self.block_manager

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.num_generated == seq.max_tokens:  # its last token is drawn, not yet read
                index += 1
                continue
            num_tokens = min(seq.num_uncomputed, budget)
            end = seq.num_computed_tokens + num_tokens
            while not manager.can_allocate(seq, end) and seq in self.running:
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the last one and had to go itself
            manager.allocate(seq, end)
            chunks.append(self._take(seq, num_tokens))
            budget -= num_tokens
            index += 1

        while (
            self.waiting
            and budget > 0
            and not preempted  # memory is short: let the running ones finish first
            and len(self.running) < self.max_running
        ):
            seq = self.waiting[0]
            prefix = manager.match_prefix(seq.token_ids)
            cached = len(prefix) * self.config.block_size
            num_tokens = min(seq.num_tokens - cached, budget)
            if not manager.can_allocate(seq, cached + num_tokens, prefix):
                break
            manager.allocate(seq, cached + num_tokens, prefix)
            self.num_cached_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._take(seq, num_tokens))
            budget -= num_tokens
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def update(self, output: SchedulerOutput) -> None:
        """Once the step's tokens are read: the blocks its chunks filled become prefix-cache
        entries (a sequence preempted or finished since holds none)."""
        for chunk in output.chunks:
            if chunk.seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_blocks(chunk.seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence, waiting or running (finished, cancelled or failed); free its
        blocks."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _take(self, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_tokens
        return ScheduledChunk(seq, start, num_tokens, samples=seq.num_uncomputed == 0)

    def cap_running(self, limit: int) -> None:
        """Admit no sequence while `limit` or more run (lifted once none runs)."""
        self.max_running = min(self.max_running, limit)

    def preempt(self, seq: Sequence) -> None:
        """Send a running sequence back to the head of the queue, its blocks freed: it is
        computed again from its longest cached prefix."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
