"""One loaded model and its single-sequence generation loop.

The loop is prefill, chunk by chunk, then decode one token at a time; every token goes through
the sampler with the request's own seeded generator, then through the streaming detokenizer and
the stop matcher, so what reaches the caller is whole characters that are never part of a stop
string. The sampler runs on the device, and each decode step is queued behind the token it
reads before the host sees that token (as vLLM's asynchronous scheduling does): the host's work
per token overlaps the GPU's, and a step queued past a stop is discarded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from worker_orcd.engine.memory import check_fits, plan_vram
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.layers.sampler import sample
from worker_orcd.models import load_model
from worker_orcd.sampling_params import SamplingParams, new_seed
from worker_orcd.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MAX_CONTEXT = 8192  # KV cache positions allocated when a model allows more


def resolve_device(name: str, index: int = 0) -> torch.device:
    """`auto` is CUDA when a GPU exists, the CPU otherwise (a development mode, not a fallback).

    A CUDA device gets its context here, so that a GPU that cannot even start one fails now,
    as "CUDA init failed", rather than halfway through loading a model (spec M0-W-1110).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ValueError("CUDA init failed: --device cuda was asked for, but no GPU is available")
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(
            f"CUDA init failed: GPU {index} asked for, "
            f"expected 0 to {torch.cuda.device_count() - 1}"
        )
    device = torch.device("cuda", index)
    try:
        torch.cuda.set_device(device)
        torch.empty(1, device=device)
    except RuntimeError as error:
        raise ValueError(f"CUDA init failed on GPU {index}: {str(error).splitlines()[0]}") from None
    # Prefill's cuBLAS matmuls in tf32 (10-bit mantissa inputs, float32 sums), the precision the
    # Triton GEMM's tl.dot uses; on the tensor cores, at several times float32's speed.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    return device


@dataclass(frozen=True)
class TextChunk:
    index: int  # 0-based count of chunks emitted so far
    text: str  # whole UTF-8 characters, never empty


@dataclass(frozen=True)
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    seed: int
    stop_reason: str  # "eos", "max_tokens", "stop_sequence", "context_length" or "cancelled"
    stop_sequence_matched: str | None
    prefill_seconds: float  # time to the first token
    decode_seconds: float  # time for the tokens after the first

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        if len(self.token_ids) > 1 and self.decode_seconds > 0:
            return (len(self.token_ids) - 1) / self.decode_seconds
        return len(self.token_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class LLM:
    """A loaded model, its tokenizer, and a runner whose KV cache holds `context_length`
    positions: the model's own context, capped at `max_context` (the cache is allocated once)."""

    def __init__(
        self,
        gguf: GGUFFile,
        device: torch.device,
        progress: Callable[[int], None] | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
    ):
        self.gguf = gguf
        self.device = device
        self.tokenizer: Tokenizer = load_tokenizer(gguf.metadata)
        model_context = int(gguf.metadata.get(f"{gguf.architecture}.context_length", max_context))
        self.context_length = min(model_context, max_context)
        before = 0
        if device.type == "cuda":
            check_fits(plan_vram(gguf, self.context_length), device, gguf.path)
            before = torch.cuda.memory_allocated(device)
        self.model = load_model(gguf, device, progress)
        # Device memory the weights take (the KV cache comes after); on the CPU, the file's
        # tensor bytes (the development mode also keeps float32 copies).
        if device.type == "cuda":
            self.weights_bytes = torch.cuda.memory_allocated(device) - before
        else:
            self.weights_bytes = sum(info.nbytes for info in gguf.tensors.values())
        self.runner = ModelRunner(self.model, device, self.context_length)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        progress: Callable[[int], None] | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
    ) -> LLM:
        return cls(GGUFFile(path), resolve_device(device), progress, max_context)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        return Generation(self, prompt_ids, params)


class _Drawn:
    """A sampled token id on its way to the host. The device copy feeds the next step at once;
    the host copy arrives by an asynchronous transfer, and `value()` waits for that alone."""

    def __init__(self, token: torch.Tensor):
        self.token = token
        self._host, self._ready = token, None
        if token.is_cuda:
            self._host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self._host.copy_(token, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def value(self) -> int:
        if self._ready is not None:
            self._ready.synchronize()
        return int(self._host)


class Generation:
    """Iterate for the text chunks as they are decided; `result` is set once iteration ends.

    `cancel()` may be called from any thread: the loop checks it before every model step (a
    decode step or a chunk of the prompt), so a cancelled generation ends within one step with
    stop reason "cancelled".
    """

    def __init__(self, llm: LLM, prompt_ids: list[int], params: SamplingParams):
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        if len(prompt_ids) >= llm.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens: expected fewer than the model's "
                f"context length of {llm.context_length}"
            )
        self.llm = llm
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = params.seed if params.seed is not None else new_seed()
        self.result: GenerationResult | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[TextChunk]:
        llm, params = self.llm, self.params
        budget = min(params.max_tokens, llm.context_length - len(self.prompt_ids))
        generator = torch.Generator(device=llm.device).manual_seed(self.seed)
        detokenizer = llm.tokenizer.detokenizer()
        stops = StopMatcher(params.stop)
        eog = frozenset() if params.ignore_eos else llm.tokenizer.eog_ids
        history = torch.empty(budget, dtype=torch.long, device=llm.device)  # drawn ids
        tokens: list[int] = []
        pieces: list[str] = []
        stop_reason, matched = "max_tokens", None
        start = time.perf_counter()
        first_token_at = start

        def draw(logits: torch.Tensor) -> _Drawn:
            drawn = len(tokens)
            token = sample(logits, history[:drawn], params, generator)
            if params.repetition_penalty != 1.0:
                history[drawn : drawn + 1].copy_(token)
            return _Drawn(token)

        with torch.inference_mode():
            logits = llm.runner.prefill(self.prompt_ids, self._cancelled.is_set)
            drawn = None if logits is None else draw(logits)
            while True:
                if self._cancelled.is_set():
                    stop_reason = "cancelled"
                    break
                # The next step is queued behind the drawn token before the host reads it, so
                # the GPU decodes while the host detokenizes and streams.
                ahead = None
                if len(tokens) + 1 < budget:
                    ahead = llm.runner.decode(drawn.token, len(self.prompt_ids) + len(tokens))
                token = drawn.value()
                if not tokens:
                    first_token_at = time.perf_counter()
                if token in eog:
                    stop_reason = "eos"
                    break
                tokens.append(token)
                text, matched = stops.push(detokenizer.push(token))
                if text:
                    pieces.append(text)
                    yield TextChunk(len(pieces) - 1, text)
                if matched is not None:
                    stop_reason = "stop_sequence"
                    break
                if len(tokens) == budget:
                    stop_reason = "max_tokens" if budget == params.max_tokens else "context_length"
                    break
                drawn = draw(ahead)
        if matched is None and stop_reason != "cancelled":
            text, matched = stops.push(detokenizer.flush())
            text += stops.flush() if matched is None else ""
            if matched is not None:
                stop_reason = "stop_sequence"
            if text:
                pieces.append(text)
                yield TextChunk(len(pieces) - 1, text)
        end = time.perf_counter()
        self.result = GenerationResult(
            prompt_token_ids=self.prompt_ids,
            token_ids=tokens,
            text="".join(pieces),
            seed=self.seed,
            stop_reason=stop_reason,
            stop_sequence_matched=matched,
            prefill_seconds=first_token_at - start,
            decode_seconds=end - first_token_at,
        )
