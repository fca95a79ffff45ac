"""Linear layers and embeddings whose weights stay in their GGUF blocks.

`QuantWeight` is the one place a weight's bytes live. On the CPU (tests and development) a layer
keeps a dequantized float32 copy for speed, and the layers below are plain torch: they are the
reference, batch-invariant through `tiled_linear`. On CUDA VRAM holds only the blocks, and the
RMSNorm before a layer, its bias, residual and SwiGLU ride in the matmul's launches: one row, or
a few rows in an integer format (up to eight over large matrices), goes through `quant_gemv`,
more rows through `quant_mmq` (the same bits per row as the GEMV), and formats that have no
integer path through `quant_matmul`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from worker_orcd.gguf.dequant import dequantize
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.kernels.integer_dot import INTEGER_DOT
from worker_orcd.kernels.quant_gemv import MAX_ROWS, gemv, gemv_qkv, gemv_swiglu
from worker_orcd.kernels.quant_matmul import dequantize_rows, quant_matmul
from worker_orcd.kernels.quant_mmq import mmq
from worker_orcd.layers.activation import SiluAndMul
from worker_orcd.layers.norm import RMSNorm

CHUNK_BYTES = 1 << 20  # spec M0-W-1222
ROW_TILE = 8  # rows per matmul on the CPU
# The GEMV computes a token's outputs after another's in each program. Over a small matrix (q,
# k, v, o: few programs) that is slower than `mmq` from 4 rows; over the FFN's and the head's
# it is faster up to MAX_ROWS (bench/kernel_probe.py `rows`, H100: at 8 rows q 16.4 against
# 9.1 us in `mmq`, gate 9.9 against 22.3).
SMALL_MATRIX = 2 << 20  # elements, of all the matrices of one launch
SMALL_MATRIX_ROWS = 3


def tiled_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T as one matmul of ROW_TILE rows per tile (the last one padded). BLAS picks
    its kernel, and so its summation order, by shape: with one call of one shape for every
    tile, a row's result does not depend on how many rows share its step. (One `bmm` over all
    tiles is not that: torch runs a batch of one as a plain GEMM, which MKL rounds differently
    from its batched kernel on AVX-512 machines, for some shapes.)"""
    rows = x.shape[0]
    tiles = F.pad(x, (0, 0, 0, -rows % ROW_TILE))
    out = torch.empty(tiles.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, tiles.shape[0], ROW_TILE):
        torch.mm(tiles[start : start + ROW_TILE], weight.T, out=out[start : start + ROW_TILE])
    return out[:rows]


