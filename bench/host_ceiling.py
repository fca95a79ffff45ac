"""What the host alone sustains: tokens/s with the forward pass stubbed out.

    python3 bench/host_ceiling.py [--streams 128] [--http --duration 30] [--gpu-ms 6]

The model's weights load but never run: each step's draw is random ids below 1,000 (on a GPU the
logits and the draw are device work). So what is left is the host's: the scheduler, the batch's
lists and copies, reading and detokenizing tokens, and with `Engine` its thread, events and
asyncio consumers; with --http also `worker-orcd serve` (uvicorn, SSE) under bench/loadgen.py at
the same concurrency, in another process. A GPU step shorter than the host's step leaves the GPU
waiting; an HTTP rate far below `Engine`'s means the server's event loop and the engine thread
contend for the GIL; --gpu-ms gives each step a device's duration, during which the engine
thread waits with the GIL released, as it does on a GPU. Runs on the CPU, anywhere; a
one-layer synthetic Qwen2.5-0.5B (its real vocabulary size) unless --model is given.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from worker_orcd.engine import llm as llm_module
from worker_orcd.engine import model_runner
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.forward_batch import HostBatch
from worker_orcd.engine.llm import LLM
from worker_orcd.engine.model_runner import StepTokens
from worker_orcd.gguf.synth import synthesize
from worker_orcd.sampling_params import SamplingParams

GENERATED = 128
STUB_VOCAB = 1000
CONTEXT = 1024  # positions per sequence: a 100-token prompt and its generated tokens fit


def stub_forward(streams: int, gpu_ms: float = 0.0) -> None:
    """Replace the forward pass and the draw (the batch is still built and packed, the sampling
    parameters still gathered), and give the pool every stream's whole context: on the CPU it
    holds one context, and here it is bookkeeping, never read. With `gpu_ms`, each step's
    tokens are ready that long after the previous step's (a device running steps back to back)
    and reading them waits with the GIL released, as `torch.cuda.Event.synchronize` does."""
    llm_module.kv_pool_blocks = lambda model, config: streams * config.blocks_for(CONTEXT)

    def logits(runner: model_runner.ModelRunner, chunks):
        host = HostBatch.of(chunks, runner.block_size)
        host.packed(host.table_width)
        drawing = [chunk.seq for chunk in chunks if chunk.samples]
        return drawing, torch.empty(len(drawing), 0)

    model_runner.ModelRunner.logits = logits
    model_runner.sample = lambda logits, batch: torch.randint(0, STUB_VOCAB, logits.shape[:1])
    if gpu_ms:
        ready_at = [0.0]  # when the device finishes the last queued step
        unstubbed_init, unstubbed_tolist = StepTokens.__init__, StepTokens.tolist

        def queued(self: StepTokens, tokens: torch.Tensor) -> None:
            unstubbed_init(self, tokens)
            ready_at[0] = self.ready_at = max(ready_at[0], time.perf_counter()) + gpu_ms / 1e3

        def read(self: StepTokens) -> list[int]:
            time.sleep(max(0.0, self.ready_at - time.perf_counter()))
            return unstubbed_tolist(self)

        StepTokens.__init__, StepTokens.tolist = queued, read


def step_loop(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Decode tokens/s of the step loop, timed from the step where every stream has its first
    token (prefill excluded, as llama-batched-bench counts)."""
    engine = llm.engine
    seqs = [engine.add(prompt, params) for prompt in prompts]
    start, drawn = None, 0
    while engine.has_unfinished():
        if start is None and all(seq.first_token_at for seq in seqs):
            start, drawn = time.perf_counter(), sum(seq.num_generated for seq in seqs)
        engine.step()
    return (len(prompts) * GENERATED - drawn) / (time.perf_counter() - start)


def async_front(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Tokens/s through `Engine`, each job read by an asyncio task (prefill included)."""

    async def run() -> float:
        engine = Engine(llm)

        async def consume(job_id: str, prompt: list[int]) -> None:
            async for _ in engine.submit(job_id, prompt, params).events():
                pass

        started = time.perf_counter()
        await asyncio.gather(*(consume(f"job-{i}", p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - started
        engine.shutdown()
        return len(prompts) * GENERATED / seconds

    return asyncio.run(run())


def over_http(model: Path, streams: int, duration: float, port: int, gpu_ms: float) -> str:
    """bench/loadgen.py's report against a stubbed `worker-orcd serve`."""
    command = [sys.executable, __file__, "--serve", "--model", str(model)]
    command += ["--port", str(port), "--streams", str(streams), "--gpu-ms", str(gpu_ms)]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        loadgen = Path(__file__).with_name("loadgen.py")
        return subprocess.run(
            [sys.executable, str(loadgen), "--url", url, "--concurrency", str(streams),
             "--duration", str(duration), "--mix", f"100:{GENERATED}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="default: a one-layer synthetic Qwen2.5-0.5B")
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--http", action="store_true", help="also over HTTP, with loadgen")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of HTTP load")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--gpu-ms", type=float, default=0.0, help="a device step's duration")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stub_forward(args.streams, args.gpu_ms)
    if args.serve:  # the server process of --http
        from worker_orcd.cli import main as cli

        sys.exit(cli(["serve", "--model", str(args.model), "--device", "cpu",
                      "--port", str(args.port), "--ctx-size", str(CONTEXT)]))  # fmt: skip
    model = args.model
    if model is None:
        model = Path(tempfile.mkdtemp()) / "qwen-1-layer.gguf"
        synthesize("qwen2.5-0.5b", model, layers=1)
    llm = LLM.load(model, "cpu", max_context=CONTEXT)
    params = SamplingParams(temperature=0.0, max_tokens=GENERATED, ignore_eos=True)
    prompts = [list(range(10 + i, 110 + i)) for i in range(args.streams)]
    step_loop(llm, prompts, params)  # warm-up
    rate = step_loop(llm, prompts, params)
    print(f"step loop: {rate:,.0f} decode tok/s at {args.streams} streams "
          f"({1e3 * args.streams / rate:.2f} ms of host work per step)")  # fmt: skip
    print(f"async front (Engine): {async_front(llm, prompts, params):,.0f} tok/s")
    if args.http:
        print("over HTTP: " + over_http(model, args.streams, args.duration, args.port, args.gpu_ms))


if __name__ == "__main__":
    main()
