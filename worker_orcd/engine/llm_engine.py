"""The step loop: schedule, run, post-process.

Each step the scheduler picks the sequences and token counts (decodes and prefill chunks under
one token budget), the runner computes them in one forward pass and draws a token for each
sequence that reached its end, and the host turns the tokens into text and decides who is done.
The host works one step behind the device: step t is queued before step t-1's tokens are read,
so the device computes t while the host post-processes t-1 (a token not yet read is a
`PLACEHOLDER`, which step t reads on the device). A sequence that ends at t-1 thus computes one
step too many, whose result is dropped. Single-threaded: the server's `Engine` drives it from
its own thread, `LLM` from the caller's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.model_runner import ModelRunner, StepTokens
from worker_orcd.engine.output import OutputState
from worker_orcd.engine.scheduler import Scheduler, SchedulerOutput
from worker_orcd.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from worker_orcd.sampling_params import SamplingParams, new_seed
from worker_orcd.tokenizer import Tokenizer


@dataclass(frozen=True)
class StepOutput:
    seq: Sequence
    started: bool  # this was its first step
    text: str  # the text the step decided, possibly ""
    finished: bool


class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: EngineConfig,
        num_blocks: int,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config, num_blocks)
        self.runner = ModelRunner(model, config, num_blocks)
        # The step queued on the device and not yet read, and its tokens.
        self._in_flight: tuple[SchedulerOutput, StepTokens] | None = None

    @property
    def max_tokens_in_pool(self) -> int:
        return self.num_blocks * self.config.block_size

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError when a request can never run (the caller's input is wrong); reads only
        the configuration, so any thread may call it."""
        limit = self.config.max_model_len
        if not 0 < len(prompt_ids) < limit:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens: expected 1 to {limit - 1} "
                f"(the model's context length)"
            )
        total = len(prompt_ids) + self._max_tokens(prompt_ids, params)
        if total > self.max_tokens_in_pool:
            raise ValueError(
                f"the prompt's {len(prompt_ids)} tokens plus max_tokens can never fit the KV "
                f"cache: expected at most {self.max_tokens_in_pool} tokens in all, got {total}"
            )

    def _max_tokens(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """What a request may generate: its max_tokens, or what the context has room for."""
        return min(params.max_tokens, self.config.max_model_len - len(prompt_ids))

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request that `check` accepts."""
        self.check(prompt_ids, params)
        seed = params.seed if params.seed is not None else new_seed()
        seq = Sequence(prompt_ids, params, seed, OutputState(self.tokenizer, params))
        seq.max_tokens = self._max_tokens(prompt_ids, params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """End a sequence, waiting or running, and free its blocks."""
        self.scheduler.finish(seq)
        seq.drop_placeholders()
        seq.output.finish("cancelled")
        seq.finished_at = time.perf_counter()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[StepOutput]:
        """Queue the next step, then read the previous one's tokens while the device runs.
        A sequence's first step reports it started at once; its tokens come a step later."""
        outputs = []
        if self._in_flight and self._reads_history():
            outputs = self._read(*self._in_flight)
            self._in_flight = None
        scheduled = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        try:
            if scheduled.chunks:
                started = self._start(scheduled)
                self._in_flight = (scheduled, self.runner.launch(list(scheduled.chunks)))
                for chunk in scheduled.chunks:
                    if chunk.samples:
                        chunk.seq.append(PLACEHOLDER)
                outputs += [StepOutput(seq, True, "", False) for seq in started]
            if previous:
                outputs += self._read(*previous)
        except Exception as error:
            self._in_flight = None
            self._roll_back([scheduled] + ([previous[0]] if previous else []))
            if isinstance(error, torch.OutOfMemoryError) and self._make_room():
                return outputs
            raise
        return outputs

    @staticmethod
    def _roll_back(steps: list[SchedulerOutput]) -> None:
        """Forget steps that failed or were never read: their sequences compute those tokens
        again (the same tokens: the draws depend on nothing that changed)."""
        for step in steps:
            for chunk in step.chunks:
                chunk.seq.drop_placeholders()
                chunk.seq.num_computed_tokens = min(chunk.seq.num_computed_tokens, chunk.start)

    def _make_room(self) -> bool:
        """After a step ran out of device memory: preempt the newest running sequence and
        admit no more than now run, so that the next steps are smaller. False when one
        sequence runs alone: it can never fit."""
        if len(self.scheduler.running) <= 1:
            return False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step allocated
        self.scheduler.preempt(self.scheduler.running[-1])
        self.scheduler.cap_running(len(self.scheduler.running))
        return True

    def _reads_history(self) -> bool:
        """A repetition penalty reads a sequence's tokens on the host: none may be unread."""
        return any(seq.params.repetition_penalty != 1.0 for seq in self.scheduler.running)

    @staticmethod
    def _start(scheduled: SchedulerOutput) -> list[Sequence]:
        """The sequences this step runs for the first time."""
        now = time.perf_counter()
        started = [chunk.seq for chunk in scheduled.chunks if chunk.seq.scheduled_at is None]
        for seq in started:
            seq.scheduled_at = now
        return started

    def _read(self, scheduled: SchedulerOutput, step_tokens: StepTokens) -> list[StepOutput]:
        tokens = iter(step_tokens.tolist())
        now = time.perf_counter()
        outputs = []
        for chunk in scheduled.chunks:
            seq = chunk.seq
            token = next(tokens) if chunk.samples else None
            if seq.status is SequenceStatus.FINISHED:
                continue  # it ended (or was cancelled) while this step ran
            if token is not None:
                text, finished = self._postprocess(seq, chunk.start + chunk.num_tokens, token, now)
                outputs.append(StepOutput(seq, False, text, finished))
        self.scheduler.update(scheduled)
        return outputs

    def _postprocess(self, seq: Sequence, index: int, token: int, now: float) -> tuple[str, bool]:
        """Take the drawn token, its sequence's `index`-th, into its tokens and text; finish
        the sequence if it is done."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.token_ids[index] = token
        output = seq.output
        text = output.push(token)
        reason = output.stop_reason
        if reason is None and index + 1 - seq.num_prompt_tokens == seq.max_tokens:
            reason = "max_tokens" if seq.max_tokens == seq.params.max_tokens else "context_length"
        if reason is None:
            return text, False
        del seq.token_ids[index if reason == "eos" else index + 1 :]
        text += output.finish(reason)
        self.scheduler.finish(seq)
        seq.finished_at = now
        return text, True
