"""Prompts are prefilled in chunks: the same logits as in one pass, and a cancel lands between
two chunks rather than after the whole prompt."""

from __future__ import annotations

import asyncio

import pytest
import torch

from worker_orcd.engine.engine import CANCELLED, Engine, Failed, Finished
from worker_orcd.engine.llm import LLM
from worker_orcd.engine.model_runner import PREFILL_CHUNK
from worker_orcd.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM.load(smollm2_path, "cpu")


def long_prompt(llm: LLM, tokens: int) -> list[int]:
    text = " ".join(f"item{n % 89}" for n in range(tokens))
    ids = llm.tokenizer.encode(text)[:tokens]
    assert len(ids) == tokens
    return ids


def test_chunks_give_the_logits_of_one_pass(llm: LLM):
    ids = long_prompt(llm, 2 * PREFILL_CHUNK + 37)
    whole = llm.runner.prefill_chunk(ids, 0).clone()  # one pass over the whole prompt
    chunked = llm.runner.prefill(ids)
    assert chunked is not None
    difference = (chunked - whole).abs().max().item()
    print(f"\nmax |logit difference| chunked vs one pass: {difference:.2e}")
    assert difference < 1e-3  # float32 sums in another order
    assert torch.equal(chunked.argmax(), whole.argmax())


def test_a_generation_prefills_in_chunks(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    ids = long_prompt(llm, PREFILL_CHUNK + 10)
    alone = list(llm.generate(ids, GREEDY))
    starts: list[int] = []
    prefill_chunk = llm.runner.prefill_chunk

    def recorded(chunk: list[int], start: int) -> torch.Tensor:
        starts.append(start)
        assert len(chunk) <= PREFILL_CHUNK
        return prefill_chunk(chunk, start)

    monkeypatch.setattr(llm.runner, "prefill_chunk", recorded)
    again = list(llm.generate(ids, GREEDY))
    assert starts == [0, PREFILL_CHUNK]
    assert again == alone


def test_a_cancel_during_a_long_prefill_lands_within_one_chunk(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
):
    """The job is cancelled while its first chunk runs: no second chunk runs, the job ends with
    CANCELLED, and the job queued behind it runs next."""
    ids = long_prompt(llm, 4 * PREFILL_CHUNK)
    engine = Engine(llm)
    chunks_run = 0
    prefill_chunk = llm.runner.prefill_chunk

    async def scenario():
        long = engine.submit("long", ids, GREEDY)
        short = engine.submit("short", llm.tokenizer.encode("Hello"), GREEDY)
        loop = asyncio.get_running_loop()

        def cancelling(chunk: list[int], start: int) -> torch.Tensor:
            nonlocal chunks_run
            chunks_run += 1
            if start == 0:  # on the engine thread, mid-prompt, as /cancel would
                loop.call_soon_threadsafe(engine.cancel, "long")
                while not long._cancelled.is_set():
                    pass  # the cancel lands while this chunk still runs
            return prefill_chunk(chunk, start)

        monkeypatch.setattr(llm.runner, "prefill_chunk", cancelling)
        long_events = [event async for event in long.events()]
        short_events = [event async for event in short.events()]
        return long_events, short_events

    try:
        long_events, short_events = asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        engine.shutdown()
    assert long_events[-1] == CANCELLED
    assert sum(isinstance(event, Failed | Finished) for event in long_events) == 1
    assert chunks_run == 2  # the long prompt's first chunk, then the short prompt's only one
    assert isinstance(short_events[-1], Finished)
