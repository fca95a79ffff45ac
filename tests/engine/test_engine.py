"""The engine's guarantees, in process: order, exactly one terminal event, failures contained."""

from __future__ import annotations

import asyncio

import pytest
import torch

from worker_orcd.engine.engine import (
    CANCELLED,
    Engine,
    Failed,
    Finished,
    JobRejected,
    Started,
    Token,
)
from worker_orcd.engine.llm import LLM
from worker_orcd.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM.load(smollm2_path, "cpu")


@pytest.fixture
def engine(llm: LLM):
    engine = Engine(llm)
    yield engine
    engine.shutdown()


async def collect(job) -> list:
    return [event async for event in job.events()]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


def test_jobs_run_in_order_each_with_one_terminal_event(engine: Engine, llm: LLM):
    prompts = ["One", "Two", "Three"]

    async def scenario():
        jobs = [engine.submit(p, llm.tokenizer.encode(p), GREEDY) for p in prompts]
        return await asyncio.gather(*(collect(job) for job in jobs))

    results = run(scenario())
    engine.shutdown()  # its thread steps the core `llm.stream` drives: one at a time
    for prompt, events in zip(prompts, results, strict=True):
        assert isinstance(events[0], Started) and events[0].seed is not None
        assert all(isinstance(e, Token) for e in events[1:-1])
        assert isinstance(events[-1], Finished)
        alone = llm.stream(llm.tokenizer.encode(prompt), GREEDY)
        assert "".join(c.text for c in alone) == "".join(e.text for e in events[1:-1])


def test_tokens_queued_behind_a_slow_reader_arrive_joined_in_one_event(engine: Engine, llm: LLM):
    async def scenario():
        job = engine.submit("slow", llm.tokenizer.encode("One"), GREEDY)
        while not job.done:  # a client that reads nothing until the job has ended
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the engine's last delivery reaches the loop
        return await collect(job)

    events = run(scenario())
    assert [type(e) for e in events] == [Started, Token, Finished]
    assert events[1].index == 0
    assert events[1].text == events[2].result.text and events[2].result.text


def test_a_duplicate_or_empty_job_is_refused(engine: Engine, llm: LLM):
    async def scenario():
        job = engine.submit("same", llm.tokenizer.encode("Hello"), GREEDY)
        with pytest.raises(JobRejected) as duplicate:
            engine.submit("same", llm.tokenizer.encode("Hello"), GREEDY)
        with pytest.raises(JobRejected) as empty:
            engine.submit("empty", [], GREEDY)
        await collect(job)
        return duplicate.value.code, empty.value.code

    assert run(scenario()) == ("DUPLICATE_JOB_ID", "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("error", "code", "retriable"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "VRAM_OOM", True),
        (KeyError("x"), "INTERNAL", True),
    ],
)
def test_a_failing_generation_ends_its_job_and_the_next_one_succeeds(
    engine: Engine, llm: LLM, monkeypatch: pytest.MonkeyPatch, error, code, retriable
):
    """Spec M0-W-1021: an error mid-request ends that request only; the worker keeps serving."""
    original = llm.model.forward
    calls = 0

    def failing_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # after two tokens were streamed
            raise error
        return original(*args, **kwargs)

    async def scenario():
        monkeypatch.setattr(llm.model, "forward", failing_forward)
        failed = await collect(engine.submit("bad", llm.tokenizer.encode("Hi"), GREEDY))
        monkeypatch.setattr(llm.model, "forward", original)
        after = await collect(engine.submit("good", llm.tokenizer.encode("Hi"), GREEDY))
        return failed, after

    failed, after = run(scenario())
    assert isinstance(failed[0], Started)
    assert [type(e) for e in failed[1:-1]] == [Token] * (len(failed) - 2)
    assert failed[-1] == Failed(code, failed[-1].message, retriable)
    assert isinstance(after[-1], Finished)


@pytest.fixture(scope="module")
def serial(smollm2_path) -> LLM:
    """One sequence at a time (a second job stays queued), prompts in chunks of 256 tokens."""
    return LLM.load(smollm2_path, "cpu", max_num_seqs=1, max_num_batched_tokens=256)


def test_shutdown_ends_queued_jobs_and_refuses_new_ones(serial: LLM):
    llm, engine = serial, Engine(serial)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def scenario():
        running = engine.submit("running", llm.tokenizer.encode("Count:"), long)
        queued = engine.submit("queued", llm.tokenizer.encode("Count:"), long)
        first = await running.events().__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(JobRejected, match="shutting down"):
            engine.submit("late", llm.tokenizer.encode("Hi"), long)
        return [first, *[e async for e in running.events()]], await collect(queued)

    running, queued = run(scenario())
    assert isinstance(running[-1], Finished)  # the running job was allowed to finish
    # A job that never started gets its terminal event alone, retriable elsewhere.
    assert queued == [Failed("SHUTTING_DOWN", "the worker is shutting down", retriable=True)]


def test_shutdown_deadline_ends_the_running_job_with_its_terminal_event(llm: LLM):
    engine = Engine(llm)
    endless = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)

    async def scenario():
        running = engine.submit("running", llm.tokenizer.encode("Count:"), endless)
        first = await running.events().__anext__()
        await asyncio.to_thread(engine.shutdown, 0.2)
        return [first, *[e async for e in running.events()]]

    events = run(scenario())
    assert isinstance(events[0], Started)
    assert [type(e) for e in events[1:-1]] == [Token] * (len(events) - 2)
    assert events[-1].code == "SHUTTING_DOWN" and events[-1].retriable


def test_a_cancel_during_a_long_prefill_lands_within_one_chunk(
    serial: LLM, monkeypatch: pytest.MonkeyPatch
):
    """The job is cancelled while its first chunk runs: no second chunk runs, it ends with
    CANCELLED, its blocks come back, and the job queued behind it runs next."""
    llm, engine = serial, Engine(serial)
    ids = llm.tokenizer.encode(" ".join(f"item{n % 89}" for n in range(1000)))[:1000]
    pool = llm.engine.scheduler.block_manager
    steps: list[int] = []  # tokens in each forward pass
    forward = llm.model.forward

    async def scenario():
        long = engine.submit("long", ids, GREEDY)
        short = engine.submit("short", llm.tokenizer.encode("Hello"), GREEDY)
        loop = asyncio.get_running_loop()

        def cancelling(batch, cache):
            steps.append(len(batch.input_ids))
            if len(steps) == 1:  # on the engine thread, mid-prompt, as /cancel would
                loop.call_soon_threadsafe(engine.cancel, "long")
                while long.ending is None:
                    pass  # the cancel lands while this chunk still runs
            return forward(batch, cache)

        monkeypatch.setattr(llm.model, "forward", cancelling)
        return await collect(long), await collect(short)

    try:
        long_events, short_events = run(scenario())
    finally:
        engine.shutdown()
    assert long_events == [Started(long_events[0].seed, 1000), CANCELLED]
    # the long prompt's first chunk, then the short prompt
    assert steps[:2] == [256, len(llm.tokenizer.encode("Hello"))]
    assert isinstance(short_events[-1], Finished)
    assert pool.num_free_blocks == pool.num_blocks
