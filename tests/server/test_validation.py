"""Refused requests (M0-W-1302): 400 with every bad field listed, 409, 413."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sse_client import TIMEOUT, long_job, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

MAX_BODY_BYTES = 1 << 20
VOCAB_SIZE = 49152
LONG_STOP = " ".join(f"word{n}" for n in range(40))  # far over 32 tokens

# (field in the request, value, field in the error, constraint)
OUT_OF_RANGE = [
    ("job_id", "", "job_id", "non_empty"),
    ("job_id", "j" * 257, "job_id", "max_length(256)"),
    ("prompt", "", "prompt", "non_empty"),
    ("prompt", "p" * 32769, "prompt", "max_length(32768)"),
    ("prompt", "🌍" * 9000, "prompt", "max_tokens(8191)"),  # more tokens than the context
    ("max_tokens", 0, "max_tokens", "range(>=1)"),
    ("max_tokens", 2049, "max_tokens", "range(<=2048)"),
    ("temperature", -0.1, "temperature", "range(>=0.0)"),
    ("temperature", 2.01, "temperature", "range(<=2.0)"),
    ("top_p", -0.1, "top_p", "range(>=0.0)"),
    ("top_p", 1.01, "top_p", "range(<=1.0)"),
    ("top_k", -1, "top_k", "range(>=0)"),
    ("top_k", VOCAB_SIZE + 1, "top_k", f"range(<={VOCAB_SIZE})"),
    ("min_p", -0.1, "min_p", "range(>=0.0)"),
    ("min_p", 1.01, "min_p", "range(<=1.0)"),
    ("repetition_penalty", 0.0, "repetition_penalty", "range(>0.0)"),
    ("repetition_penalty", 2.01, "repetition_penalty", "range(<=2.0)"),
    ("stop", ["a", "b", "c", "d", "e"], "stop", "max_length(4)"),
    ("stop", [""], "stop.0", "non_empty"),
    ("stop", ["ok", LONG_STOP], "stop.1", "max_tokens(32)"),
    ("seed", -1, "seed", "range(>=0)"),
    ("seed", 1 << 64, "seed", f"range(<{1 << 64})"),
]
WRONG_TYPE = [
    ("job_id", 7, "job_id", "type(string)"),
    ("prompt", ["Hello"], "prompt", "type(string)"),
    ("max_tokens", "8", "max_tokens", "type(int)"),
    ("max_tokens", 1.5, "max_tokens", "type(int)"),
    ("max_tokens", True, "max_tokens", "type(int)"),
    ("temperature", "hot", "temperature", "type(float)"),
    ("top_p", "0.5", "top_p", "type(float)"),
    ("top_k", 2.5, "top_k", "type(int)"),
    ("min_p", None, "min_p", "type(float)"),
    ("repetition_penalty", [1], "repetition_penalty", "type(float)"),
    ("stop", "END", "stop", "type(list)"),
    ("stop", [3], "stop.0", "type(string)"),
    ("seed", "42", "seed", "type(int)"),
]


def post(url: str, path: str = "/execute", **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=TIMEOUT, **kwargs)


def errors_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    """The 400 body's errors by field, after checking its shape."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == "INVALID_REQUEST"
    for error in body["errors"]:
        assert {"field", "constraint", "message"} <= error.keys()
        assert error["field"] in error["message"]
    return {error["field"]: error for error in body["errors"]}


@pytest.mark.parametrize(
    ("field", "value", "error_field", "constraint"),
    OUT_OF_RANGE + WRONG_TYPE,
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else type(v).__name__,
)
def test_a_bad_field_is_named_with_its_constraint(
    server: RunningServer, field: str, value: Any, error_field: str, constraint: str
):
    body = {"job_id": new_job_id("bad"), "prompt": "Hello", "max_tokens": 1, field: value}
    response = post(server.url, json=body)
    errors = errors_of(response)
    assert list(errors) == [error_field]
    error = errors[error_field]
    assert error["constraint"] == constraint
    strings = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    if strings:  # what the request says is never repeated
        assert "value" not in error
        assert not [text for text in strings if len(text) > 2 and text in response.text]
    elif not isinstance(value, list):  # a number, a boolean or null is
        assert error["value"] == str(value)


