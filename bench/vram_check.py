"""The VRAM-only policy on a real GPU (device only): python3 bench/vram_check.py MODEL.gguf

1. Insufficient VRAM at startup (M0-W-1020): with another process holding all but 1 GiB of
   the GPU, a worker exits 1 with one line naming required bytes, available bytes, GPU id and
   model path, before anything loads.
2. OOM during a request (M0-W-1021, M0-W-1825): with the process capped a little above what
   the model holds, a 16k-token prefill runs out of memory; that job ends with `error` VRAM_OOM,
   and the next request succeeds.
3. Streaming load (M0-W-1221): private host memory peaks far below the weights' size while
   loading (the memory map's pages are the file, not a copy).
4. Residency (M0-W-1012): every model tensor is device memory.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import torch

from worker_orcd.engine.engine import Engine, Failed, Finished, Started
from worker_orcd.engine.llm import LLM, resolve_device
from worker_orcd.engine.memory import resident
from worker_orcd.sampling_params import SamplingParams

HOLD_ALL_BUT_1_GIB = """
import time, torch
free, _ = torch.cuda.mem_get_info()
held = torch.empty(free - (1 << 30), dtype=torch.uint8, device="cuda")
print("held", flush=True)
time.sleep(120)
"""


def insufficient_vram(model: str) -> None:
    """Another process holds all but 1 GiB of the GPU; a worker must refuse to start."""
    blocker = subprocess.Popen([sys.executable, "-c", HOLD_ALL_BUT_1_GIB], stdout=subprocess.PIPE)
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == b"held"
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "worker_orcd.cli",
            "generate",
            "--model",
            model,
            "--device",
            "cuda",
            "hi",
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        blocker.kill()
    last = run.stderr.strip().splitlines()[-1]
    print(f"[1] exit {run.returncode} in {time.perf_counter() - started:.1f} s: {last}")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "Insufficient VRAM: required" in last and "available" in last
    assert "on GPU 0" in last and model in last


def anonymous_bytes() -> int:
    """Private (anonymous) resident memory: heap copies count, the file's mapped pages do not."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


async def collect(job) -> list:
    return [event async for event in job.events()]


def oom_recovery_and_residency(model: str) -> None:
    resolve_device("cuda")  # the CUDA runtime's own host memory is not the model's
    baseline = anonymous_bytes()
    peak = [baseline]
    loaded = threading.Event()

    def sample() -> None:
        while not loaded.wait(0.002):
            peak[0] = max(peak[0], anonymous_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    llm = LLM.load(model, "cuda", max_context=20_000)
    loaded.set()
    sampler.join()
    growth = peak[0] - baseline
    print(
        f"[3] private host memory peaked {growth / 2**20:.0f} MiB above the start while loading "
        f"{llm.weights_bytes / 2**20:.0f} MiB of weights (tokenizer included)"
    )
    assert growth < llm.weights_bytes / 2
    assert resident(llm.model, torch.device("cuda", 0))
    print("[4] every model tensor is device memory")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_allocated() + (400 << 20)) / total
    )
    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, 150_000, (16_000,), generator=generator).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def scenario():
        engine = Engine(llm)
        failed = await collect(engine.submit("long", long_prompt, params))
        after = await collect(engine.submit("short", long_prompt[:10], params))
        engine.shutdown()
        return failed, after

    failed, after = asyncio.run(scenario())
    print(f"[2] long prompt: {[type(e).__name__ for e in failed]} {failed[-1]}")
    assert isinstance(failed[0], Started) and isinstance(failed[-1], Failed)
    assert failed[-1].code == "VRAM_OOM"
    assert isinstance(after[-1], Finished) and len(after[-1].result.token_ids) == 10
    result = after[-1].result
    print(f"[2] next request: {len(result.token_ids)} tokens, {result.stop_reason}")


if __name__ == "__main__":
    insufficient_vram(sys.argv[1])
    oom_recovery_and_residency(sys.argv[1])
    print("VRAM policy checks passed")
