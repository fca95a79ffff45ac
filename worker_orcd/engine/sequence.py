"""One request as the scheduler sees it: its tokens, how many of them the KV cache holds, and the
blocks that hold them. No torch, so that scheduling is tested without a model."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto
from typing import TYPE_CHECKING

from worker_orcd.sampling_params import SamplingParams

if TYPE_CHECKING:
    from worker_orcd.engine.output import OutputState

_next_id = itertools.count()
PLACEHOLDER = -1  # a drawn token the host has not read yet (the device still computes it)


class SequenceStatus(Enum):
    WAITING = auto()  # queued, or preempted: holds no blocks
    RUNNING = auto()  # holds blocks for its computed tokens
    FINISHED = auto()


class Sequence:
    """`token_ids` is the prompt then the generated tokens. A step computes the KV of tokens
    `num_computed_tokens` onwards; the step that computes the last known token samples the next.
    A preempted sequence keeps its tokens and starts over from a prefix-cache lookup, so
    recomputing it prefills prompt and generated tokens alike."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int = 0,
        output: OutputState | None = None,
    ):
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        self.seq_id = next(_next_id)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = seed  # token i is drawn from the random stream (seed, i)
        self.output = output  # the engine's text state, absent in scheduling tests
        self.max_tokens = params.max_tokens  # the engine caps it to the context
        self.arrived_at = time.perf_counter()
        self.scheduled_at: float | None = None  # first scheduled: the end of its queue time
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens the prefix cache supplied at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full blocks cached
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_placeholders(self) -> None:
        """Forget tokens never read (its step failed, or it ended before they were)."""
        while self.token_ids[-1] == PLACEHOLDER:
            self.token_ids.pop()
