"""Sweep the decode GEMV's tile shapes on the real Qwen2.5-0.5B matrices (device only).

    python3 bench/tile_sweep.py [ROLE ...] [--mmq-rows 8,32,128,2048] [--skip-gemv]
For each of a decode layer's launches and the output head (or those named, as in `down head`),
it captures one CUDA graph of many launches over distinct copies of the matrices, as decode
runs them one after another over weights that are not in L2, and prints the time per launch of
each GEMV configuration against the one `gemv_config` picks. Then the same launches through
`mmq` at several row counts: tiles, K splits and warps against `mmq_config`'s choice.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import astuple
from types import SimpleNamespace

import numpy as np
import torch
import triton.testing
from gguf import GGMLQuantizationType as T

from worker_orcd.cli import int_list
from worker_orcd.engine.llm import resolve_device
from worker_orcd.gguf.synth import random_blocks
from worker_orcd.kernels.integer_dot import units_per_row
from worker_orcd.kernels.quant_gemv import (
    GemvConfig,
    gemv,
    gemv_config,
    gemv_qkv,
    gemv_swiglu,
)
from worker_orcd.kernels.quant_mmq import MmqConfig, mmq, mmq_config

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


def _mmq_roles(rng: np.random.Generator, m: int) -> dict[str, tuple[list, Callable]]:
    """A layer's launches at m rows through `mmq`: `launch(x, matrices, config)`."""
    hidden, ffn = 896, 4864
    norm = (torch.rand(hidden, device="cuda") + 0.5, 1e-6)
    bias = [torch.randn(n, device="cuda") for n in (hidden, 128, 128)]
    residual = torch.randn(m, hidden, device="cuda")
    return {
        "qkv": (
            [
                _matrix(t, n, hidden, rng)
                for t, n in ((T.Q5_0, hidden), (T.Q5_0, 128), (T.Q8_0, 128))
            ],
            lambda x, w, c: mmq(x, w, bias, None, norm, config=c),
        ),
        "o_proj Q5_0": (
            [_matrix(T.Q5_0, hidden, hidden, rng)],
            lambda x, w, c: mmq(x, w, [None], residual, config=c),
        ),
        "gate+up Q5_0": (
            [_matrix(T.Q5_0, ffn, hidden, rng) for _ in range(2)],
            lambda x, w, c: mmq(x, w, [None, None], None, norm, swiglu=True, config=c),
        ),
        "down Q4_K": (
            [_matrix(T.Q4_K, hidden, ffn, rng)],
            lambda x, w, c: mmq(x, w, [None], residual, config=c),
        ),
        "down Q6_K": (
            [_matrix(T.Q6_K, hidden, ffn, rng)],
            lambda x, w, c: mmq(x, w, [None], residual, config=c),
        ),
        "head Q8_0": (
            [_matrix(T.Q8_0, 151936, hidden, rng)],
            lambda x, w, c: mmq(x, w, [None], None, norm, config=c),
        ),
    }


def sweep_mmq(rng: np.random.Generator, names: list[str], rows: list[int]) -> None:
    """`mmq`'s tiles, K splits and warps at decode batches and a prefill chunk, against the
    configuration `mmq_config` picks (the matrices stay in L2 here, except the head's)."""
    for m in rows:
        for role, (matrices, launch) in _mmq_roles(rng, m).items():
            if names and not any(name in role for name in names):
                continue
            n, k = matrices[0].shape
            x = torch.randn(m, k, device="cuda")
            units = units_per_row(int(matrices[0].qtype), k)
            gate = "gate" in role
            sizes = [n] if gate else [w.shape[0] for w in matrices]
            default = mmq_config(m, sizes, units, 1 + gate, x.device)
            configs = {default}
            for bm in (16, 32, 64, 128):
                for bn in (32, 64):
                    if bm > max(16, triton.next_power_of_2(m)) or bm * bn > 8192:
                        continue
                    for split in (1, 2, 4, 8):
                        if split > units // 4:
                            continue
                        for warps in (4, 8) if bm * bn >= 2048 else (2, 4):
                            configs.add(MmqConfig(bm, bn, split, warps))
            results = []
            for config in configs:
                try:
                    call = functools.partial(launch, x, matrices, config)
                    results.append(
                        (
                            triton.testing.do_bench_cudagraph(call, return_mode="median") * 1000,
                            config,
                        )
                    )
                except Exception as error:  # out of shared memory or registers
                    print(f"  {role} m={m} {config}: {type(error).__name__}")
            results.sort(key=lambda result: result[0])
            chosen = next(us for us, config in results if config == default)
            macs = m * n * k * (2 if "gate" in role else 1)
            print(
                f"MMQ {role} m={m}: default {astuple(default)} {chosen:.1f} us "
                f"({2 * macs / chosen / 1e6:.0f} TOPS); best "
                f"{[(round(t, 1), *astuple(c)) for t, c in results[:4]]}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("roles", nargs="*", help="a part of a role's name: qkv, down, head ...")
    parser.add_argument("--mmq-rows", type=int_list, default=[8, 32, 128, 2048])
    parser.add_argument("--skip-gemv", action="store_true")
    args = parser.parse_args()
    resolve_device("cuda")
    rng = np.random.default_rng(0)
    if not args.skip_gemv:
        sweep_gemv(rng, args.roles)
    sweep_mmq(rng, args.roles, args.mmq_rows)


if __name__ == "__main__":
    main()
