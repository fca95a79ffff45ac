"""Registers, spills, shared memory and tensor-core instructions of launches at the
Qwen2.5-0.5B shapes on sm_90, compiled on this machine without a GPU (Triton's own ptxas and
cuobjdump).

    python3 bench/kernel_resources.py mmq [--rows 128]
    python3 bench/kernel_resources.py attention
    python3 bench/kernel_resources.py layouts
Registers bound the programs an SM holds: on the H100 (2026-12-07, Nsight Compute) `mmq` at
128 rows ran two programs of 4 warps per SM (12.5% occupancy), limited by its registers, and
stalled on memory. `mmq`: each role compiles with the tiles `mmq_config` picks at --rows, once
whole and once split along K. `attention`: the split kernel by (query tile, warps, keys per
step); spilled bytes there rule a configuration out before any device time is spent.
`layouts`: how the split kernel's scores lie among threads at a decode step's tiles and at
prefill's, per GQA group size, as JSON (tests/kernels/test_paged_attention.py reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from gguf import GGMLQuantizationType as T
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon.language._layouts import NVMMADistributedLayout

from worker_orcd.engine.forward_batch import QUERY_TILE
from worker_orcd.kernels.integer_dot import units_per_row
from worker_orcd.kernels.paged_attention import (
    BLOCK_N,
    KV_SPLIT,
    _split_kernel,
    split_warps,
    tile_rows,
)
from worker_orcd.kernels.quant_mmq import MmqConfig, _mmq_kernel, mmq_config

# role: (formats of its matrices, rows of each output, K, SwiGLU, bias, residual)
ROLES = {
    "qkv": ((T.Q5_0, T.Q5_0, T.Q8_0), (896, 128, 128), 896, False, True, False),
    "o_proj": ((T.Q5_0,), (896,), 896, False, False, True),
    "gate+up": ((T.Q5_0, T.Q5_0), (4864,), 896, True, False, False),
    "down Q4_K": ((T.Q4_K,), (896,), 4864, False, False, True),
    "down Q6_K": ((T.Q6_K,), (896,), 4864, False, False, True),
    "head": ((T.Q8_0,), (151936,), 896, False, False, False),
}

# (query tile, warps, keys per inner step) of the attention split kernel
ATTENTION_CONFIGS = ((16, 4, 32), (16, 1, 32), (8, 1, 32), (2, 1, 32), (2, 1, 64), (2, 2, 64),
                     (2, 4, 32), (2, 4, 64), (2, 4, 128), (4, 4, 64))  # fmt: skip


def _type(name: str) -> str:
    if name in ("a_ptr", "b_ptr", "c_ptr"):
        return "*u8"  # GGUF blocks
    if name in ("x_ptr", "arrived_ptr"):
        return "*i32"
    if name == "sums_ptr":
        return "*i64"
    return "*fp32" if name.endswith(("_ptr", "_bias", "_out")) else "i32"


def compile_sm90(fn, constants: dict, types: dict[str, str], options: dict):
    """`fn` compiled for sm_90 with `constants`. Every other argument is typed by `types` (an
    integer where absent) and, as a launch specializes them, taken as a multiple of 16."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
               if t not in ("constexpr", "fp32")}  # fmt: skip
    source = triton.compiler.ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs=aligned,
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> str:
    """Registers per thread, spilled bytes, shared memory, the tensor-core instructions and the
    asynchronous copies (loads software-pipelined ahead of their use) of a compiled kernel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(
        field.split(":") for line in usage.splitlines() if "REG:" in line for field in line.split()
    )
    ptx = compiled.asm["ptx"]
    return (
        f"{fields['REG']} registers, {fields['STACK']} bytes spilled, "
        f"{compiled.metadata.shared} bytes shared, {ptx.count('wgmma.mma_async')} wgmma, "
        f"{ptx.count('mma.sync')} mma.sync, {ptx.count('cp.async.')} cp.async (pipelined loads)"
    )


def mmq_resources(role: str, config: MmqConfig) -> str:
    qtypes, _, k, swiglu, bias, residual = ROLES[role]
    slots = [int(qtypes[min(i, len(qtypes) - 1)]) for i in range(3)]
    constants = dict(
        K=k, QA=slots[0], QB=slots[1], QC=slots[2], MATRICES=len(qtypes), SWIGLU=swiglu,
        HAS_BIAS=bias, HAS_RESIDUAL=residual, BM=config.block_m, BN=config.block_n,
        SPLIT=config.split > 1, PDL=True,
    )  # fmt: skip
    if config.split == 1:
        constants["splits"] = 1  # as a launch specializes an integer argument of 1
    types = {n: _type(n) for n in _mmq_kernel.arg_names}
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
    return resources(compile_sm90(_mmq_kernel, constants, types, options))


def split_kernel_sm90(tile: int, group: int, warps: int | None = None, block_n: int = BLOCK_N):
    """The attention split kernel for tiles of `tile` query tokens and GQA groups of `group`
    heads of 64 dimensions, at the launch's rows and, unless given, its warps."""
    rows = tile_rows(group, tile)
    constants = dict(
        GROUP=group, TILE=tile, HEAD_DIM=64,
        DIM_PAD=64, BLOCK_N=block_n, BLOCK_SIZE=16, KV_SPLIT=KV_SPLIT, ROWS=rows,
    )  # fmt: skip
    types = {n: "*i32" for n in _split_kernel.arg_names if n.endswith("_ptr")}
    types |= {n: "*fp32" for n in ("q_ptr", "out_ptr", "acc_ptr", "best_ptr", "total_ptr")}
    types |= {"keys_ptr": "*fp16", "values_ptr": "*fp16", "scale": "fp32"}
    options = dict(num_warps=warps or split_warps(rows))
    return compile_sm90(_split_kernel, constants, types, options)


