"""Hostile bodies on every endpoint: each class answered in the endpoint's own shape, never a 5xx,
never with what the request said, and the worker serving as before afterwards."""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sse_client import TIMEOUT, check_protocol, execute, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

MARKER = "zq-private-words-zq"  # in every string sent; in no answer
SURROGATE = "\\ud800"  # a JSON escape of a lone surrogate: valid JSON, not text

# endpoint -> a valid body, with each string field that must be checked
BODIES: dict[str, dict[str, Any]] = {
    "/execute": {"job_id": "j-" + MARKER, "prompt": MARKER, "stop": [MARKER]},
    "/cancel": {"job_id": MARKER},
    "/v1/completions": {"prompt": MARKER, "stop": [MARKER], "user": MARKER, "model": MARKER},
    "/v1/chat/completions": {
        "messages": [
            {"role": "system", "content": MARKER},
            {"role": "user", "content": [{"type": "text", "text": MARKER}]},
        ],
        "stop": MARKER,
    },
}
STRING_FIELDS = [
    ("/execute", ("job_id",)),
    ("/execute", ("prompt",)),
    ("/execute", ("stop", 0)),
    ("/cancel", ("job_id",)),
    ("/v1/completions", ("prompt",)),
    ("/v1/completions", ("stop", 0)),
    ("/v1/completions", ("user",)),
    ("/v1/completions", ("model",)),
    ("/v1/chat/completions", ("messages", 0, "content")),
    ("/v1/chat/completions", ("messages", 1, "content", 0, "text")),
    ("/v1/chat/completions", ("stop",)),
]


def with_surrogate(path: str, location: tuple[str | int, ...]) -> bytes:
    """The endpoint's body, with a lone surrogate escaped inside one string field."""
    body = json.loads(json.dumps(BODIES[path]))
    parent = body
    for part in location[:-1]:
        parent = parent[part]
    parent[location[-1]] = "PLACEHOLDER" + MARKER
    return json.dumps(body).replace("PLACEHOLDER", SURROGATE).encode()


def check_shape(path: str, response: httpx.Response, status: int) -> dict[str, Any]:
    """The error body in the endpoint's own shape, with nothing of the request in it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert MARKER not in response.text
    body = response.json()
    if path.startswith("/v1/"):
        assert body.keys() == {"error"}
        assert body["error"].keys() == {"message", "type", "param", "code"}
    else:
        assert body["code"] in ("INVALID_REQUEST", "REQUEST_TOO_LARGE")
    return body


@pytest.mark.parametrize(
    ("path", "location"),
    STRING_FIELDS,
    ids=[f"{p}:{'.'.join(map(str, f))}" for p, f in STRING_FIELDS],
)
def test_a_lone_surrogate_in_any_string_field_is_a_400_naming_it(
    server: RunningServer, path: str, location: tuple[str | int, ...]
):
    content = with_surrogate(path, location)
    response = httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}
    )
    body = check_shape(path, response, 400)
    field = ".".join(map(str, location))
    if path.startswith("/v1/"):
        assert body["error"]["param"] == field
        assert body["error"]["message"].startswith(f"{field}: not valid Unicode")
    else:
        assert body["errors"] == [
            {
                "field": field,
                "constraint": "unicode",
                "message": body["errors"][0]["message"],
            }
        ]


# (name, raw body, content type): bodies that are not the JSON object an endpoint takes
BAD_BODIES = [
    ("not-json", f"prompt={MARKER}".encode(), "application/json"),
    ("form", f"prompt={MARKER}".encode(), "application/x-www-form-urlencoded"),
    ("text", json.dumps({"prompt": MARKER}).encode(), "text/plain"),
    ("latin1", f'{{"prompt": "{MARKER}\xe9"}}'.encode("latin-1"), "application/json"),
    ("utf16", json.dumps({"prompt": MARKER}).encode("utf-16"), "application/json"),
    ("string", json.dumps(MARKER).encode(), "application/json"),
    ("array", json.dumps([MARKER, MARKER]).encode(), "application/json"),
    ("deep", b'{"prompt": ' + b"[" * 40 + json.dumps(MARKER).encode() + b"]" * 40 + b"}", None),
    ("deeper", b"[" * 200_000 + b"]" * 200_000, "application/json"),
    ("nan", f'{{"prompt": "{MARKER}", "temperature": NaN}}'.encode(), "application/json"),
    ("wrong-type", json.dumps({"prompt": {"text": MARKER}, "job_id": [MARKER]}).encode(), None),
]


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(
    ("raw", "content_type"), [case[1:] for case in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_a_body_of_any_bad_class_is_a_400_in_the_endpoint_s_shape(
    server: RunningServer, path: str, raw: bytes, content_type: str | None
):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(server.url + path, content=raw, headers=headers, timeout=TIMEOUT)
    check_shape(path, response, 400)


@pytest.mark.parametrize("path", list(BODIES))
def test_an_oversized_body_is_a_413_in_the_endpoint_s_shape(server: RunningServer, path: str):
    raw = json.dumps({"prompt": MARKER * (1 << 16)}).encode()
    response = httpx.post(
        server.url + path, content=raw, headers={"content-type": "application/json"}
    )
    body = check_shape(path, response, 413)
    code = body["error"]["code"] if path.startswith("/v1/") else body["code"]
    assert code == "REQUEST_TOO_LARGE"


LONG_STOP = " ".join([MARKER] * 40)
# (endpoint, valid JSON that is refused past the parser, status)
REFUSED = [
    ("/v1/completions", {"prompt": "Hi", "model": MARKER}, 404),
    ("/v1/completions", {"prompt": "Hi", "stop": [LONG_STOP]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": MARKER}]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": MARKER, "content": "Hi"}]}, 400),
    ("/execute", {"job_id": "x", "prompt": "Hi", "stop": [LONG_STOP]}, 400),
    ("/execute", {"job_id": MARKER, "prompt": "Hi", "max_tokens": MARKER}, 400),
    ("/cancel", {"job_id": MARKER, "extra": MARKER}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), REFUSED)
def test_refusals_of_valid_json_repeat_nothing_of_the_request(
    server: RunningServer, path: str, body: dict[str, Any], status: int
):
    check_shape(path, httpx.post(server.url + path, json=body, timeout=TIMEOUT), status)


def test_an_unknown_field_is_named_and_its_value_is_not_repeated(server: RunningServer):
    body = {"job_id": "x", "prompt": "Hi", "colour": MARKER}
    response = httpx.post(server.url + "/execute", json=body, timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {
            "field": "colour",
            "constraint": "unknown_field",
            "message": "colour: Extra inputs are not permitted",
        }
    ]


def raw_exchange(url: str, request: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; the answer, and whether the server then closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer, True  # recv returned b"": closed by the server, within the timeout


def test_conflicting_framing_is_a_400_and_the_connection_closes(server: RunningServer):
    body = json.dumps({"job_id": new_job_id(), "prompt": MARKER}).encode()
    request = (
        b"POST /execute HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body
    )
    answer, closed = raw_exchange(server.url, request)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and closed
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["code"] == "INVALID_REQUEST"
    assert MARKER.encode() not in answer


def test_the_worker_still_serves_after_all_that(server: RunningServer):
    stream = execute(server.url, job_id=new_job_id(), prompt="Hello", max_tokens=3)
    check_protocol(stream)
    assert stream.terminal.event == "end"
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["status"] == "healthy"
