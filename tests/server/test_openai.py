"""The OpenAI-compatible endpoints, driven by the official `openai` client against a real worker.

Generations stay short (SmolLM2 on CPU): at most 16 tokens, except where a job must still be
running when the test cancels it; those jobs end by cancellation within a step or two.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.tokenizer import Tokenizer, load_tokenizer

PROMPT = "The capital of France is"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name one fruit."},
]
LONG = 256  # a budget that keeps a job running until the test cancels it


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # No retries: a 5xx must surface here, not be retried into a pass.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(GGUFFile(smollm2_path).metadata)


def log_record(server, predicate: Callable[[dict], bool], timeout: float = 15) -> dict:
    """The first narration line that satisfies `predicate`, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while True:
        for record in server.logs():
            if predicate(record):
                return record
        assert time.monotonic() < deadline, "no such log line"
        time.sleep(0.05)


def job_log(server, correlation_id: str, event: str) -> dict:
    return log_record(
        server, lambda r: r["event"] == event and r.get("correlation_id") == correlation_id
    )


def test_models_lists_the_one_served_model(server, client: openai.OpenAI, model: str):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    card = models[0]
    assert card.object == "model" and card.owned_by == "worker-orcd" and card.created > 0
    health = httpx.get(server.url + "/health").json()
    assert card.model_extra["max_model_len"] == health["context_length"]
    assert health["model"] == model
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_completion_streamed_equals_completion(
    client: openai.OpenAI, model: str, tokenizer: Tokenizer
):
    request = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, seed=1)
    full = client.completions.create(**request)
    assert full.id.startswith("cmpl-") and full.object == "text_completion" and full.model == model
    (choice,) = full.choices
    assert choice.text and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = full.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12

    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != full.id
    texts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(t.text for t in texts) == choice.text
    assert [t.finish_reason for t in texts] == [None] * (len(texts) - 1) + [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_prompt_as_token_ids_or_a_list_of_one(
    client: openai.OpenAI, model: str, tokenizer: Tokenizer
):
    ids = tokenizer.encode(PROMPT)
    answers = [
        client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        for prompt in (PROMPT, ids, [PROMPT])
    ]
    assert len({a.choices[0].text for a in answers}) == 1
    assert {a.usage.prompt_tokens for a in answers} == {len(ids)}


def test_chat_streamed_equals_chat(client: openai.OpenAI, model: str, tokenizer: Tokenizer):
    request = dict(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**request)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt = tokenizer.apply_chat_template(MESSAGES)
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special=False))

    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert middle and all(c.choices[0].delta.content for c in middle)
    assert "".join(c.choices[0].delta.content for c in middle) == choice.message.content
    assert [c.choices[0].finish_reason for c in (first, *middle)] == [None] * (len(middle) + 1)
    assert last.choices[0].finish_reason == choice.finish_reason
    assert usage.choices == [] and usage.usage == full.usage


def test_chat_text_parts_and_max_completion_tokens(client: openai.OpenAI, model: str):
    parts = [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if m["role"] == "user" else m
        for m in MESSAGES
    ]
    answers = [
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        for messages in (MESSAGES, parts)
    ]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert {a.choices[0].finish_reason for a in answers} == {"length"}
    assert {a.usage.completion_tokens for a in answers} == {4}


def test_seed_reproduces_sampling(client: openai.OpenAI, model: str):
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=12,
                temperature=0.8,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)


def test_stop_ends_before_the_stop_string(client: openai.OpenAI, model: str):
    request = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    free = client.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].text
    stop = free.split()[1]  # a word the greedy continuation reaches after its first one
    stopped = client.completions.create(**request, stop=[stop, "never-generated"])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 12


def test_max_tokens_finishes_with_length(client: openai.OpenAI, model: str):
    answer = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True}, user="someone"
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5


def test_raw_stream_is_openai_sse(server, model: str):
    """Only `data:` lines, ending with [DONE]; unknown fields are ignored; model may be left out."""
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "no_such_field": {"x": 1}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["model"] for c in chunks} == {model}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def create(client: openai.OpenAI, served: str, endpoint: str, fields: dict[str, Any]) -> Any:
    """A small request to `endpoint`, with `fields` replacing or adding to its own."""
    if endpoint == "chat":
        request = {"model": served, "messages": MESSAGES, "max_tokens": 2, **fields}
        return client.chat.completions.create(**request)
    request = {"model": served, "prompt": PROMPT, "max_tokens": 2, **fields}
    return client.completions.create(**request)


