"""`worker-orcd bench`: the numbers llama-bench reports, measured on our own serving path.

Both go through the engine's step loop, so they are what a client gets: pp (prefill tokens/s)
is a prompt of random ids over the time to its first token (its chunks, then one draw); tg
(decode tokens/s) generates from a one-token prompt (sampling, detokenizing included). Each is
the median of `repeats` runs after a warm-up.
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from worker_orcd.engine.llm import DEFAULT_MAX_CONTEXT, LLM, resolve_device
from worker_orcd.sampling_params import SamplingParams


@dataclass(frozen=True)
class BenchReport:
    model: str
    device: str
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    time_to_first_token_ms: float
    weights_bytes: int  # see LLM.weights_bytes
    peak_memory_bytes: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            (f"pp{self.prompt_tokens} (prefill tok/s)", f"{self.prefill_tokens_per_second:,.1f}"),
            (f"tg{self.generated_tokens} (decode tok/s)", f"{self.decode_tokens_per_second:,.1f}"),
            ("time to first token (ms)", f"{self.time_to_first_token_ms:,.1f}"),
            ("weights (MiB)", f"{self.weights_bytes / 2**20:,.1f}"),
            ("peak memory (MiB)", f"{self.peak_memory_bytes / 2**20:,.1f}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.model} on {self.device}"]
        lines += [f"  {name.ljust(width)}  {value:>12}" for name, value in rows]
        return "\n".join(lines)


def run_bench(
    path: Path,
    device_name: str,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repeats: int = 5,
    max_context: int = DEFAULT_MAX_CONTEXT,
) -> BenchReport:
    device = resolve_device(device_name)
    llm = LLM.load(path, device_name, max_context=max_context)
    vocab = llm.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=generator).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def decode_rate() -> float:
        return llm.generate([prompt[:1]], greedy)[0].tokens_per_second

    def first_token_seconds() -> float:
        return llm.generate([prompt], first_token)[0].prefill_seconds

    first_token_seconds()  # warm-up: kernels compile
    decode_rate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft = statistics.median(first_token_seconds() for _ in range(repeats))
    decode = statistics.median(decode_rate() for _ in range(repeats))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return BenchReport(
        model=path.name,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        prompt_tokens=prompt_tokens,
        generated_tokens=gen_tokens,
        prefill_tokens_per_second=prompt_tokens / ttft,
        decode_tokens_per_second=decode,
        time_to_first_token_ms=1000 * ttft,
        weights_bytes=llm.weights_bytes,
        peak_memory_bytes=peak,
    )
