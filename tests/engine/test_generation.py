"""The generation loop on the real default model (SmolLM2-135M, CPU)."""

from __future__ import annotations

import pytest

from worker_orcd.engine.llm import LLM
from worker_orcd.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM.load(smollm2_path, "cpu")


def run(llm: LLM, prompt: str, **params):
    generation = llm.stream(llm.tokenizer.encode(prompt), SamplingParams(**params))
    chunks = list(generation)
    assert generation.result is not None
    assert "".join(c.text for c in chunks) == generation.result.text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    return generation.result


def test_same_seed_same_tokens_at_every_temperature(llm: LLM):
    for temperature in (0.0, 0.7, 1.3):
        first = run(llm, "Once upon a time", temperature=temperature, seed=42, max_tokens=24)
        second = run(llm, "Once upon a time", temperature=temperature, seed=42, max_tokens=24)
        assert first.token_ids == second.token_ids
    other = run(llm, "Once upon a time", temperature=1.3, seed=43, max_tokens=24)
    assert other.token_ids != second.token_ids


def test_a_generated_seed_is_reported_and_reproduces_the_run(llm: LLM):
    first = run(llm, "The weather today", temperature=1.0, max_tokens=16)
    again = run(llm, "The weather today", temperature=1.0, max_tokens=16, seed=first.seed)
    assert 0 <= first.seed < 1 << 53
    assert again.token_ids == first.token_ids


def test_max_tokens_ends_the_generation(llm: LLM):
    result = run(llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=7, ignore_eos=True)
    assert len(result.token_ids) == 7
    assert result.stop_reason == "max_tokens"
    assert result.text == llm.tokenizer.decode(result.token_ids)


def test_a_stop_sequence_ends_the_text_before_it(llm: LLM):
    free = run(llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=24, ignore_eos=True)
    stop = free.text[10:14]
    stopped = run(llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=24, stop=(stop,))
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence_matched == stop
    assert stopped.text == free.text[: free.text.index(stop)]


def test_the_end_of_turn_token_ends_a_chat_reply(llm: LLM):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    generation = llm.stream(
        llm.tokenizer.encode(text, add_special=False),
        SamplingParams(temperature=0.0, max_tokens=200),
    )
    reply = "".join(chunk.text for chunk in generation)
    assert generation.result.stop_reason == "eos"
    assert "<|im_end|>" not in reply
    assert reply.strip()


def test_generation_stops_at_the_context_length(smollm2_path):
    small = LLM.load(smollm2_path, "cpu", max_context=12)
    ids = small.tokenizer.encode("one two three four five")
    result = run(small, "one two three four five", temperature=0.0, max_tokens=50, ignore_eos=True)
    assert result.stop_reason == "context_length"
    assert len(ids) + len(result.token_ids) == 12
    with pytest.raises(ValueError, match=r"expected 1 to 11 \(the model's context length\)"):
        small.stream(list(range(12)), SamplingParams())


@pytest.mark.parametrize(
    "prompt", ["你好世界", "Hello 👋 World 🌍", "Mixed: 日本語 English العربية"]
)
def test_streamed_text_is_whole_characters(llm: LLM, prompt: str):
    """Spec M0-W-1824: max_tokens 20 at temperature 0.7; no chunk holds U+FFFD or half a char."""
    for seed in range(3):
        generation = llm.stream(
            llm.tokenizer.encode(prompt), SamplingParams(temperature=0.7, seed=seed, max_tokens=20)
        )
        for chunk in generation:
            assert "\ufffd" not in chunk.text
            assert chunk.text.encode("utf-8").decode("utf-8") == chunk.text