def score_columns(tile: int, group: int) -> dict[str, list[int]]:
    """The column offsets (keys) that the registers, lanes and warps of the split kernel's
    scores span, in order, on sm_90: a row's sum of weights adds its keys within a thread in
    register order, then across the lanes, then across the warps. Two tile shapes whose lists
    agree sum a row in one order, whatever tensor-core instruction each compiles to."""
    ttgir = split_kernel_sm90(tile, group).asm["ttgir"]
    # the scores are the first dot's result; its layout is a tensor-core one
    found = re.search(r"dot .*?-> tensor<(\d+)x(\d+)xf32, (#mma\d*)>", ttgir)
    fields = re.search(rf"^{found[3]} = #ttg.nvidia_mma<{{(.*)}}>", ttgir, re.M)[1]
    values = {
        key: [int(n) for n in re.findall(r"\d+", value)]
        for key, value in re.findall(r"(\w+) = (\[.*?\]|\d+)", fields)
    }
    mma = NVMMADistributedLayout(
        [values["versionMajor"][0], values["versionMinor"][0]],
        values["warpsPerCTA"],
        values["instrShape"],
    )
    context = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(context)
    builder = triton._C.libtriton.gluon_ir.GluonOpBuilder(context)
    layout = builder.to_linear_layout(mma._to_ir(builder), [int(found[1]), int(found[2])])
    spans = dict(registers=layout.reg_bases, lanes=layout.lane_bases, warps=layout.warp_bases)
    return {name: [col for _, col in bases if col] for name, bases in spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    kernels = parser.add_subparsers(dest="kernel", required=True)
    kernels.add_parser("mmq").add_argument("--rows", type=int, default=128)
    kernels.add_parser("attention")
    kernels.add_parser("layouts")
    args = parser.parse_args()
    if args.kernel == "attention":
        for tile, warps, block_n in ATTENTION_CONFIGS:
            compiled = split_kernel_sm90(tile, 7, warps, block_n)
            print(f"attention tile={tile} warps={warps} keys={block_n}: "
                  f"{resources(compiled)}", flush=True)  # fmt: skip
        return
    if args.kernel == "layouts":  # {group: {"decode": columns, "prefill": columns}}
        steps = dict(decode=1, prefill=QUERY_TILE)
        groups = (1, 2, 4, 7, 8)
        print(json.dumps({g: {k: score_columns(t, g) for k, t in steps.items()} for g in groups}))
        return
    for role, (qtypes, sizes, k, swiglu, _, _) in ROLES.items():
        units = min(units_per_row(int(q), k) for q in qtypes)
        config = mmq_config(args.rows, list(sizes), units, 1 + swiglu, torch.device("cpu"))
        for split in (1, 2):
            c = dataclasses.replace(config, split=split)
            print(f"{role:10s} rows={args.rows} {c}: {mmq_resources(role, c)}", flush=True)


if __name__ == "__main__":
    main()
