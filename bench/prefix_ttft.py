"""Time to first token with and without a prefix-cache hit, on any OpenAI-compatible server.

    python3 bench/prefix_ttft.py --url http://127.0.0.1:8000 [--prefix-words 1000] [--trials 5]

Each trial sends a prompt of `--prefix-words` random words (about a token each) after a fresh
random nonce (so that no earlier run's prompt is cached) and a short tail, then the same prefix
with another tail: the first request computes the whole prompt, the second only what follows
the cached prefix. After one unmeasured trial (compilation, graphs), prints the median time to
first token of the first and the second requests and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import uuid

import httpx
from loadgen import client_parser, one_request, random_words, run_client


async def run(args: argparse.Namespace) -> dict:
    firsts: list[float] = []
    seconds: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        for trial in range(args.trials + 1):
            prefix = f"{uuid.uuid4().hex} {random_words(args.prefix_words)}"  # never seen before
            pair = []
            for _ in range(2):
                outcome = await one_request(
                    client, args.url, args.model, f"{prefix} {random_words(8)}", args.max_tokens
                )
                if not outcome.ok or outcome.ttft is None:
                    raise SystemExit(f"request failed: {outcome.error}")
                pair.append(outcome.ttft * 1000)
            if trial:  # the first trial warms up
                firsts.append(pair[0])
                seconds.append(pair[1])
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {
        "prefix_words": args.prefix_words,
        "trials": args.trials,
        "ttft_ms_first": first,
        "ttft_ms_second": second,
        "ratio": first / second,
    }


def main() -> None:
    parser = client_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-words", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4)
    report = run_client(parser.parse_args(), run)
    if report is None:
        return
    print(
        f"prefix of {report['prefix_words']} words, median of {report['trials']} trials: "
        f"TTFT {report['ttft_ms_first']:.1f} ms without a cached prefix, "
        f"{report['ttft_ms_second']:.1f} ms with it ({report['ratio']:.1f}x)"
    )


if __name__ == "__main__":
    main()
