"""Matmuls of many rows over formats that have no integer path (F16, BF16, F32, Q5_K, MXFP4),
and embedding lookups: `y = x @ W.T` with W in its GGUF blocks.

A Triton kernel dequantizes the matrix from its blocks into a transient float32 scratch (one
matrix at a time, inside the planned workspace), and cuBLAS multiplies in tf32. VRAM holds the
weights only as their blocks. The integer formats go through `quant_gemv` (one row) and
`quant_mmq` (several), which give a row the same bits whatever its company; this path does not
(cuBLAS picks its kernel by shape). The same kernel gathers rows for embedding lookups. The
torch reference is `x @ dequantize(blocks).T`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from worker_orcd.kernels.blocks import SUPPORTED, dequant_tile


@triton.jit
def _dequantize_kernel(
    w_ptr, rows_ptr, out_ptr, N, K, row_bytes,
    QTYPE: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    row_mask = offs_n < N
    source = offs_n
    if GATHER:
        source = tl.load(rows_ptr + offs_n, mask=row_mask, other=0)
    tile = dequant_tile(w_ptr, source, row_mask, k0, row_bytes, K, QTYPE, BLOCK_N, BLOCK_K)
    mask = row_mask[:, None] & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], tile, mask=mask)


def dequantize_rows(
    blocks: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of the (N, K) matrix held as GGUF `blocks` as float32: all of them, or those at
    the indices `rows` (an embedding lookup), in one launch."""
    if qtype not in SUPPORTED:
        raise ValueError(f"no quantized matmul for {qtype.name}")
    n, k = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    count = n if rows is None else rows.numel()
    out = torch.empty((count, k), device=blocks.device, dtype=torch.float32)
    block_n, block_k = 16, 256
    grid = (triton.cdiv(count, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](
        blocks, out if rows is None else rows, out, count, k, k // block_size * type_size,
        QTYPE=int(qtype), GATHER=rows is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def quant_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` (M, K) float32 times the (N, K) weight held as GGUF `blocks`, plus `bias` (N,) and
    `residual` (M, N) when given (added by cuBLAS's epilogue): (M, N) float32."""
    weight = dequantize_rows(blocks, qtype, shape)
    added = residual if residual is not None else bias
    y = x @ weight.T if added is None else torch.addmm(added, x, weight.T)
    if residual is not None and bias is not None:
        y += bias
    return y
