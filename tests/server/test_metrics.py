"""Operations: `/metrics` in Prometheus' format, the queue cap's 503, the KV pool's report at
startup, and the performance fields of `execute_end`."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import RunningServer
from tests.server.sse_client import StreamReader, check_protocol, counting, execute, new_job_id

SERVER_ARGS = ("--max-num-seqs", "1", "--max-queued", "1", "--ctx-size", "512")
TIMEOUT = 30.0

SPEC_METRICS = {
    "worker_vram_bytes": "gauge",
    "worker_requests": "counter",
    "worker_tokens_generated": "counter",
    "worker_inference_duration_ms": "histogram",
    "worker_uptime_seconds": "gauge",
    "worker_time_to_first_token_seconds": "histogram",
    "worker_inter_token_latency_seconds": "histogram",
    "worker_e2e_request_latency_seconds": "histogram",
    "worker_request_queue_time_seconds": "histogram",
    "worker_num_requests_running": "gauge",
    "worker_num_requests_waiting": "gauge",
    "worker_kv_cache_usage_ratio": "gauge",
    "worker_prompt_tokens": "counter",
    "worker_prefix_cache_hit_tokens": "counter",
    "worker_preemptions": "counter",
}


def scrape(url: str) -> dict[str, dict[str, float]]:
    """Every sample by metric family: {family: {sample name and labels: value}}."""
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(response.text):
        samples = {}
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
        families[family.name] = (family.type, samples)
    return families


def test_metrics_carry_every_series_and_count_a_request(module_server: RunningServer):
    before = scrape(module_server.url)
    assert {name: kind for name, (kind, _) in before.items() if name in SPEC_METRICS} == (
        SPEC_METRICS
    )
    prompt = "The same prompt, twice over, so that the second hits the prefix cache. " * 3
    for _ in range(2):
        # greedy: an unseeded draw may end a request early at its EOS, with fewer tokens
        stream = execute(
            module_server.url, job_id=new_job_id(), prompt=prompt, max_tokens=5, temperature=0.0
        )
        check_protocol(stream)
    after = scrape(module_server.url)

    def value(family: str, sample: str) -> float:
        return after[family][1].get(sample, 0.0) - before[family][1].get(sample, 0.0)

    assert value("worker_requests", "worker_requests_total{outcome=completed}") == 2
    assert value("worker_tokens_generated", "worker_tokens_generated_total{}") == 10
    assert value("worker_prefix_cache_hit_tokens", "worker_prefix_cache_hit_tokens_total{}") >= 16
    assert (
        value("worker_e2e_request_latency_seconds", "worker_e2e_request_latency_seconds_count{}")
        == 2
    )
    assert (
        value("worker_inter_token_latency_seconds", "worker_inter_token_latency_seconds_count{}")
        >= 2
    )
    assert after["worker_num_requests_running"][1]["worker_num_requests_running{}"] == 0
    assert after["worker_uptime_seconds"][1]["worker_uptime_seconds{}"] > 0


def test_past_the_queue_cap_a_job_gets_503_with_retry_after(module_server: RunningServer):
    url = module_server.url
    running = StreamReader(url, counting(new_job_id("running")))
    running.start()
    running.wait_for("token")
    queued = StreamReader(url, counting(new_job_id("queued"), max_tokens=2))
    queued.start()
    try:
        for _ in range(100):  # until the second job is accepted (queued behind the first)
            health = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
            if health["waiting"] == 1:
                break
        assert health["running"] == 1 and health["waiting"] == 1
        refused = httpx.post(f"{url}/execute", json=counting(new_job_id()), timeout=TIMEOUT)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["code"] == "QUEUE_FULL" and refused.json()["retriable"] is True
        v1 = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=TIMEOUT
        )
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "QUEUE_FULL"
    finally:
        httpx.post(f"{url}/cancel", json={"job_id": running.body["job_id"]}, timeout=TIMEOUT)
        running.join(30)
        queued.join(60)
    assert queued.result().terminal.event == "end"  # the queued job ran once a slot was free


def test_startup_reports_the_kv_pool_and_execute_end_its_performance(
    module_server: RunningServer,
):
    stream = execute(module_server.url, job_id=new_job_id("perf"), prompt="Hello", max_tokens=3)
    check_protocol(stream)
    logs = module_server.logs()
    pool = next(line for line in logs if line["event"] == "kv_cache")
    assert pool["tokens"] == pool["blocks"] * pool["block_size"] >= 512
    assert pool["max_full_context_sequences"] == pool["tokens"] // 512
    end = [line for line in logs if line["event"] == "execute_end"][-1]
    assert end["outcome"] == "completed" and end["tokens_out"] == 3
    assert end["tokens_in"] >= 1 and end["vram_bytes"] == 0
    assert 0 <= end["queue_ms"] <= end["first_token_ms"] and end["decode_time_ms"] >= 0
