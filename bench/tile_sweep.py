"""Sweep the decode GEMV's tile shapes on the real Qwen2.5-0.5B matrices (device only).

    python3 bench/tile_sweep.py
Prints, per shape, the best configurations (median time in a CUDA graph, weight bandwidth)
against the one `gemv_config` picks, then prefill's matmul (dequantize + cuBLAS) at a few row
counts.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import torch
import triton.testing

from bench.gpu_check import SHAPES
from worker_orcd.engine.llm import resolve_device
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels.quant_gemv import GemvConfig, gemv, gemv_config
from worker_orcd.kernels.quant_matmul import quant_matmul

GEMV = [GemvConfig(n, k, w) for n in (1, 2, 4, 8, 16) for k in (256, 512, 1024) for w in (2, 4)]


def _us(call) -> float:
    return triton.testing.do_bench_cudagraph(call, return_mode="median") * 1000


def main() -> None:
    resolve_device("cuda")  # tf32 matmuls, as in serving
    rng = np.random.default_rng(0)
    for qtype, n, k in SHAPES:
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        matrix = SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))
        x = torch.randn(1, k, device="cuda")
        results = sorted(
            ((_us(functools.partial(gemv, x, matrix, config=c)), c) for c in GEMV),
            key=lambda result: result[0],
        )
        default = _us(functools.partial(gemv, x, matrix))
        best_us, best = results[0]
        print(
            f"GEMV {qtype.name} {n}x{k}: best {best_us:.1f} us {best} "
            f"({blocks.numel() / best_us / 1e3:.0f} GB/s); default {gemv_config(qtype, n, k)} "
            f"{default:.1f} us; top 3 {[(round(t, 1), c) for t, c in results[:3]]}"
        )
        if n > 65536:
            continue
        for m in (16, 64, 512):
            x = torch.randn(m, k, device="cuda")
            us = _us(functools.partial(quant_matmul, x, blocks, qtype, (n, k)))
            print(f"prefill {qtype.name} {n}x{k} m={m}: {us:.1f} us")


if __name__ == "__main__":
    main()