def stream_to_device(
    data: np.ndarray, device: torch.device, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """Copy bytes from the memory map to `device` one chunk at a time (spec M0-W-1221/1222):
    host memory holds at most one chunk, never a whole tensor or file, on its way to the GPU."""
    blocks = torch.empty(len(data), dtype=torch.uint8, device=device)
    for start in range(0, len(data), chunk_bytes):
        chunk = torch.from_numpy(np.array(data[start : start + chunk_bytes]))
        blocks[start : start + len(chunk)].copy_(chunk)
    return blocks


@dataclass(frozen=True)
class QuantWeight:
    blocks: torch.Tensor  # uint8, the tensor's raw GGUF bytes
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first: (out_features, in_features) for a matrix

    @classmethod
    def load(cls, gguf: GGUFFile, name: str, device: torch.device) -> QuantWeight:
        info = gguf.tensors[name]
        return cls(stream_to_device(gguf.tensor_data(name), device), info.qtype, info.shape)

    @property
    def row_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_size * type_size

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.shape)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Only the requested rows of a matrix: an embedding lookup touches a few rows, not all."""
        selected = self.blocks.view(self.shape[0], self.row_bytes)[rows]
        return dequantize(selected, self.qtype, (*rows.shape, self.shape[-1]))


def _stack_dense(parts: list[QuantLinear]) -> torch.Tensor | None:
    """On the CPU, one float32 matrix of the parts' rows, so that one matmul serves them all;
    the parts let go of their own copies."""
    if parts[0]._dense is None:
        return None
    dense = torch.cat([p._dense for p in parts])
    for p in parts:
        p._dense = None
    return dense


def _fused_norm(norm: RMSNorm | None) -> tuple[torch.Tensor, float] | None:
    return None if norm is None else (norm.weight, norm.eps)


def _kernel(x: torch.Tensor, weights: list[QuantWeight]) -> str | None:
    """Which CUDA kernel takes the rows of x: "gemv" for one row, or a few rows of the integer
    formats (each weight read once for them all); "mmq" for more rows of those; None for the
    rest (`quant_matmul`, or torch on the CPU). The integer kernels give a row the same bits
    whichever of them computes it, so the choice is speed alone."""
    if not x.is_cuda:
        return None
    rows = x.shape[0]
    if rows == 1:
        return "gemv"
    if not all(w.qtype in INTEGER_DOT for w in weights):
        return None
    small = sum(w.shape[0] * w.shape[1] for w in weights) < SMALL_MATRIX
    return "gemv" if rows <= (SMALL_MATRIX_ROWS if small else MAX_ROWS) else "mmq"


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self._dense = weight.dequantize() if weight.blocks.device.type == "cpu" else None

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """norm(x) @ W.T + bias + residual, each part when given; x (tokens, in_features). On
        CUDA one token's norm, bias and residual ride in the matmul's launch."""
        w = self.weight
        kernel = _kernel(x, [w])
        if kernel == "gemv":
            return gemv(x, w, self.bias, residual, _fused_norm(norm))
        if kernel == "mmq":
            return mmq(x, [w], [self.bias], residual, _fused_norm(norm))[0]
        if norm is not None:
            x = norm(x)
        if self._dense is None:
            return quant_matmul(x, w.blocks, w.qtype, w.shape, self.bias, residual)
        y = tiled_linear(x, self._dense)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else residual + y


class QKVLinear(nn.Module):
    """The q, k and v projections of one input: one launch for a decode token."""

    def __init__(self, q: QuantLinear, k: QuantLinear, v: QuantLinear):
        super().__init__()
        self.projections = nn.ModuleList([q, k, v])
        if any(p.bias is not None for p in self.projections):  # the kernel takes all or none
            for p in self.projections:
                if p.bias is None:
                    p.bias = torch.zeros(p.weight.shape[0], device=p.weight.blocks.device)
        self._sizes = [p.weight.shape[0] for p in self.projections]
        self._dense = _stack_dense(list(self.projections))

    def forward(
        self, x: torch.Tensor, norm: RMSNorm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = [p.weight for p in self.projections]
        biases = [p.bias for p in self.projections]
        kernel = _kernel(x, weights)
        if kernel is not None:
            launch = gemv_qkv if kernel == "gemv" else mmq
            q, k, v = launch(x, weights, biases, norm=_fused_norm(norm))
            return q, k, v
        if norm is not None:
            x = norm(x)
        if self._dense is None:
            q, k, v = (p(x) for p in self.projections)
            return q, k, v
        y = tiled_linear(x, self._dense)
        if self.projections[0].bias is not None:
            y = y + torch.cat([p.bias for p in self.projections])
        q, k, v = y.split(self._sizes, dim=-1)
        return q, k, v


class QuantSwiGLU(nn.Module):
    """SwiGLU's first half, silu(x @ G.T) * (x @ U.T): one launch for a decode token."""

    def __init__(self, gate: QuantLinear, up: QuantLinear):
        super().__init__()
        self.gate = gate
        self.up = up
        self.act = SiluAndMul()
        self._dense = _stack_dense([gate, up])

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        weights = [self.gate.weight, self.up.weight]
        kernel = _kernel(x, weights)
        if kernel == "gemv":
            return gemv_swiglu(x, *weights, _fused_norm(norm))
        if kernel == "mmq":
            return mmq(x, weights, [None, None], None, _fused_norm(norm), swiglu=True)[0]
        if norm is not None:
            x = norm(x)
        if self._dense is None:
            return self.act(self.gate(x), self.up(x))
        return self.act(*tiled_linear(x, self._dense).chunk(2, dim=-1))


class QuantEmbedding(nn.Module):
    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if ids.is_cuda:
            return dequantize_rows(w.blocks, w.qtype, w.shape, ids)
        return w.dequantize_rows(ids)
