"""The step loop: schedule, run, post-process.

Each step the scheduler picks the sequences and token counts (decodes and prefill chunks under
one token budget), the runner computes them in one forward pass and draws a token for each
sequence that reached its end, and the host turns the tokens into text and decides who is done.
Synchronous and single-threaded: the server's `Engine` drives it from its own thread, `LLM`
from the caller's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.output import OutputState
from worker_orcd.engine.scheduler import Scheduler
from worker_orcd.engine.sequence import Sequence
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
        self.runner = ModelRunner(model, model.device, num_blocks, config.block_size)

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
        seq.output.finish("cancelled")
        seq.finished_at = time.perf_counter()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        output = self.scheduler.schedule()
        now = time.perf_counter()
        started = set()
        for chunk in output.chunks:
            if chunk.seq.scheduled_at is None:
                chunk.seq.scheduled_at = now
                started.add(chunk.seq.seq_id)
        tokens = iter(self.runner.run(list(output.chunks)))
        self.scheduler.update(output)
        now = time.perf_counter()
        outputs = []
        for chunk in output.chunks:
            seq = chunk.seq
            text, finished = (
                self._postprocess(seq, next(tokens), now) if chunk.samples else ("", False)
            )
            if chunk.samples or seq.seq_id in started:
                outputs.append(StepOutput(seq, seq.seq_id in started, text, finished))
        return outputs

    def _postprocess(self, seq: Sequence, token: int, now: float) -> tuple[str, bool]:
        """Take the drawn token into the sequence's tokens and text; finish it if it is done."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        output = seq.output
        text = output.push(token)
        if output.stop_reason != "eos":
            seq.append(token)
        reason = output.stop_reason
        if reason is None and seq.num_generated == seq.max_tokens:
            reason = "max_tokens" if seq.max_tokens == seq.params.max_tokens else "context_length"
        if reason is None:
            return text, False
        text += output.finish(reason)
        self.scheduler.finish(seq)
        seq.finished_at = now
        return text, True
