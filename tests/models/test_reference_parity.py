"""Our forward pass against transformers loading the same GGUF (dequantized to float32).

Both sides compute in float32 from bit-identical dequantized weights, so the logits differ only
by the order of floating-point operations. Measured on the real files: max |diff| 3.6e-5
(SmolLM2) and 2.6e-4 (Qwen2.5) over the prompts' positions; the bounds leave headroom of ~10x.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker_orcd.engine.config import BLOCK_SIZE
from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.llm import LLM
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "日本の首都は東京です。大阪は",
    "Привет! Как дела? Сегодня 🙂",
    "مرحبا بالعالم، اليوم نتعلم",
    "<|im_start|>user\nWrite a haiku about GPUs<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_STEPS = 32
LOGIT_BOUNDS = {"smollm2": 5e-4, "qwen": 3e-3}


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def pair(request: pytest.FixtureRequest):
    from transformers import AutoModelForCausalLM

    path: Path = request.getfixturevalue(f"{request.param}_path")
    ours = LLM.load(path, "cpu")
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    yield request.param, ours, reference
    del ours, reference


def reference_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored, with its own KV cache."""
    tokens: list[int] = []
    ids = torch.tensor([prompt_ids])
    past = None
    with torch.inference_mode():
        for _ in range(steps):
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.slow
def test_prefill_logits_match_the_reference(pair):
    name, ours, reference = pair
    worst = 0.0
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt, add_special=False)
        with torch.inference_mode():
            seq = Sequence(ids, SamplingParams())
            seq.block_table = list(range(-(-len(ids) // BLOCK_SIZE)))
            batch = ForwardBatch.build(
                [ScheduledChunk(seq, 0, len(ids), True)], BLOCK_SIZE, torch.device("cpu")
            )
            cache = ours.model.new_kv_cache(len(seq.block_table), BLOCK_SIZE)
            logits = ours.model.compute_logits(ours.model(batch, cache))
            expected = reference(torch.tensor([ids])).logits[0]
        worst = max(worst, (logits - expected).abs().max().item())
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), prompt
    assert worst < LOGIT_BOUNDS[name]


@pytest.mark.slow
def test_greedy_tokens_match_the_reference_for_32_steps(pair):
    _, ours, reference = pair
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_STEPS, ignore_eos=True)
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt, add_special=False)
        generation = ours.stream(ids, params)
        text = "".join(chunk.text for chunk in generation)
        assert generation.result.token_ids == reference_greedy(reference, ids, GREEDY_STEPS), prompt
        assert "\ufffd" not in text
