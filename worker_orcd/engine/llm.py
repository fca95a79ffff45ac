"""One loaded model and the engine over it, for offline use: `generate` runs a batch of prompts,
`stream` one prompt whose text arrives as it is decided. Both drive the same step loop the
server's `Engine` drives from its thread; a request's tokens are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from worker_orcd.engine.config import STEP_TOKENS, EngineConfig
from worker_orcd.engine.llm_engine import LLMEngine
from worker_orcd.engine.memory import check_fits, kv_pool_blocks, plan_vram
from worker_orcd.engine.output import GenerationResult
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.models import load_model
from worker_orcd.sampling_params import SamplingParams
from worker_orcd.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MAX_CONTEXT = 8192  # positions a sequence may reach when a model allows more


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


class LLM:
    """A loaded model, its tokenizer, and an engine whose sequences reach `context_length`
    positions: the model's own context, capped at `max_context`. `engine_options` are
    `EngineConfig` fields (max_num_seqs, max_num_batched_tokens, num_kv_blocks, ...)."""

    def __init__(
        self,
        gguf: GGUFFile,
        device: torch.device,
        progress: Callable[[int], None] | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
        **engine_options,
    ):
        self.gguf = gguf
        self.device = device
        self.tokenizer: Tokenizer = load_tokenizer(gguf.metadata)
        model_context = int(gguf.metadata.get(f"{gguf.architecture}.context_length", max_context))
        self.context_length = min(model_context, max_context)
        engine_options.setdefault("max_num_batched_tokens", STEP_TOKENS[device.type])
        self.config = EngineConfig(max_model_len=self.context_length, **engine_options)
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
        num_blocks = self.config.num_kv_blocks or kv_pool_blocks(self.model, self.config)
        self.engine = LLMEngine(self.model, self.tokenizer, self.config, num_blocks)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        progress: Callable[[int], None] | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
        **engine_options,
    ) -> LLM:
        return cls(GGUFFile(path), resolve_device(device), progress, max_context, **engine_options)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run every prompt to its end, batched; results in the prompts' order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        seqs = [self.engine.add(p, q) for p, q in zip(prompts, params, strict=True)]
        while self.engine.has_unfinished():
            self.engine.step()
        return [GenerationResult.of(seq) for seq in seqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        return Generation(self.engine, prompt_ids, params)


class Generation:
    """Iterate for the text chunks as they are decided; `result` is set once iteration ends.
    Steps the engine until this request is done (others queued beside it advance too)."""

    def __init__(self, engine: LLMEngine, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.seq = engine.add(prompt_ids, params)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TextChunk]:
        done, index = False, 0
        while not done:
            for output in self.engine.step():
                if output.seq is not self.seq:
                    continue
                if output.text:
                    yield TextChunk(index, output.text)
                    index += 1
                done = output.finished
        self.result = GenerationResult.of(self.seq)