def test_every_bad_field_is_listed(server: RunningServer):
    body = {
        "prompt": "Hello",
        "max_tokens": 0,
        "temperature": 9,
        "top_p": "high",
        "stop": "END",
        "seed": -5,
        "colour": "blue",
    }
    errors = errors_of(post(server.url, json=body))
    assert errors.keys() == {"job_id", *body.keys()} - {"prompt"}
    assert errors["job_id"]["constraint"] == "required" and "value" not in errors["job_id"]
    assert errors["colour"]["constraint"] == "unknown_field"


def test_job_id_and_prompt_are_required(server: RunningServer):
    errors = errors_of(post(server.url, json={}))
    assert {field: error["constraint"] for field, error in errors.items()} == {
        "job_id": "required",
        "prompt": "required",
    }


@pytest.mark.parametrize(
    ("content", "constraint"),
    [
        (b'{"job_id": "j", "prompt": ', "json"),
        (b"{'job_id': 'j'}", "json"),
        (b'{"job_id": "j", "prompt": "p", "seed": NaN}', "json"),
        (b'{"job_id": "j", "prompt": "p", "seed": ' + b"9" * 5000 + b"}", "json"),
        (b'{"job_id": "j", "prompt": "\xff"}', "utf8"),
        (b"[" * 100_000 + b"]" * 100_000, "max_depth(32)"),
        (b"[1, 2]", "type(model_attributes)"),
        (b'"Hello"', "type(model_attributes)"),
        (b"42", "type(model_attributes)"),
        (b"null", "type(model_attributes)"),
    ],
    ids=[
        "truncated",
        "single-quotes",
        "nan",
        "digits",
        "latin1",
        "deep",
        "array",
        "string",
        "number",
        "null",
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused(
    server: RunningServer, content: bytes, constraint: str
):
    response = post(server.url, content=content, headers={"content-type": "application/json"})
    assert errors_of(response)["body"]["constraint"] == constraint


def test_cancel_validates_its_body(server: RunningServer):
    assert errors_of(post(server.url, "/cancel", json={}))["job_id"]["constraint"] == "required"
    assert "job_id" in errors_of(post(server.url, "/cancel", json={"job_id": 5}))


def chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_one_mebibyte_is_refused_with_413(server: RunningServer, framing: str):
    body = json.dumps({"job_id": "big", "prompt": "a" * MAX_BODY_BYTES}).encode()
    content = body if framing == "content-length" else chunks(body)
    response = post(server.url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "REQUEST_TOO_LARGE"
    assert response.headers["x-correlation-id"]


def test_a_job_id_that_is_running_is_refused_with_409(server: RunningServer):
    with long_job(server.url) as running:
        job_id = running.body["job_id"]
        again = {"job_id": job_id, "prompt": "Hello", "max_tokens": 1}
        response = post(server.url, json=again)
        assert response.status_code == 409
        assert response.json()["code"] == "DUPLICATE_JOB_ID"
        assert running.is_alive()  # the first job is untouched


def test_the_http_schemas_state_the_ranges_the_cli_checks():
    from worker_orcd.sampling_params import BOUNDS
    from worker_orcd.server.openai_api import CompletionRequest
    from worker_orcd.server.schemas import ExecuteRequest

    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for model, names in [
        (ExecuteRequest, ["temperature", "top_p", "top_k", "min_p", "repetition_penalty"]),
        (CompletionRequest, ["temperature", "top_p", "min_p", "repetition_penalty"]),
    ]:
        properties = model.model_json_schema()["properties"]
        for name in names:
            stated = {
                key: properties[name][key] for key in keys.values() if key in properties[name]
            }
            assert stated == {keys[k]: v for k, v in BOUNDS[name].field().items()}, name
