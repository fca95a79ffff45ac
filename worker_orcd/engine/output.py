"""The host's side of a sequence: its tokens as whole characters, held back where a stop string
may begin, and why it ends. No torch: it runs while the device computes the next step."""

from __future__ import annotations

from dataclasses import dataclass

from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.sampling_params import SamplingParams
from worker_orcd.tokenizer import Tokenizer


class OutputState:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.detokenizer = tokenizer.detokenizer()
        self.stops = StopMatcher(params.stop)
        self.eog = frozenset() if params.ignore_eos else tokenizer.eog_ids
        self.pieces: list[str] = []  # the text emitted so far, chunk by chunk
        self.stop_reason: str | None = None  # set once the text decides the end
        self.stop_matched: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int) -> str:
        """The new text a drawn token makes safe to emit, possibly ""; an end-of-generation
        token or a stop string sets `stop_reason`."""
        if token in self.eog:
            self.stop_reason = "eos"
            return ""
        text, self.stop_matched = self.stops.push(self.detokenizer.push(token))
        if self.stop_matched is not None:
            self.stop_reason = "stop_sequence"
        return self._emit(text)

    def finish(self, reason: str) -> str:
        """The text held back until the end (none after a stop string or a cancel); the stop
        reason is `reason` unless that text turns out to hold a stop string."""
        text = ""
        if self.stop_matched is None and reason != "cancelled":
            text, self.stop_matched = self.stops.push(self.detokenizer.flush())
            if self.stop_matched is None:
                text += self.stops.flush()
        self.stop_reason = "stop_sequence" if self.stop_matched is not None else reason
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text


@dataclass(frozen=True)
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    seed: int
    stop_reason: str  # "eos", "max_tokens", "stop_sequence", "context_length" or "cancelled"
    stop_sequence_matched: str | None
    queue_seconds: float  # from accepted to its first step
    prefill_seconds: float  # from its first step to its first token
    decode_seconds: float  # for the tokens after the first
    cached_tokens: int  # prompt tokens the prefix cache supplied

    @classmethod
    def of(cls, seq: Sequence) -> GenerationResult:
        """The result of a finished sequence."""
        output = seq.output
        assert output is not None and output.stop_reason is not None, "not finished"
        started = seq.scheduled_at or seq.arrived_at
        first = seq.first_token_at or started
        return cls(
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.generated_ids,
            text=output.text,
            seed=seq.seed,
            stop_reason=output.stop_reason,
            stop_sequence_matched=output.stop_matched,
            queue_seconds=started - seq.arrived_at,
            prefill_seconds=first - started,
            decode_seconds=(seq.finished_at or first) - first,
            cached_tokens=seq.num_cached_tokens,
        )

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        if len(self.token_ids) > 1 and self.decode_seconds > 0:
            return (len(self.token_ids) - 1) / self.decode_seconds
        return len(self.token_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
