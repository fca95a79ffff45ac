"""Causal attention over the paged KV cache, for prefill chunks and decode tokens alike.

Flash-decoding in two launches. The first splits each sequence's keys at fixed positions, every
`KV_SPLIT`: one program takes one tile of up to `ForwardBatch.query_tile` consecutive query
tokens of one sequence, one KV head (the query heads of its group are extra rows: GQA reads each
key once) and one split, and walks that split's keys through the block table in steps of
`BLOCK_N` with an online softmax, as flash attention does, on the tensor cores (float16
operands, float32 sums). It writes each row's partial result: its running max, its sum of
weights and its weighted values. The second launch merges a row's splits, many at a time, in an
order fixed by its position. So a long context spreads over many programs (decode speed holds as
the context grows), and a short one costs one split.

Batch-invariant by construction: a row's arithmetic depends on its own query, position and cache
alone. Tiles have one shape in a step of decode tokens alone (one token) and one in any other
step (16 tokens), laid out alike per row (`split_warps`); splits and key steps start at fixed
positions, a key step wholly or partly past a row's position adds exact zeros to it, and a row
merges the splits up to its own position, whatever tile or batch it came in. A token thus gets
the same bits in a prefill chunk as in a decode step. The torch reference is
`layers.attention.paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.engine.forward_batch import ForwardBatch

BLOCK_N = 32  # keys per inner step
KV_SPLIT = 256  # keys per split
MERGE_CHUNK = 16  # splits a row's merge loads at once
MIN_ROWS = 16  # a tile's least rows (query token, head of its group): one tensor-core tile


def tile_rows(group: int, query_tile: int) -> int:
    """Rows of a tile of `query_tile` tokens for GQA groups of `group` heads (padded)."""
    return max(MIN_ROWS, triton.next_power_of_2(group) * query_tile)


def split_warps(rows: int) -> int:
    """Warps of the split kernel for tiles of `rows` rows. A row's bits depend on how its scores
    lie among threads: its sum of weights adds its keys within a thread in register order, then
    across lanes. One warp over 16 or 32 rows (mma.sync) and a warpgroup over 64 or more (wgmma
    on Hopper, 16 rows a warp) lay a row's keys out alike, so a decode token in a one-token tile
    (16 rows: 1.6-2.3x faster, `bench/kernel_probe.py attention`) is summed as in a prefill
    tile of 16 tokens; 4 warps over 16 or 32 rows would spread its keys across warps.
    `test_decode_and_prefill_tiles_sum_a_row_in_one_order_on_hopper` compares the two layouts
    as compiled for sm_90, `test_a_row_is_the_same_alone_and_in_any_tile` the bits on a GPU."""
    return 4 if rows >= 64 else 1


@triton.jit
def _split_kernel(
    q_ptr, keys_ptr, values_ptr, acc_ptr, best_ptr, total_ptr, tables_ptr, tile_seqs_ptr,
    tile_starts_ptr, query_starts_ptr, context_lens_ptr, scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_table, stride_at, stride_ah, stride_as,
    stride_mt, stride_mh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_SPLIT: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seqs_ptr + tile)
    first = tl.load(tile_starts_ptr + tile)
    query_end = tl.load(query_starts_ptr + seq + 1)
    context = tl.load(context_lens_ptr + seq)
    # the tile's last row's position: the keys it reads end there
    last = context - 1 - (query_end - tl.minimum(first + TILE, query_end))
    split_start = split * KV_SPLIT
    if split_start <= last:
        rows = tl.arange(0, ROWS)
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
        ).to(tl.float16)

        best = tl.full((ROWS,), float("-inf"), tl.float32)
        total = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DIM_PAD), tl.float32)
        split_end = tl.minimum(split_start + KV_SPLIT, last + 1)
        for start in range(split_start, split_end, BLOCK_N):
            key_positions = start + tl.arange(0, BLOCK_N)
            present = key_positions <= last
            block = tl.load(
                tables_ptr + seq * stride_table + key_positions // BLOCK_SIZE,
                mask=present,
                other=0,
            )
            slots = block * BLOCK_SIZE + key_positions % BLOCK_SIZE
            kv_offsets = slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
            kv_mask = present[:, None] & dim_ok[None, :]
            keys = tl.load(keys_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float16)
            scores = tl.dot(q, tl.trans(keys)) * scale
            seen = valid[:, None] & (key_positions[None, :] <= position[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            finite = tl.where(new_best == float("-inf"), 0.0, new_best)
            weights = tl.exp(scores - finite[:, None])
            correction = tl.exp(best - finite)
            total = total * correction + tl.sum(weights, axis=1)
            values = tl.load(values_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float16)
            acc = acc * correction[:, None] + tl.dot(weights.to(tl.float16), values)
            best = new_best
        part = token * stride_at + head * stride_ah + split * stride_as
        tl.store(
            acc_ptr + part[:, None] + dims[None, :], acc, mask=valid[:, None] & dim_ok[None, :]
        )
        stat = token * stride_mt + head * stride_mh + split
        tl.store(best_ptr + stat, best, mask=valid)
        tl.store(total_ptr + stat, total, mask=valid)


@triton.jit
def _merge_kernel(
    acc_ptr, best_ptr, total_ptr, out_ptr, token_seqs_ptr, query_starts_ptr, context_lens_ptr,
    stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, KV_SPLIT: tl.constexpr,
    MERGE_CHUNK: tl.constexpr,
):  # fmt: skip
    """One row (token, head): its splits up to its position, MERGE_CHUNK at a time (their
    loads in parallel, not one split after another): first the largest of their maxima, then
    each split's sums weighted by exp(its max - that), added lane by lane in chunk order and
    across lanes at the end. The order depends on the row's position alone."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(token_seqs_ptr + token)
    position = tl.load(context_lens_ptr + seq) - (tl.load(query_starts_ptr + seq + 1) - token)
    splits = position // KV_SPLIT + 1
    lanes = tl.arange(0, MERGE_CHUNK)
    dims = tl.arange(0, DIM_PAD)
    stats = token * stride_mt + head * stride_mh
    top = tl.full((MERGE_CHUNK,), float("-inf"), tl.float32)
    for first in range(0, splits, MERGE_CHUNK):
        split = first + lanes
        top = tl.maximum(top, tl.load(best_ptr + stats + split, split < splits, float("-inf")))
    best = tl.max(top, axis=0)  # finite: split 0 holds key 0, which every row sees
    total = tl.zeros((MERGE_CHUNK,), tl.float32)
    acc = tl.zeros((MERGE_CHUNK, DIM_PAD), tl.float32)
    parts = acc_ptr + token * stride_at + head * stride_ah + dims[None, :]
    for first in range(0, splits, MERGE_CHUNK):
        split = first + lanes
        present = split < splits
        weight = tl.exp(tl.load(best_ptr + stats + split, present, float("-inf")) - best)
        total += tl.load(total_ptr + stats + split, present, 0.0) * weight
        mask = present[:, None] & (dims < HEAD_DIM)[None, :]
        acc += tl.load(parts + split[:, None] * stride_as, mask, 0.0) * weight[:, None]
    out = tl.sum(acc, axis=0) / tl.sum(total, axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out, mask=dims < HEAD_DIM)


