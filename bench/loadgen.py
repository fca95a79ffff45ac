"""Load on any OpenAI-compatible server: many streams at once, a mix of prompt and output lengths.

    python3 bench/loadgen.py --url http://127.0.0.1:8000 --concurrency 128 --duration 60

Each of `--concurrency` workers sends streaming `/v1/completions` requests back to back until
`--duration` seconds have passed (or `--requests` are sent), each with a prompt of random words
and an output length drawn from `--mix` (`PROMPT_WORDS:MAX_TOKENS,...`), `ignore_eos` set so
that lengths hold. With `--cancel-fraction`, that share of requests hangs up partway (a client
that disconnects). It reports output throughput (tokens by each stream's final `usage`),
time to first token (TTFT), inter-token latency (ITL: between text chunks, which a server may
join when a client falls behind) and end-to-end latency at p50/p95/p99, and counts every
request as ok, cancelled (by us) or failed: an HTTP error, an `error` chunk, or a stream that
ended without `finish_reason` and `[DONE]` (a lost request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as"]


@dataclass
class Outcome:
    ok: bool = False
    cancelled: bool = False
    error: str | None = None
    chunks: int = 0  # chunks with text received (a server may join several tokens in one)
    tokens: int = 0  # the final usage chunk's completion_tokens, else the chunks
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    seconds: float = 0.0


def random_words(count: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(count))


def parse_mix(text: str) -> list[tuple[int, int]]:
    pairs = [part.split(":") for part in text.split(",")]
    return [(int(words), int(tokens)) for words, tokens in pairs]


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split only where SSE ends them (httpx's `aiter_lines` also splits
    at U+2028 and other Unicode line breaks, which may occur inside a token's text)."""
    buffer = b""
    async for data in response.aiter_bytes():
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str | None,
    prompt: str,
    max_tokens: int,
    hang_up: int = 0,
) -> Outcome:
    """Stream one completion; with `hang_up` > 0, leave after that many content chunks."""
    body = {
        **({"model": model} if model else {}),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.8,
        "ignore_eos": True,
    }
    outcome = Outcome()
    start = last = time.perf_counter()
    finished = done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    outcome.error = f"error chunk: {chunk['error']}"
                    return outcome
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
                choice = chunk["choices"][0] if chunk["choices"] else {}
                now = time.perf_counter()
                if choice.get("text"):
                    if outcome.ttft is None:
                        outcome.ttft = now - start
                    else:
                        outcome.itls.append(now - last)
                    last = now
                    outcome.chunks += 1
                    if hang_up and outcome.chunks >= hang_up:
                        outcome.cancelled = True
                        return outcome
                finished = finished or choice.get("finish_reason") is not None
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    finally:
        outcome.seconds = time.perf_counter() - start
    outcome.tokens = outcome.tokens or outcome.chunks
    if not (finished and done):
        outcome.error = "the stream ended without finish_reason and [DONE]"
    else:
        outcome.ok = True
    return outcome


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        values = values * 2 or [float("nan")] * 2
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49] * 1000, "p95": cuts[94] * 1000, "p99": cuts[98] * 1000}


async def run(args: argparse.Namespace) -> dict:
    mix = parse_mix(args.mix)
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + args.duration
    budget = [args.requests]  # requests left to send, shared by the workers

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and budget[0] != 0:
            budget[0] -= 1
            words, max_tokens = random.choice(mix)
            hang_up = random.randint(1, max_tokens) if random.random() < args.cancel_fraction else 0
            outcomes.append(
                await one_request(
                    client, args.url, args.model, random_words(words), max_tokens, hang_up
                )
            )

    limits = httpx.Limits(max_connections=args.concurrency + 8)
    timeout = httpx.Timeout(args.timeout, connect=30)
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    seconds = time.perf_counter() - started
    errors = [o.error for o in outcomes if o.error]
    return {
        "concurrency": args.concurrency,
        "seconds": seconds,
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "cancelled": sum(o.cancelled for o in outcomes),
        "failed": len(errors),
        "errors": errors[:10],
        "output_tokens_per_second": sum(o.tokens for o in outcomes) / seconds,
        "ttft_ms": percentiles([o.ttft for o in outcomes if o.ttft is not None]),
        "itl_ms": percentiles([t for o in outcomes for t in o.itls]),
        "e2e_ms": percentiles([o.seconds for o in outcomes if o.ok]),
    }


def client_parser(description: str) -> argparse.ArgumentParser:
    """The options of every client script here; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="sent as `model` when given")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_client(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[dict]]
) -> dict | None:
    """The report of `run(args)`, seeded; with --json printed as one object, and None."""
    random.seed(args.seed)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
        return None
    return report


def main() -> None:
    parser = client_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    parser.add_argument("--requests", type=int, default=-1, help="at most this many (-1: any)")
    parser.add_argument("--mix", default="16:16,64:32,200:64", help="PROMPT_WORDS:MAX_TOKENS,...")
    parser.add_argument("--cancel-fraction", type=float, default=0.0)
    report = run_client(parser.parse_args(), run)
    if report is None:
        return
    print(
        f"{report['requests']} requests in {report['seconds']:.1f} s at concurrency "
        f"{report['concurrency']}: {report['ok']} ok, {report['cancelled']} cancelled, "
        f"{report['failed']} failed; {report['output_tokens_per_second']:,.1f} output tok/s"
    )
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        cuts = report[name]
        print(f"  {name:8s} p50 {cuts['p50']:9.1f}  p95 {cuts['p95']:9.1f}  p99 {cuts['p99']:9.1f}")
    for error in report["errors"]:
        print(f"  error: {error}")


if __name__ == "__main__":
    main()
