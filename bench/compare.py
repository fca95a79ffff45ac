"""Our bench figures beside llama-bench's on one file: compare.py OURS.json LLAMA.json."""

from __future__ import annotations

import json
import sys


def main(ours_path: str, llama_path: str) -> None:
    with open(ours_path) as ours_file, open(llama_path) as llama_file:
        ours, tests = json.load(ours_file)["bench"], json.load(llama_file)
    theirs = {}
    for test in tests:
        name = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}"
        theirs[name] = test["avg_ts"]
    rows = [
        (f"pp{ours['prompt_tokens']}", ours["prefill_tokens_per_second"]),
        (f"tg{ours['generated_tokens']}", ours["decode_tokens_per_second"]),
    ]
    print(f"{'test':8s} {'worker-orcd':>12s} {'llama.cpp':>12s} {'ratio':>7s}")
    for name, value in rows:
        other = theirs.get(name, float("nan"))
        print(f"{name:8s} {value:12,.1f} {other:12,.1f} {value / other:7.2f}")
    print(f"weights {ours['weights_bytes']:,} B; file tensors {ours['file_tensor_bytes']:,} B")


if __name__ == "__main__":
    main(*sys.argv[1:3])
