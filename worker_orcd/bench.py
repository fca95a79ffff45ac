"""`worker-orcd bench`: the numbers llama-bench and llama-batched-bench report, measured on our
own serving path.

All go through the engine's step loop, so they are what a client gets: pp (prefill tokens/s)
is a prompt of random ids over the time to its first token (its chunks, then one draw); tg
(decode tokens/s) generates from a one-token prompt (sampling, detokenizing included). Each is
the median of `repeats` runs after a warm-up. At a depth d (llama-bench -d), one stream
prefills d tokens and then decodes (one run after a warm-up). At a batch size B
(llama-batched-bench), B streams of random prompts start together; their decode rate counts the
tokens drawn after the last one's first token, over the time since.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
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
    depths: tuple[dict, ...] = ()  # {depth, prefill_tokens_per_second, decode_tokens_per_second}
    # {batch_size, prompt_tokens, prefill_..., decode_..., total_...}
    batches: tuple[dict, ...] = ()

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
        g = self.generated_tokens
        for row in self.depths:
            d = row["depth"]
            rows.append((f"pp{d} (prefill tok/s)", f"{row['prefill_tokens_per_second']:,.1f}"))
            rows.append((f"tg{g} @ d{d} (decode tok/s)", f"{row['decode_tokens_per_second']:,.1f}"))
        for row in self.batches:
            b = row["batch_size"]
            for phase in ("prefill", "decode", "total"):
                rate = row[f"{phase}_tokens_per_second"]
                rows.append((f"B={b} {phase} (tok/s)", f"{rate:,.1f}"))
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.model} on {self.device}"]
        lines += [f"  {name.ljust(width)}  {value:>12}" for name, value in rows]
        return "\n".join(lines)


BATCH_PROMPT = 128  # prompt tokens per stream of a batch: llama-batched-bench's -npp 128


def run_bench(
    path: Path,
    device_name: str,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repeats: int = 5,
    max_context: int = DEFAULT_MAX_CONTEXT,
    depths: tuple[int, ...] = (),
    batch_sizes: tuple[int, ...] = (),
    say: Callable[[str], None] = lambda _: None,
) -> BenchReport:
    """`say` hears what is being measured as it starts."""
    device = resolve_device(device_name)
    say(f"loading {path.name} on {device}")
    llm = LLM.load(path, device_name, max_context=max_context)
    vocab = llm.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)

    def random_prompt(n: int) -> list[int]:
        """Fresh ids each time: nothing comes from the prefix cache."""
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    greedy = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def decode_rate() -> float:
        return llm.generate([random_prompt(1)], greedy)[0].tokens_per_second

    def first_token_seconds() -> float:
        return llm.generate([random_prompt(prompt_tokens)], first_token)[0].prefill_seconds

    def at_depth(depth: int) -> dict:
        """The second of two runs: the first compiles what this length needs."""
        for _ in range(2):
            result = llm.generate([random_prompt(depth)], greedy)[0]
        return dict(
            depth=depth,
            prefill_tokens_per_second=depth / result.prefill_seconds,
            decode_tokens_per_second=result.tokens_per_second,
        )

    say("warming up (kernels compile)")
    first_token_seconds()
    decode_rate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say(f"pp{prompt_tokens}: time to first token, median of {repeats}")
    ttft = statistics.median(first_token_seconds() for _ in range(repeats))
    say(f"tg{gen_tokens}: single-stream decode, median of {repeats}")
    decode = statistics.median(decode_rate() for _ in range(repeats))
    depth_rows, batch_rows = [], []
    for depth in depths:
        say(f"depth {depth}: prefill, then tg{gen_tokens} after it")
        depth_rows.append(at_depth(depth))
    for size in batch_sizes:
        say(f"B={size}: {size} streams of {BATCH_PROMPT} prompt + {gen_tokens} tokens")
        batch_rows.append(batched(llm, size, BATCH_PROMPT, gen_tokens, random_prompt))
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
        depths=tuple(depth_rows),
        batches=tuple(batch_rows),
    )


def batched(
    llm: LLM,
    size: int,
    prompt_tokens: int,
    gen_tokens: int,
    random_prompt: Callable[[int], list[int]],
) -> dict:
    """`size` streams of distinct random prompts, started together (after one warm-up run)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    for _ in range(2):
        seqs = [engine.add(random_prompt(prompt_tokens), params) for _ in range(size)]
        start = time.perf_counter()
        decoding, drawn = None, 0
        while engine.has_unfinished():
            engine.step()
            if decoding is None and all(s.first_token_at for s in seqs):
                decoding = time.perf_counter()
                drawn = sum(s.num_generated for s in seqs)
        end = time.perf_counter()
    decode_seconds = end - decoding
    return dict(
        batch_size=size,
        prompt_tokens=prompt_tokens,
        prefill_tokens_per_second=size * prompt_tokens / (decoding - start),
        decode_tokens_per_second=(size * gen_tokens - drawn) / decode_seconds,
        total_tokens_per_second=size * gen_tokens / (end - start),
    )
