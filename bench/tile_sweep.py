"""Sweep the quantized matmul's tile shapes on the real Qwen2.5-0.5B matrices (device only).

    python3 bench/tile_sweep.py
Prints, per shape and row count, each configuration's median time and weight bandwidth.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton.testing

from bench.gpu_check import SHAPES
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels.quant_matmul import TileConfig, quant_matmul, tile_config

GEMV = [TileConfig(1, n, k, w) for n in (1, 2, 4, 8) for k in (256, 512) for w in (2, 4, 8)]
GEMM = [
    TileConfig(*c)
    for c in [(64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 32, 8),
              (64, 64, 64, 4), (32, 64, 64, 4), (128, 128, 64, 8)]
]  # fmt: skip


def main() -> None:
    rng = np.random.default_rng(0)
    for qtype, n, k in SHAPES:
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        for m, configs in ((1, GEMV), (512, GEMM)):
            x = torch.randn(m, k, device="cuda")
            results = []
            for config in configs:
                call = functools.partial(quant_matmul, x, blocks, qtype, (n, k), config=config)
                results.append((triton.testing.do_bench(call, return_mode="median"), config))
            results.sort(key=lambda r: r[0])
            default = tile_config(m, n, k)
            chosen = next(ms for ms, c in results if c == default)
            best_ms, best = results[0]
            print(
                f"{qtype.name} {n}x{k} m={m}: best {best_ms * 1000:.1f} us {best} "
                f"({blocks.numel() / best_ms / 1e6:.0f} GB/s); default {chosen * 1000:.1f} us"
            )


if __name__ == "__main__":
    main()
