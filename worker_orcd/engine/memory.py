"""Device memory: what a model needs before it loads, and where its tensors live after.

The spec's VRAM-only policy (section 2) asks a worker to refuse a model its GPU cannot hold
before loading anything (M0-W-1020) and to check periodically that every weight is still device
memory (M0-W-1012).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.cuda_graph import MIXED_TOKENS
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.kernels.paged_attention import partials_bytes
from worker_orcd.layers.quant_linear import QuantWeight

# Activations, logits and allocator slack for a step of a few thousand tokens.
WORKSPACE_BYTES = 512 << 20
KV_BYTES_PER_VALUE = 2  # float16 keys and values on a GPU


class InsufficientVram(RuntimeError):
    """The GPU lacks the memory the model needs; nothing was loaded (code INSUFFICIENT_VRAM)."""

    def __init__(self, plan: VramPlan, available: int, device: torch.device, path: Path):
        self.plan, self.available = plan, available
        super().__init__(
            f"Insufficient VRAM: required {plan.total:,} bytes (weights {plan.weights:,}, "
            f"KV cache {plan.kv_cache:,}, workspace {plan.workspace:,}), available "
            f"{available:,} bytes on GPU {device.index or 0}, model {path}"
        )


@dataclass(frozen=True)
class VramPlan:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def plan_vram(gguf: GGUFFile, context_length: int) -> VramPlan:
    """The least a model needs: its weights (their GGUF bytes), KV for one sequence of
    `context_length` positions in every layer, and a fixed workspace."""
    arch = gguf.architecture
    meta = gguf.metadata
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        meta.get(
            f"{arch}.attention.key_length", int(meta.get(f"{arch}.embedding_length", 0)) // heads
        )
    )
    kv_cache = 2 * layers * context_length * kv_heads * head_dim * KV_BYTES_PER_VALUE
    weights = sum(info.nbytes for info in gguf.tensors.values())
    return VramPlan(weights, kv_cache, WORKSPACE_BYTES)


def check_fits(plan: VramPlan, device: torch.device, path: Path) -> None:
    free, _ = torch.cuda.mem_get_info(device)
    if plan.total > free:
        raise InsufficientVram(plan, free, device, path)


def kv_pool_blocks(model: nn.Module, config: EngineConfig) -> int:
    """Blocks for the KV pool. On CUDA, what `gpu_memory_utilization` of the GPU leaves after
    everything allocated so far (the weights), the workspace and the CUDA graphs' attention
    partials; on the CPU, one full context (float32: memory there is the host's, and tests run
    many small sequences)."""
    block_bytes = model.kv_block_bytes(config.block_size)
    device = model.device
    if device.type != "cuda":
        return config.blocks_for(config.max_model_len)
    free, total = torch.cuda.mem_get_info(device)
    c = model.config
    # a graph sizes attention's splits by the longest context, whatever its batch's contexts
    graph_rows = max(min(config.max_num_batched_tokens, MIXED_TOKENS[-1]), config.max_num_seqs)
    partials = partials_bytes(graph_rows, c.num_heads, c.head_dim, config.max_model_len)
    budget = int(total * config.gpu_memory_utilization) - (total - free)
    budget -= WORKSPACE_BYTES + partials
    return max(budget // block_bytes, config.blocks_for(config.max_model_len))


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the model holds: weight blocks, norm weights, biases, rotary tables."""
    tensors = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, QuantWeight):
                tensors.append(value.blocks)
            elif isinstance(value, torch.Tensor):
                tensors.append(value)
    return tensors


def resident(model: nn.Module, device: torch.device) -> bool:
    """True when every tensor of the model lives on `device` (no host fallback anywhere)."""
    return all(tensor.device == device for tensor in model_tensors(model))


def vram_bytes_used(device: torch.device) -> int:
    """The GPU's used memory as the driver reports it (total minus free), 0 on the CPU."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free
