"""`/execute` end to end: reproducibility (M0-W-1826), UTF-8 (M0-W-1824), event order, queueing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from sse_client import StreamReader, check_protocol, counting, execute, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

HAIKU = "Write a haiku about GPU computing"
MAX_GENERATED_SEED = 1 << 53


def test_haiku_is_reproducible_at_temperature_zero(server: RunningServer):
    """M0-W-1826: the same request twice (same job_id too) streams the same events."""
    body = {"job_id": "test-haiku-001", "prompt": HAIKU, "temperature": 0.0, "seed": 42}
    first, second = [execute(server.url, **body, max_tokens=50) for _ in range(2)]
    for stream in (first, second):
        check_protocol(stream, "test-haiku-001")
        assert stream.terminal.event == "end" and stream.tokens
        assert stream.started["seed"] == 42
    assert first.replay_key() == second.replay_key()


def test_a_seed_reproduces_sampling_and_other_seeds_differ(server: RunningServer):
    body = {"prompt": HAIKU, "temperature": 0.7, "max_tokens": 50}
    first, second = [execute(server.url, job_id=new_job_id(), seed=42, **body) for _ in range(2)]
    check_protocol(first)
    assert first.tokens and first.replay_key() == second.replay_key()
    others = (execute(server.url, job_id=new_job_id(), seed=seed, **body) for seed in (1, 2, 3))
    assert any(other.tokens != first.tokens for other in others)


def test_a_generated_seed_is_reported_and_reproduces_the_stream(server: RunningServer):
    body = {"prompt": HAIKU, "temperature": 0.9, "max_tokens": 8}
    first = execute(server.url, job_id=new_job_id(), **body)
    check_protocol(first)
    seed = first.started["seed"]
    assert 0 <= seed < MAX_GENERATED_SEED  # survives a JSON round trip through any client
    again = execute(server.url, job_id=new_job_id(), seed=seed, **body)
    assert again.replay_key() == first.replay_key()


UTF8_PROMPTS = ["你好世界", "Hello 👋 World 🌍", "Mixed: 日本語 English العربية"]


@pytest.mark.parametrize("prompt", UTF8_PROMPTS)
def test_streamed_text_is_whole_utf8_characters(server: RunningServer, prompt: str):
    """M0-W-1824: every token event holds complete characters; the raw bytes decode strictly."""
    stream = execute(
        server.url, job_id=new_job_id(), prompt=prompt, max_tokens=20, temperature=0.7, seed=42
    )
    check_protocol(stream)
    assert "\ufffd" not in stream.raw.decode("utf-8", errors="strict")
    for token in stream.tokens:
        assert "\ufffd" not in token
        token.encode("utf-8", errors="strict")  # no lone surrogates


def test_max_tokens_ends_the_stream(server: RunningServer):
    stream = execute(server.url, **counting(new_job_id(), max_tokens=3))
    check_protocol(stream)
    assert stream.events[-2:] == ["metrics", "end"]
    assert stream.terminal.data["tokens_out"] == 3
    assert stream.terminal.data["stop_reason"] == "max_tokens"
    assert "stop_sequence_matched" not in stream.terminal.data


def test_a_stop_sequence_ends_the_stream_and_is_reported(server: RunningServer):
    body = counting(new_job_id(), max_tokens=30) | {"stop": [" 9", "never"]}
    stream = execute(server.url, **body)
    check_protocol(stream)
    end = stream.terminal.data
    assert (end["stop_reason"], end["stop_sequence_matched"]) == ("stop_sequence", " 9")
    assert stream.text == " 7, 8,"  # greedy counting, cut before the stop text


def test_a_request_joins_the_running_one_and_gets_the_same_tokens(server: RunningServer):
    first = StreamReader(server.url, counting(new_job_id("first"), max_tokens=16))
    first.start()
    first.wait_for("token")
    second_id = new_job_id("second")
    second = StreamReader(server.url, counting(second_id, max_tokens=4))
    second.start()
    first_stream, second_stream = first.result(), second.result()
    check_protocol(first_stream)
    check_protocol(second_stream, second_id)
    assert first_stream.terminal.event == second_stream.terminal.event == "end"
    lines = [(line["event"], line["job_id"]) for line in server.logs()]
    first_end = lines.index(("execute_end", first.body["job_id"]))
    assert lines.index(("execute_start", second_id)) < first_end  # in the batch, not after it
    assert second_stream.text == first_stream.text[: len(second_stream.text)]  # batch-invariant


def test_twenty_concurrent_requests_each_get_their_own_stream(server: RunningServer):
    prompts = [f"Question {n}: what is {n} plus {n}? Answer:" for n in range(1, 21)]
    alone = [execute(server.url, **greedy(new_job_id(), prompt)).text for prompt in prompts]
    ids = [new_job_id(f"c{n}") for n in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = [greedy(job_id, prompt) for job_id, prompt in zip(ids, prompts, strict=True)]
        streams = list(pool.map(lambda body: execute(server.url, **body), bodies))
    for job_id, stream, text in zip(ids, streams, alone, strict=True):
        check_protocol(stream, job_id)
        assert stream.terminal.event == "end"
        assert stream.text == text


def greedy(job_id: str, prompt: str) -> dict[str, object]:
    return {"job_id": job_id, "prompt": prompt, "temperature": 0.0, "max_tokens": 5}
