"""Causal attention over the paged KV cache, for prefill chunks and decode tokens alike.

One program takes one tile of up to `QUERY_TILE` consecutive query tokens of one sequence and one
KV head, with the query heads of its group as extra rows (GQA: the group reads each key once).
It walks the sequence's keys up to the tile's last position in blocks of `BLOCK_N`, through the
block table, with an online softmax in float32 (flash attention). Batch-invariant by
construction: a row's arithmetic depends on its own query, position and cache alone. The dot
products are exact-order float32 (`input_precision="ieee"`), a key block wholly past a row's
position adds exact zeros, and no split or tile depends on the batch. The torch reference is
`layers.attention.paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.engine.forward_batch import ForwardBatch

BLOCK_N = 32  # keys per inner step


@triton.jit
def _paged_attention_kernel(
    q_ptr, keys_ptr, values_ptr, out_ptr, tables_ptr, tile_seqs_ptr, tile_starts_ptr,
    query_starts_ptr, context_lens_ptr, scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_table, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    first = tl.load(tile_starts_ptr + tile)
    query_end = tl.load(query_starts_ptr + seq + 1)
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, GROUP_PAD * TILE)
    group_index = rows // TILE
    token = first + rows % TILE
    valid = (group_index < GROUP) & (token < query_end)
    position = context - (query_end - token)  # each row's own position
    head = kv_head * GROUP + group_index
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=valid[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    # the tile's last row's position: the keys it reads end there
    last = context - 1 - (query_end - tl.minimum(first + TILE, query_end))
    best = tl.full((GROUP_PAD * TILE,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD * TILE,), tl.float32)
    acc = tl.zeros((GROUP_PAD * TILE, DIM_PAD), tl.float32)
    for start in range(0, last + 1, BLOCK_N):
        key_positions = start + tl.arange(0, BLOCK_N)
        present = key_positions <= last
        block = tl.load(
            tables_ptr + seq * stride_table + key_positions // BLOCK_SIZE, mask=present, other=0
        )
        slots = block * BLOCK_SIZE + key_positions % BLOCK_SIZE
        kv_offsets = slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        kv_mask = present[:, None] & dim_ok[None, :]
        keys = tl.load(keys_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
        seen = valid[:, None] & (key_positions[None, :] <= position[:, None])
        scores = tl.where(seen, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        finite = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - finite[:, None])
        correction = tl.exp(best - finite)
        total = total * correction + tl.sum(weights, axis=1)
        values = tl.load(values_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * correction[:, None] + tl.dot(weights, values, input_precision="ieee")
        best = new_best
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out,
        mask=valid[:, None] & dim_ok[None, :],
    )


def paged_attention_kernel(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: ForwardBatch, scale: float
) -> torch.Tensor:
    """As `layers.attention.paged_attention`: q (tokens, heads, dim) rotated; keys and values
    (slots, kv_heads, dim) of one layer; returns (tokens, heads, dim) in q's dtype."""
    heads, dim = q.shape[1:]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    grid = (batch.tile_seqs.numel(), kv_heads)
    _paged_attention_kernel[grid](
        q, keys, values, out, batch.block_tables, batch.tile_seqs, batch.tile_starts,
        batch.query_starts_device, batch.context_lens_device, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), batch.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), TILE=batch.query_tile,
        HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim), BLOCK_N=BLOCK_N,
        BLOCK_SIZE=batch.block_size,
    )  # fmt: skip
    return out
