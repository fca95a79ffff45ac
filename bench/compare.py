"""Our figures beside llama.cpp's on one file, from one run's output folder: compare.py OUT.

Reads gpu_check.json (ours), llama_bench.json and llama_bench_pp.json (llama-bench) and
llama_batched.txt (llama-batched-bench's table).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def llama_bench(out: Path) -> dict[str, float]:
    """llama-bench's tokens/s by test name: pp512, tg128, tg128@d2048, ..."""
    rates = {}
    for name in ("llama_bench.json", "llama_bench_pp.json"):
        for test in json.loads((out / name).read_text()):
            depth = test.get("n_depth", 0)
            kind = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}"
            rates[kind + (f"@d{depth}" if depth else "")] = test["avg_ts"]
    return rates


def llama_batched(out: Path) -> dict[int, float]:
    """llama-batched-bench's decode tokens/s (S_TG) by batch size."""
    rates = {}
    for line in (out / "llama_batched.txt").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            rates[int(cells[2])] = float(cells[7])
    return rates


def main(out: Path) -> None:
    ours = json.loads((out / "gpu_check.json").read_text())["bench"]
    theirs = llama_bench(out)
    batched = llama_batched(out)
    g = ours["generated_tokens"]
    rows = [
        (f"pp{ours['prompt_tokens']}", ours["prefill_tokens_per_second"], theirs.get("pp512")),
        (f"tg{g}", ours["decode_tokens_per_second"], theirs.get(f"tg{g}")),
    ]
    for row in ours["depths"]:
        d = row["depth"]
        rows.append((f"pp{d}", row["prefill_tokens_per_second"], theirs.get(f"pp{d}")))
        rows.append((f"tg{g}@d{d}", row["decode_tokens_per_second"], theirs.get(f"tg{g}@d{d}")))
    for row in ours["batches"]:
        b = row["batch_size"]
        rows.append((f"B={b} decode", row["decode_tokens_per_second"], batched.get(b)))
    print(f"{'test':14s} {'worker-orcd':>12s} {'llama.cpp':>12s} {'ratio':>7s}")
    for name, value, other in rows:
        other = other or float("nan")
        print(f"{name:14s} {value:12,.1f} {other:12,.1f} {value / other:7.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
