"""`/health` (M0-W-1320), correlation ids, narration logs (M0-W-1900) and the OpenAPI schema."""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sse_client import TIMEOUT, check_protocol, execute, long_job, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

HEALTH_TYPES = {
    "status": str,
    "model": str,
    "resident": bool,
    "quant_kind": str,
    "vram_bytes_used": int,
    "tokenizer_kind": str,
    "vocab_size": int,
    "context_length": int,
    "device": str,
    "uptime_seconds": int,
    "running": int,
    "waiting": int,
    "kv_cache_usage": float,
}
HEALTH_VALUES = {
    "status": "healthy",
    "quant_kind": "Q4_1",
    "tokenizer_kind": "gguf-bpe",
    "vocab_size": 49152,
    "context_length": 8192,
    "device": "cpu",
}
HEALTH_BOUND_SECONDS = 0.5  # the spec's M1 target is 10 ms; this CPU is slow and shared
NARRATION_KEYS = {
    "timestamp",
    "level",
    "event",
    "worker_id",
    "model_ref",
    "gpu_device",
    "correlation_id",
}
STARTUP_EVENTS = ["startup", "model_load_start", "model_load_complete", "ready"]


def health(url: str, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).get(f"{url}/health", timeout=TIMEOUT)


def test_health_reports_the_loaded_model(server: RunningServer):
    body = health(server.url).json()
    assert {field: type(body[field]) for field in HEALTH_TYPES} == HEALTH_TYPES
    assert {field: body[field] for field in HEALTH_VALUES} == HEALTH_VALUES
    assert body["resident"] is False and body["vram_bytes_used"] == 0  # CPU: nothing in VRAM
    assert body["uptime_seconds"] >= 0 and body["model"]


def test_health_answers_quickly_while_a_job_runs(server: RunningServer):
    latencies = []
    with long_job(server.url) as job, httpx.Client() as client:
        for _ in range(10):
            start = time.perf_counter()
            response = health(server.url, client)
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200 and response.json()["status"] == "healthy"
        assert job.is_alive()
    print(
        f"\nhealth during a job: median {1000 * statistics.median(latencies):.1f} ms, "
        f"max {1000 * max(latencies):.1f} ms over {len(latencies)} calls"
    )
    assert max(latencies) < HEALTH_BOUND_SECONDS


def test_the_openapi_schema_lists_the_endpoints(server: RunningServer):
    paths = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()["paths"]
    assert {"/execute", "/health", "/cancel"} <= paths.keys()
    assert "post" in paths["/execute"] and "post" in paths["/cancel"] and "get" in paths["/health"]


# Requests of every kind: each response must carry the correlation id header.
REQUESTS: dict[str, dict[str, Any]] = {
    "health": {"method": "GET", "url": "/health"},
    "invalid": {"method": "POST", "url": "/execute", "json": {"job_id": ""}},
    "cancel": {"method": "POST", "url": "/cancel", "json": {"job_id": "nobody"}},
    "too-large": {"method": "POST", "url": "/execute", "content": b"x" * ((1 << 20) + 1)},
    "not-found": {"method": "GET", "url": "/nowhere"},
    "sse": {"method": "POST", "url": "/execute"},  # a one-token job, filled in per call
}
NOT_IDS = {"missing": None, "empty": "", "not-a-uuid": "not-a-uuid", "too-long": "a" * 1000}


def send(url: str, kind: str, correlation_id: str | None) -> httpx.Response:
    request = dict(REQUESTS[kind])
    if kind == "sse":
        request["json"] = {"job_id": new_job_id(), "prompt": "Hi", "max_tokens": 1}
    headers = {} if correlation_id is None else {"X-Correlation-Id": correlation_id}
    request["url"] = url + request["url"]
    return httpx.request(**request, headers=headers, timeout=TIMEOUT)


@pytest.mark.parametrize("kind", REQUESTS)
def test_a_valid_correlation_id_is_echoed(server: RunningServer, kind: str):
    given = str(uuid.uuid4())
    assert send(server.url, kind, given).headers["x-correlation-id"] == given


@pytest.mark.parametrize("kind", REQUESTS)
@pytest.mark.parametrize("given", NOT_IDS.values(), ids=NOT_IDS.keys())
def test_an_invalid_correlation_id_is_replaced_by_a_fresh_uuid4(
    server: RunningServer, kind: str, given: str | None
):
    echoed = send(server.url, kind, given).headers["x-correlation-id"]
    assert echoed != given
    assert uuid.UUID(echoed).version == 4 and str(uuid.UUID(echoed)) == echoed


def test_narration_follows_a_job_without_its_prompt(server: RunningServer):
    correlation_id = str(uuid.uuid4())
    prompt = f"Confidential marmalade memo {uuid.uuid4().hex}:"
    job_id = new_job_id("narrated")
    stream = execute(
        server.url, {"X-Correlation-Id": correlation_id}, job_id=job_id, prompt=prompt, max_tokens=3
    )
    check_protocol(stream, job_id)
    lines = server.logs()
    for line in lines:
        assert line.keys() >= NARRATION_KEYS, line
    events = [line["event"] for line in lines]
    positions = [events.index(event) for event in STARTUP_EVENTS]
    assert positions == sorted(positions)
    progress = [line["percent"] for line in lines if line["event"] == "model_load_progress"]
    assert progress == [0, 25, 50, 75, 100]
    assert events.index("model_load_start") < events.index("model_load_progress")
    assert max(i for i, e in enumerate(events) if e == "model_load_progress") < positions[2]

    job = [line for line in lines if line.get("job_id") == job_id]
    assert [line["event"] for line in job] == ["execute_start", "execute_end"]
    assert {line["correlation_id"] for line in job} == {correlation_id}
    assert job[0]["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert job[1]["outcome"] == "completed"
    raw = server.log_path.read_text()
    assert prompt not in raw and "marmalade" not in raw
