"""Sweep the decode GEMV's tile shapes on the real Qwen2.5-0.5B matrices (device only).

    python3 bench/tile_sweep.py [ROLE ...]
For each of a decode layer's launches and the output head (or those named, as in `down head`),
it captures one CUDA graph of many launches over distinct copies of the matrices, as decode
runs them one after another over weights that are not in L2, and prints the time per launch of
each configuration against the one `gemv_config` picks. Then prefill's matmul (dequantize +
cuBLAS) at a few row counts.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import astuple
from types import SimpleNamespace

import numpy as np
import torch
import triton.testing
from gguf import GGMLQuantizationType as T

from bench.gpu_check import SHAPES
from worker_orcd.engine.llm import resolve_device
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels.quant_gemv import GemvConfig, gemv, gemv_config, gemv_qkv, gemv_swiglu
from worker_orcd.kernels.quant_matmul import quant_matmul

COLD_BYTES = 256 << 20  # copies per role: enough weight bytes that none stays in L2
WARPS = (2, 4, 8)
MAX_TILE_ELEMENTS = 65536  # rows per program times row length: more spills registers


def _matrix(qtype: T, n: int, k: int, rng: np.random.Generator) -> SimpleNamespace:
    blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
    return SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))


def _copy(matrix: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(blocks=matrix.blocks.clone(), qtype=matrix.qtype, shape=matrix.shape)


def _roles(rng: np.random.Generator) -> dict[str, tuple[list[SimpleNamespace], Callable]]:
    """Each role's matrices and its launch, `launch(x, matrices, config)`."""
    hidden, ffn = 896, 4864
    norm = (torch.rand(hidden, device="cuda") + 0.5, 1e-6)
    bias = [torch.randn(n, device="cuda") for n in (hidden, 128, 128)]
    residual = torch.randn(1, hidden, device="cuda")
    return {
        "qkv Q5_0/Q5_0/Q8_0": (
            [
                _matrix(t, n, hidden, rng)
                for t, n in ((T.Q5_0, hidden), (T.Q5_0, 128), (T.Q8_0, 128))
            ],
            lambda x, m, c: gemv_qkv(x, m, bias, norm, config=c),
        ),
        "o_proj Q5_0": (
            [_matrix(T.Q5_0, hidden, hidden, rng)],
            lambda x, m, c: gemv(x, m[0], residual=residual, config=c),
        ),
        "gate+up Q5_0": (
            [_matrix(T.Q5_0, ffn, hidden, rng) for _ in range(2)],
            lambda x, m, c: gemv_swiglu(x, *m, norm, config=c),
        ),
        "down Q4_K": (
            [_matrix(T.Q4_K, hidden, ffn, rng)],
            lambda x, m, c: gemv(x, m[0], residual=residual, config=c),
        ),
        "down Q6_K": (
            [_matrix(T.Q6_K, hidden, ffn, rng)],
            lambda x, m, c: gemv(x, m[0], residual=residual, config=c),
        ),
        "head Q8_0": (
            [_matrix(T.Q8_0, 151936, hidden, rng)],
            lambda x, m, c: gemv(x, m[0], norm=norm, config=c),
        ),
    }


def _us_per_launch(launch: Callable, sets: list, x: torch.Tensor, config: GemvConfig) -> float:
    launch(x, sets[0], config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for matrices in sets:
            launch(x, matrices, config)
    ms = triton.testing.do_bench(graph.replay, return_mode="median")
    return ms * 1000 / len(sets)


def sweep_gemv(rng: np.random.Generator, names: list[str]) -> None:
    for role, (matrices, launch) in _roles(rng).items():
        if names and not any(name in role for name in names):
            continue
        n, k = matrices[0].shape
        role_bytes = sum(m.blocks.numel() for m in matrices)
        copies = max(2, COLD_BYTES // role_bytes)
        sets = [matrices] + [[_copy(m) for m in matrices] for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda")
        default = gemv_config(matrices[0].qtype, n, k, len(matrices))
        results = []
        tiles = [b for b in (2, 4, 8, 16, 32, 64) if b * k <= MAX_TILE_ELEMENTS and b * 16 <= n]
        for config in [GemvConfig(b, w, q) for b in tiles for w in WARPS for q in (False, True)]:
            try:
                results.append((_us_per_launch(launch, sets, x, config), config))
            except Exception as error:  # a tile too large for the registers
                print(f"  {role} {config}: {type(error).__name__}")
        results.sort(key=lambda result: result[0])
        chosen = next(us for us, config in results if config == default)
        best_us, best = results[0]
        print(
            f"GEMV {role} ({copies} copies): best {best_us:.2f} us {best} "
            f"({role_bytes / best_us / 1e3:.0f} GB/s); default {default} {chosen:.2f} us; "
            f"top 5 {[(round(t, 2), *astuple(c)) for t, c in results[:5]]}",
            flush=True,
        )
        del sets
        torch.cuda.empty_cache()


def sweep_prefill(rng: np.random.Generator) -> None:
    for qtype, n, k in SHAPES:
        if n > 65536:
            continue
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        for m in (16, 64, 512):
            x = torch.randn(m, k, device="cuda")
            call = functools.partial(quant_matmul, x, blocks, qtype, (n, k))
            us = triton.testing.do_bench_cudagraph(call, return_mode="median") * 1000
            print(f"prefill {qtype.name} {n}x{k} m={m}: {us:.1f} us")


def main() -> None:
    resolve_device("cuda")  # tf32 matmuls, as in serving
    rng = np.random.default_rng(0)
    names = sys.argv[1:]
    sweep_gemv(rng, names)
    if not names:
        sweep_prefill(rng)


if __name__ == "__main__":
    main()
