"""`GET /metrics`: the worker's Prometheus metrics, with `prometheus-client`.

Per-request figures (outcomes, tokens, latencies) are observed as each job's events go out, so
they time what a client sees; the engine's state (queues, KV usage, preemptions, prefix-cache
hits) and the device's memory are read when Prometheus scrapes. Names follow the spec's
`worker_*` metrics, and vLLM's where the spec has none. Each app has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker_orcd.engine.engine import EngineStats, Event, Failed, Finished, Job, Started, Token

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5, 10, 20, 40, 80)
MS_BUCKETS = tuple(1000 * b for b in LATENCY_BUCKETS)


class _EngineCollector(Collector):
    """The engine's and device's state, read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], vram_bytes: Callable[[], int]):
        self.stats, self.vram_bytes = stats, vram_bytes
        self.started_at = time.monotonic()

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The families without reading the engine, which may not exist yet at registration."""
        return self._families(EngineStats(0, 0, 0.0, 0, 0), 0)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(self.stats(), self.vram_bytes())

    def _families(
        self, stats: EngineStats, vram_bytes: int
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = [
            ("worker_uptime_seconds", "seconds since the worker started", self._uptime()),
            ("worker_vram_bytes", "GPU memory in use (0 on the CPU)", vram_bytes),
            ("worker_num_requests_running", "sequences in the batch", stats.running),
            ("worker_num_requests_waiting", "sequences queued or preempted", stats.waiting),
            ("worker_kv_cache_usage_ratio", "share of KV blocks held", stats.kv_cache_usage),
        ]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        counters = [
            ("worker_preemptions", "sequences preempted for KV blocks", stats.preemptions),
            ("worker_prefix_cache_hit_tokens", "prompt tokens the cache supplied", stats.hits),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)

    def _uptime(self) -> float:
        return time.monotonic() - self.started_at


class Metrics:
    """`stats` and `vram_bytes` are read at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats], vram_bytes: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, vram_bytes))

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, help_text, labels, registry=self.registry)

        def histogram(name: str, help_text: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, help_text, buckets=buckets, registry=self.registry)

        self.requests = counter("worker_requests", "jobs ended, by outcome", ("outcome",))
        self.prompt_tokens = counter("worker_prompt_tokens", "prompt tokens of started jobs")
        self.generated = counter("worker_tokens_generated", "tokens generated")
        self.inference_ms = histogram(
            "worker_inference_duration_ms", "first step to last token, per job", MS_BUCKETS
        )
        self.queue = histogram("worker_request_queue_time_seconds", "accepted to first step")
        self.ttft = histogram("worker_time_to_first_token_seconds", "accepted to first token")
        self.itl = histogram("worker_inter_token_latency_seconds", "between streamed chunks")
        self.e2e = histogram("worker_e2e_request_latency_seconds", "accepted to terminal event")
        self._last: dict[int, float] = {}  # id(job): when its last event went out

    def observe(self, job: Job, event: Event) -> None:
        """A job listener: call it for every event, in order."""
        now = time.perf_counter()
        key = id(job)
        match event:
            case Started(prompt_tokens=prompt_tokens):
                self.prompt_tokens.inc(prompt_tokens)
                self.queue.observe(now - job.accepted_at)
            case Token():
                if key in self._last:
                    self.itl.observe(now - self._last[key])
                else:
                    self.ttft.observe(now - job.accepted_at)
                self._last[key] = now
            case Finished(result=result):
                self.requests.labels("completed").inc()
                self.generated.inc(len(result.token_ids))
                self.inference_ms.observe(1000 * (result.prefill_seconds + result.decode_seconds))
            case Failed(code=code):
                self.requests.labels(code).inc()
        if isinstance(event, Finished | Failed):
            self._last.pop(key, None)
            self.e2e.observe(now - job.accepted_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)
