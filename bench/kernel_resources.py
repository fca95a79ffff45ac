"""Registers, spills and shared memory of `mmq`'s launches at the Qwen2.5-0.5B shapes on
sm_90, compiled on this machine without a GPU (Triton's own ptxas and cuobjdump).

    python3 bench/kernel_resources.py [--rows 128]
Registers bound the programs an SM holds: on the H100 (2026-12-07, Nsight Compute) `mmq` at
128 rows ran two programs of 4 warps per SM (12.5% occupancy), limited by its registers, and
stalled on memory. Each role compiles with the tiles `mmq_config` picks at --rows, once whole
and once split along K.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile

import torch
import triton
from gguf import GGMLQuantizationType as T
from triton.backends.compiler import GPUTarget

from worker_orcd.kernels.integer_dot import units_per_row
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


def _type(name: str) -> str:
    if name in ("a_ptr", "b_ptr", "c_ptr"):
        return "*u8"  # GGUF blocks
    if name in ("x_ptr", "arrived_ptr"):
        return "*i32"
    if name == "sums_ptr":
        return "*i64"
    return "*fp32" if name.endswith(("_ptr", "_bias", "_out")) else "i32"


def resources(role: str, config: MmqConfig) -> str:
    """`config`'s registers per thread, spilled bytes and shared memory for `role`."""
    qtypes, _, k, swiglu, bias, residual = ROLES[role]
    slots = [int(qtypes[min(i, len(qtypes) - 1)]) for i in range(3)]
    constants = dict(
        K=k, QA=slots[0], QB=slots[1], QC=slots[2], MATRICES=len(qtypes), SWIGLU=swiglu,
        HAS_BIAS=bias, HAS_RESIDUAL=residual, BM=config.block_m, BN=config.block_n,
        SPLIT=config.split > 1, PDL=True,
    )  # fmt: skip
    if config.split == 1:
        constants["splits"] = 1  # as a launch specializes an integer argument of 1
    names = _mmq_kernel.arg_names
    signature = {n: "constexpr" if n in constants else _type(n) for n in names}
    # every pointer, row count and width here is a multiple of 16, which a launch specializes
    aligned = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n, t in signature.items()
        if t != "constexpr"
    }
    source = triton.compiler.ASTSource(
        fn=_mmq_kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs=aligned,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
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
    return (
        f"{fields['REG']} registers, {fields['LOCAL']} bytes spilled, "
        f"{compiled.metadata.shared} bytes shared"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=128)
    args = parser.parse_args()
    for role, (qtypes, sizes, k, swiglu, _, _) in ROLES.items():
        units = min(units_per_row(int(q), k) for q in qtypes)
        config = mmq_config(args.rows, list(sizes), units, 1 + swiglu, torch.device("cpu"))
        for split in (1, 2):
            c = dataclasses.replace(config, split=split)
            print(f"{role:10s} rows={args.rows} {c}: {resources(role, c)}", flush=True)


if __name__ == "__main__":
    main()
