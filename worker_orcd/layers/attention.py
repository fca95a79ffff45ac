"""Rotary grouped-query attention over a paged KV cache.

Each token's k and v go to its slot in one pool of blocks (`ForwardBatch.slot_mapping`); each
sequence then attends over its own blocks: on CUDA in `kernels/paged_attention.py`, on the CPU
in `paged_attention`, its reference. `paged_attention` is batch-invariant by construction:
a query's result depends on its values, its position and the cache up to that position alone,
never on which other queries share its step (other sequences, or the rest of its prefill chunk).
Queries go in tiles of `QUERY_TILE` rows; keys in splits of `KV_SPLIT` positions that start at
multiples of `KV_SPLIT`; each split's scores and weighted values are matmuls of one fixed shape
(BLAS picks its kernel, so its summation order, by shape); splits combine in position order by an
online softmax, and a split wholly past a query leaves its result unchanged, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_orcd.engine.forward_batch import QUERY_TILE, ForwardBatch
from worker_orcd.kernels.fused import rope_and_cache_
from worker_orcd.kernels.paged_attention import KV_SPLIT, paged_attention_kernel
from worker_orcd.layers.rotary import RotaryEmbedding


class KVCache:
    """Keys and values for every layer, (layers, slots, kv_heads, head_dim), where slot =
    block * block_size + offset: float16 on a GPU; float32 on the CPU, the reference. Zeroed:
    a masked key's weight is an exact 0, and so is 0 times a value that is not garbage."""

    def __init__(
        self,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ):
        dtype = dtype or kv_dtype(device)
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(
        layers: int, block_size: int, kv_heads: int, head_dim: int, device: torch.device
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * kv_dtype(device).itemsize


def kv_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def paged_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: ForwardBatch, scale: float
) -> torch.Tensor:
    """Causal attention of q (tokens, heads, dim), rotated, over one layer's cache (slots,
    kv_heads, dim), which already holds this step's keys and values; (tokens, heads, dim)."""
    heads, dim = q.shape[1:]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for i in range(batch.num_seqs):
        start, end = batch.query_starts[i], batch.query_starts[i + 1]
        context = batch.context_lens[i]
        n = end - start
        tiles, splits = -(-n // QUERY_TILE), -(-context // KV_SPLIT)
        rows = tiles * QUERY_TILE
        slots = _slots(batch.tables[i], batch.block_size, splits * KV_SPLIT, q.device)
        k = keys[slots].float().view(splits, KV_SPLIT, kv_heads, dim).permute(0, 2, 3, 1)
        v = values[slots].float().view(splits, KV_SPLIT, kv_heads, dim).transpose(1, 2)
        # (tiles, kv_heads, group * QUERY_TILE, dim): one fixed-shape matmul per (tile, head)
        qt = F.pad(q[start:end].float(), (0, 0, 0, 0, 0, rows - n))
        qt = qt.view(tiles, QUERY_TILE, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
        qt = qt.reshape(tiles, kv_heads, group * QUERY_TILE, dim)
        positions = torch.arange(rows, device=q.device) + context - n
        positions = torch.where(positions < context, positions, -1)  # padding sees nothing
        positions = positions.view(tiles, 1, 1, QUERY_TILE, 1).expand(-1, -1, group, -1, -1)
        positions = positions.reshape(tiles, 1, group * QUERY_TILE, 1)
        best = torch.full((tiles, kv_heads, group * QUERY_TILE, 1), -torch.inf, device=q.device)
        total = torch.zeros_like(best)
        acc = torch.zeros(tiles, kv_heads, group * QUERY_TILE, dim, device=q.device)
        for j in range(splits):
            key_positions = torch.arange(j * KV_SPLIT, (j + 1) * KV_SPLIT, device=q.device)
            scores = torch.matmul(qt, k[j]) * scale
            scores = scores.masked_fill(key_positions > positions, -torch.inf)
            new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
            finite = torch.where(new_best == -torch.inf, 0.0, new_best)
            weights = torch.exp(scores - finite)
            correction = torch.exp(best - finite)
            total = total * correction + weights.sum(-1, keepdim=True)
            acc = acc * correction + torch.matmul(weights, v[j])
            best = new_best
        result = (acc / total).view(tiles, kv_heads, group, QUERY_TILE, dim)
        result = result.permute(0, 3, 1, 2, 4).reshape(rows, heads, dim)
        out[start:end] = result[:n].to(out.dtype)
    return out


def _slots(table: list[int], block_size: int, positions: int, device) -> torch.Tensor:
    """The cache slots of positions 0 to `positions - 1`; past the table, block 0's (masked)."""
    blocks = -(-positions // block_size)
    padded = torch.tensor(table[:blocks] + [0] * (blocks - len(table)), device=device)
    offsets = torch.arange(block_size, device=device)
    return (padded[:, None] * block_size + offsets).view(-1)[:positions]


class Attention(nn.Module):
    def __init__(
        self,
        layer_index: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
    ):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rotary = rotary
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
    ) -> torch.Tensor:
        """q (tokens, heads * dim); k, v (tokens, kv_heads * dim), not yet rotated, at
        `batch.positions`; returns (tokens, heads * dim)."""
        tokens = q.shape[0]
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        q, k, v = (t.view(tokens, -1, self.head_dim) for t in (q, k, v))
        if q.is_cuda:
            rope_and_cache_(
                q, k, v, batch.positions, self.rotary.tables, keys, values, batch.slot_mapping
            )
            return paged_attention_kernel(q, keys, values, batch, self.scale).reshape(tokens, -1)
        q = self.rotary(q, batch.positions)
        keys.index_copy_(0, batch.slot_mapping, self.rotary(k, batch.positions).to(keys.dtype))
        values.index_copy_(0, batch.slot_mapping, v.to(keys.dtype))
        return paged_attention(q, keys, values, batch, self.scale).reshape(tokens, -1)
