"""Where a step's time goes (device only): the host's share and the GPU's, kernel by kernel.

    python3 bench/profile_step.py --model /tmp/q.gguf [--batch-sizes 1,128] [--temperature 0.8]
At each batch size, B random 128-token prompts decode together; after a warm-up run, one run is
timed and then one is profiled. Prints wall time per decode step, the host's busy time per step
(the step loop minus its waits for the device's tokens) and the GPU's kernel time per step, then
the kernels by total GPU time, and the host's Python functions by their own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

from worker_orcd.cli import int_list
from worker_orcd.engine import model_runner
from worker_orcd.engine.llm import LLM
from worker_orcd.engine.llm_engine import LLMEngine
from worker_orcd.sampling_params import SamplingParams


class WaitClock:
    """Counts the seconds the host spends waiting for a step's tokens."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = model_runner.StepTokens.tolist

        def timed(tokens: model_runner.StepTokens) -> list[int]:
            started = time.perf_counter()
            values = original(tokens)
            self.seconds += time.perf_counter() - started
            return values

        model_runner.StepTokens.tolist = timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 128])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--temperature", type=float, default=0.0, help="seeded when above 0")
    args = parser.parse_args()
    llm = LLM.load(args.model, "cuda", max_context=2048)
    clock = WaitClock()
    generator = torch.Generator().manual_seed(0)
    for size in args.batch_sizes:
        prompts = [
            torch.randint(0, 150_000, (128,), generator=generator).tolist() for _ in range(size)
        ]
        params = SamplingParams(
            temperature=args.temperature, seed=1, max_tokens=args.steps, ignore_eos=True
        )
        llm.generate(prompts, params)  # compile, capture
        steps, wall, waited = decode(llm.engine, prompts, params, clock)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            profiled, _, _ = decode(llm.engine, prompts, params, clock)
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        print(
            f"\n== B={size}, temperature {args.temperature}: "
            f"{1e3 * wall / steps:.3f} ms per decode step "
            f"({size * steps / wall:.0f} tok/s), host busy {1e3 * (wall - waited) / steps:.3f} "
            f"ms/step, GPU kernels {gpu_us / 1e3 / profiled:.3f} ms/step",
            flush=True,
        )
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows), flush=True)
        with cProfile.Profile() as host:
            decode(llm.engine, prompts, params, clock)
        pstats.Stats(host).sort_stats("tottime").print_stats(args.rows)


def decode(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, clock: WaitClock
) -> tuple[int, float, float]:
    """Prefill the prompts, then time the decode steps to the end: (steps, seconds, of which
    waiting for tokens)."""
    for prompt in prompts:
        engine.add(prompt, params)
    while (
        any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running)
        or engine.scheduler.waiting
    ):
        engine.step()
    torch.cuda.synchronize()
    steps, clock.seconds, started = 0, 0.0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return steps, time.perf_counter() - started, clock.seconds


if __name__ == "__main__":
    main()
