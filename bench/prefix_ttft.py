"""Time to first token with and without a prefix-cache hit, on any OpenAI-compatible server.

    python3 bench/prefix_ttft.py --url http://127.0.0.1:8000 [--prefix-words 1000] [--trials 5]

Each trial sends a prompt of `--prefix-words` random words (about a token each) and a short
tail, then the same prefix with another tail: the first request computes the whole prompt, the
second only what follows the cached prefix. After one unmeasured trial (compilation, graphs),
prints the median time to first token of the first and the second requests and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics

import httpx
from loadgen import one_request, random_words


async def run(args: argparse.Namespace) -> dict:
    firsts: list[float] = []
    seconds: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        for trial in range(args.trials + 1):
            prefix = random_words(args.prefix_words)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="sent as `model` when given")
    parser.add_argument("--prefix-words", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    random.seed(args.seed)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"prefix of {report['prefix_words']} words, median of {report['trials']} trials: "
        f"TTFT {report['ttft_ms_first']:.1f} ms without a cached prefix, "
        f"{report['ttft_ms_second']:.1f} ms with it ({report['ratio']:.1f}x)"
    )


if __name__ == "__main__":
    main()
