"""Linear layers and embeddings whose weights stay in their GGUF blocks.

`QuantWeight` is the one place a weight's bytes live. On the CPU (tests and development) a layer
keeps a dequantized float32 copy for speed; on CUDA it never does: the Triton kernel dequantizes
tiles in registers inside the matmul, so VRAM holds only the blocks.
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
from worker_orcd.kernels.quant_matmul import quant_matmul

CHUNK_BYTES = 1 << 20  # spec M0-W-1222


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


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self._dense = weight.dequantize() if weight.blocks.device.type == "cpu" else None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + bias, plus `residual` when given (fused into the matmul on CUDA)."""
        if self._dense is not None:
            y = F.linear(x, self._dense, self.bias)
            return y if residual is None else residual + y
        w = self.weight
        flat = residual.reshape(-1, w.shape[0]) if residual is not None else None
        y = quant_matmul(x.reshape(-1, x.shape[-1]), w.blocks, w.qtype, w.shape, self.bias, flat)
        return y.view(*x.shape[:-1], w.shape[0])


class QuantEmbedding(nn.Module):
    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize_rows(ids)