def paged_attention_kernel(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: ForwardBatch, scale: float
) -> torch.Tensor:
    """As `layers.attention.paged_attention`: q (tokens, heads, dim) rotated; keys and values
    (slots, kv_heads, dim) of one layer; returns (tokens, heads, dim) in q's dtype."""
    tokens, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    splits = -(-batch.max_context // KV_SPLIT)
    rows = tile_rows(group, batch.query_tile)
    # each row's partial result per split: its weighted values, max score and sum of weights
    acc = torch.empty(tokens, heads, splits, dim, device=q.device, dtype=torch.float32)
    best = torch.empty(tokens, heads, splits, device=q.device, dtype=torch.float32)
    total = torch.empty_like(best)
    grid = (batch.tile_seqs.numel(), kv_heads, splits)
    _split_kernel[grid](
        q, keys, values, acc, best, total, batch.block_tables, batch.tile_seqs, batch.tile_starts,
        batch.query_starts_device, batch.context_lens_device, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), batch.block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), best.stride(0), best.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), TILE=batch.query_tile,
        HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim), BLOCK_N=BLOCK_N,
        BLOCK_SIZE=batch.block_size, KV_SPLIT=KV_SPLIT, ROWS=rows, num_warps=split_warps(rows),
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(tokens, heads)](
        acc, best, total, out, batch.token_seqs, batch.query_starts_device,
        batch.context_lens_device, acc.stride(0), acc.stride(1), acc.stride(2), best.stride(0),
        best.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim), KV_SPLIT=KV_SPLIT,
        MERGE_CHUNK=MERGE_CHUNK, num_warps=2,
    )  # fmt: skip
    return out