IMAGE = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}


@pytest.mark.parametrize(
    ("endpoint", "fields", "error", "message", "param"),
    [
        ("completions", {"n": 2}, openai.BadRequestError, "n: only 1", "n"),
        (
            "chat",
            {"temperature": 3},
            openai.BadRequestError,
            "less than or equal to 2",
            "temperature",
        ),
        ("completions", {"model": "gpt-4o"}, openai.NotFoundError, "does not exist", "model"),
        ("chat", {"messages": []}, openai.BadRequestError, "at least 1 item", "messages"),
        (
            "completions",
            {"logprobs": 1},
            openai.BadRequestError,
            "logprobs: unsupported",
            "logprobs",
        ),
        ("chat", {"logprobs": True}, openai.BadRequestError, "logprobs: unsupported", None),
        (
            "completions",
            {"frequency_penalty": 0.5},
            openai.BadRequestError,
            "frequency_penalty: unsupported",
            "frequency_penalty",
        ),
        ("completions", {"echo": True}, openai.BadRequestError, "echo: unsupported", "echo"),
        ("completions", {"prompt": ["a", "b"]}, openai.BadRequestError, "batch of 2", "prompt"),
        ("completions", {"prompt": ""}, openai.BadRequestError, "0 tokens", "prompt"),
        ("completions", {"prompt": [10**9]}, openai.BadRequestError, "vocabulary", "prompt"),
        ("completions", {"stop": list("abcde")}, openai.BadRequestError, "at most 4", "stop"),
        (
            "chat",
            {"stream_options": {"include_usage": True}},
            openai.BadRequestError,
            "only allowed when stream",
            "stream_options",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": [IMAGE]}]},
            openai.BadRequestError,
            "only text content parts",
            "messages.0",
        ),
    ],
)
def test_errors_are_openai_errors(
    client: openai.OpenAI,
    model: str,
    endpoint: str,
    fields: dict[str, Any],
    error: type[openai.APIStatusError],
    message: str,
    param: str | None,
):
    with pytest.raises(error, match=message) as raised:
        create(client, model, endpoint, fields)
    assert raised.value.type == "invalid_request_error"
    if param is not None:
        assert raised.value.param == param
    assert raised.value.message.count(message) == 1


def test_closing_a_stream_cancels_its_job(server, client: openai.OpenAI, model: str):
    correlation_id = str(uuid.uuid4())
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=LONG,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"x-correlation-id": correlation_id},
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    end = job_log(server, correlation_id, "execute_end")
    assert end["outcome"] == "CANCELLED" and end["job_id"].startswith("cmpl-")
    assert httpx.get(server.url + "/health").json()["status"] == "healthy"
    after = client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert after.choices[0].text


def test_a_failed_job_ends_the_stream_with_an_error(server, client: openai.OpenAI, model: str):
    """The response id is the job id, so the worker's own /cancel can end an OpenAI stream."""
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=LONG,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    job_id = next(chunks).id
    assert httpx.post(server.url + "/cancel", json={"job_id": job_id}).json()["cancelled"]
    with pytest.raises(openai.APIError, match="cancelled by request") as raised:
        list(chunks)
    assert raised.value.code == "CANCELLED"


def test_a_failed_job_answers_with_an_error_status(server, client: openai.OpenAI, model: str):
    correlation_id = str(uuid.uuid4())
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.completions.create,
            model=model,
            prompt=PROMPT,
            max_tokens=LONG,
            extra_body={"ignore_eos": True},
            extra_headers={"x-correlation-id": correlation_id},
        )
        start = job_log(server, correlation_id, "execute_start")
        assert start["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
        httpx.post(server.url + "/cancel", json={"job_id": start["job_id"]})
        with pytest.raises(openai.APIStatusError, match="cancelled by request") as raised:
            pending.result()
    assert raised.value.status_code == 499 and raised.value.code == "CANCELLED"


def test_a_client_that_hangs_up_cancels_its_job(server):
    correlation_id = str(uuid.uuid4())
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json=body,
            headers={"x-correlation-id": correlation_id},
            timeout=httpx.Timeout(10, read=1),
        )
    end = job_log(server, correlation_id, "execute_end")
    assert end["outcome"] == "CANCELLED"


def test_openapi_documents_the_request_bodies(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])
    bodies = schema["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage"} <= set(bodies)
    assert "max_completion_tokens" in bodies["ChatCompletionRequest"]["properties"]
