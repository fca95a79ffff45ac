"""The VRAM plan matches what loading really takes; streaming copies bytes exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from worker_orcd.engine.llm import LLM
from worker_orcd.engine.memory import InsufficientVram, VramPlan, model_tensors, plan_vram, resident
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.layers.quant_linear import stream_to_device


def test_the_plan_counts_the_weights_and_the_kv_cache_the_model_allocates(smollm2_path: Path):
    llm = LLM.load(smollm2_path, "cpu", max_context=1024)
    plan = plan_vram(GGUFFile(smollm2_path), llm.context_length)
    c = llm.model.config
    assert plan.kv_cache == 2 * c.num_layers * llm.context_length * c.num_kv_heads * c.head_dim * 2
    cache = llm.engine.runner.cache  # on the CPU, one full context in float32
    assert cache.keys.dtype == torch.float32
    assert cache.keys.nbytes + cache.values.nbytes == 2 * plan.kv_cache
    assert plan.weights == sum(info.nbytes for info in llm.gguf.tensors.values())
    assert plan.total == plan.weights + plan.kv_cache + plan.workspace


def test_the_refusal_names_required_and_available_bytes_gpu_and_model():
    error = InsufficientVram(VramPlan(100, 20, 5), 50, torch.device("cuda", 1), Path("/m.gguf"))
    assert str(error).startswith("Insufficient VRAM: required 125 bytes")
    assert "available 50 bytes on GPU 1, model /m.gguf" in str(error)


def test_streaming_in_chunks_copies_every_byte():
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    copied = stream_to_device(data, torch.device("cpu"), chunk_bytes=999)
    assert torch.equal(copied, torch.from_numpy(data))


def test_every_model_tensor_is_found_for_the_residency_check(smollm2_path: Path):
    llm = LLM.load(smollm2_path, "cpu", max_context=64)
    tensors = model_tensors(llm.model)
    block_bytes = {t.data_ptr(): t.nbytes for t in tensors if t.dtype == torch.uint8}
    assert sum(block_bytes.values()) == sum(
        i.nbytes for i in llm.gguf.tensors.values() if i.qtype != 0
    )
    assert resident(llm.model, torch.device("cpu"))
    assert not resident(llm.model, torch.device("meta"))


PEAK_SCRIPT = """
import sys
from worker_orcd.engine.llm import LLM
from worker_orcd.sampling_params import SamplingParams

def status(field):  # kB in /proc/self/status; VmHWM is this process's own peak
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

llm = LLM.load(sys.argv[1], "cpu")
loaded = status("VmRSS")
text = " ".join(f"w{n % 97}" for n in range(llm.context_length))
ids = llm.tokenizer.encode(text)[: llm.context_length - 1]
result = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))[0]
print(loaded, status("VmHWM"), len(ids), result.stop_reason)
"""


def test_a_prompt_at_the_context_limit_peaks_within_1_gib_of_the_loaded_model(smollm2_path):
    """Chunked prefill bounds activations: the whole context costs its KV pool, which the
    loaded model already holds, plus one chunk's work. The peak is the child's own VmHWM:
    getrusage's ru_maxrss would carry the parent's peak over the exec."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(smollm2_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    loaded, peak, prompt_tokens = (int(value) for value in out[:3])
    print(
        f"\nloaded {loaded / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB at {prompt_tokens} tokens"
    )
    assert prompt_tokens == 8191 and out[3] == "max_tokens"
    assert peak - loaded < 1 << 30
