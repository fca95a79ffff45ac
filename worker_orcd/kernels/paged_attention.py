"""Causal attention over the paged KV cache, for prefill chunks and decode tokens alike.

Flash-decoding in one launch. Each sequence's keys split at fixed positions, every
`KV_SPLIT`: one program takes one tile of up to `ForwardBatch.query_tile` consecutive query
tokens of one sequence, one KV head (the query heads of its group are extra rows: GQA reads each
key once) and one split, and walks that split's keys through the block table in steps of
`BLOCK_N` with an online softmax, as flash attention does, on the tensor cores (float16
operands, float32 sums). A tile whose keys fit one split writes its result; otherwise each
program writes its rows' partial results (running max, sum of weights, weighted values), and
the last of the tile's programs to finish, counted by an atomic, merges each row's splits in an
order fixed by its position (mmq's split-K does the same). So a long context spreads over many
programs (decode speed holds as the context grows), a short one costs one split, and neither
a second launch.

Batch-invariant by construction: a row's arithmetic depends on its own query, position and cache
alone. Tiles have one shape in a step of decode tokens alone (one token) and one in any other
step (16 tokens), laid out alike per row (`split_warps`); splits and key steps start at fixed
positions, a key step wholly or partly past a row's position adds exact zeros to it, and a row
merges the splits up to its own position, whatever tile or batch it came in. A token thus gets
the same bits in a prefill chunk as in a decode step. The torch reference is
`layers.attention.paged_attention`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from worker_orcd.engine.forward_batch import ForwardBatch

BLOCK_N = 32  # keys per inner step
KV_SPLIT = 256  # keys per split
MAX_TILE_HEADS = 1 << 16  # (query tile, KV head) pairs of one launch: its arrival counters
MERGE_ROWS = tl.constexpr(16)  # rows a tile's merge takes at once: fewer registers than all of them
MERGE_SPLITS = tl.constexpr(16)  # splits whose maxima a merge loads at once
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
def _rows(rows, first, query_end, context, kv_head, GROUP: tl.constexpr, TILE: tl.constexpr):
    """Rows `rows` of a tile: each row's token, head, whether it is one, and its position."""
    group_index = rows // TILE
    token = first + rows % TILE
    valid = (group_index < GROUP) & (token < query_end)
    position = context - (query_end - token)
    return token, kv_head * GROUP + group_index, valid, position


@triton.jit
def _split_kernel(
    q_ptr, keys_ptr, values_ptr, out_ptr, acc_ptr, best_ptr, total_ptr, arrived_ptr, tables_ptr,
    tile_seqs_ptr, tile_starts_ptr, query_starts_ptr, context_lens_ptr, scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_table, stride_ot, stride_oh, stride_at,
    stride_ah, stride_as, stride_mt, stride_mh,
    GROUP: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_SPLIT: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """One split of one tile's keys for one KV head. A tile whose keys fit one split writes its
    rows' results; otherwise each split writes its partial results, and the last of the tile's
    splits to finish merges them (`_merge`)."""
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
        token, head, valid, position = _rows(rows, first, query_end, context, kv_head, GROUP, TILE)
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

        # A tile whose keys fit one split writes its rows' results, else each split its
        # partial ones (x / 1 is x, exactly; padding rows divide by 1 too)
        splits = last // KV_SPLIT + 1  # the tile's programs that hold keys
        rows_at = tl.where(
            splits == 1,
            out_ptr + token * stride_ot + head * stride_oh,
            acc_ptr + token * stride_at + head * stride_ah + split * stride_as,
        )
        divisor = tl.where((splits == 1) & valid, total, 1.0)
        mask = valid[:, None] & dim_ok[None, :]
        tl.store(rows_at[:, None] + dims[None, :], acc / divisor[:, None], mask)
        if splits > 1:
            stats = token * stride_mt + head * stride_mh + split
            tl.store(best_ptr + stats, best, mask=valid)
            tl.store(total_ptr + stats, total, mask=valid)
            tl.debug_barrier()  # every thread's partials written before the tile counts them
            counter = arrived_ptr + tile * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
                tl.atomic_xchg(counter, 0)  # zero again for the next launch
                _merge(
                    out_ptr, acc_ptr, best_ptr, total_ptr, first, query_end, context, kv_head,
                    splits, stride_ot, stride_oh, stride_at, stride_ah, stride_as, stride_mt,
                    stride_mh, GROUP, TILE, HEAD_DIM, DIM_PAD, KV_SPLIT, ROWS,
                )  # fmt: skip


@triton.jit
def _merge(
    out_ptr, acc_ptr, best_ptr, total_ptr, first, query_end, context, kv_head, splits,
    stride_ot, stride_oh, stride_at, stride_ah, stride_as, stride_mt, stride_mh,
    GROUP: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    KV_SPLIT: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """A tile's rows, MERGE_ROWS at a time, each row's splits up to its own position: first the
    largest of their maxima (MERGE_SPLITS at once: a maximum is exact in any order), then each
    split's sums weighted by exp(its max - that), added one split after another in position
    order, four splits' loads issued before their adds (a long context's merge waits on its
    loads). A split past a row adds exact zeros, so the order depends on the row's position
    alone, and a row of one split gets the bits `acc / total` of a tile of one split. Loads
    bypass L1: other programs wrote the partials during this launch."""
    for chunk in tl.static_range(0, ROWS, MERGE_ROWS):
        rows = chunk + tl.arange(0, MERGE_ROWS)
        token, head, valid, position = _rows(rows, first, query_end, context, kv_head, GROUP, TILE)
        row_splits = tl.where(valid, position // KV_SPLIT + 1, 0)
        stats = token * stride_mt + head * stride_mh
        row_best = tl.full((MERGE_ROWS,), float("-inf"), tl.float32)
        for block in range(0, splits, MERGE_SPLITS):
            ids = block + tl.arange(0, MERGE_SPLITS)
            present = ids[None, :] < row_splits[:, None]
            at = best_ptr + stats[:, None] + ids[None, :]
            best = tl.load(at, present, float("-inf"), cache_modifier=".cg")
            row_best = tl.maximum(row_best, tl.max(best, axis=1))
        row_best = tl.where(valid, row_best, 0.0)  # a padding row's: finite, for exp's sake
        parts = token * stride_at + head * stride_ah
        total = tl.zeros((MERGE_ROWS,), tl.float32)
        acc = tl.zeros((MERGE_ROWS, DIM_PAD), tl.float32)
        for split in range(0, splits, 4):
            w0, t0, a0 = _split_sums(acc_ptr, best_ptr, total_ptr, stats, parts, row_splits,
                                     row_best, split, stride_as, HEAD_DIM, DIM_PAD)  # fmt: skip
            w1, t1, a1 = _split_sums(acc_ptr, best_ptr, total_ptr, stats, parts, row_splits,
                                     row_best, split + 1, stride_as, HEAD_DIM, DIM_PAD)  # fmt: skip
            w2, t2, a2 = _split_sums(acc_ptr, best_ptr, total_ptr, stats, parts, row_splits,
                                     row_best, split + 2, stride_as, HEAD_DIM, DIM_PAD)  # fmt: skip
            w3, t3, a3 = _split_sums(acc_ptr, best_ptr, total_ptr, stats, parts, row_splits,
                                     row_best, split + 3, stride_as, HEAD_DIM, DIM_PAD)  # fmt: skip
            total += t0 * w0
            acc += a0 * w0[:, None]
            total += t1 * w1
            acc += a1 * w1[:, None]
            total += t2 * w2
            acc += a2 * w2[:, None]
            total += t3 * w3
            acc += a3 * w3[:, None]
        outs = token * stride_ot + head * stride_oh
        total = tl.where(valid, total, 1.0)  # a padding row's, never stored
        dims = tl.arange(0, DIM_PAD)
        mask = valid[:, None] & (dims < HEAD_DIM)[None, :]
        tl.store(out_ptr + outs[:, None] + dims[None, :], acc / total[:, None], mask)


@triton.jit
def _split_sums(
    acc_ptr, best_ptr, total_ptr, stats, parts, row_splits, row_best, split, stride_as,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Split `split`'s weight exp(its max - the row's), sum of weights and weighted values for
    each row; zeros for a row that it is past."""
    present = split < row_splits
    best = tl.load(best_ptr + stats + split, present, float("-inf"), cache_modifier=".cg")
    total = tl.load(total_ptr + stats + split, present, 0.0, cache_modifier=".cg")
    dims = tl.arange(0, DIM_PAD)
    at = acc_ptr + (parts + split * stride_as)[:, None] + dims[None, :]
    mask = present[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.exp(best - row_best), total, tl.load(at, mask, 0.0, cache_modifier=".cg")


@functools.cache
def _arrival_counters(device: torch.device) -> torch.Tensor:
    """Zeros that a launch's tiles count their finished splits in and leave as zeros: one
    buffer per device, allocated before any CUDA graph captures a launch that uses it."""
    return torch.zeros(MAX_TILE_HEADS, dtype=torch.int32, device=device)


def partials_bytes(tokens: int, heads: int, head_dim: int, max_context: int) -> int:
    """What a launch over `tokens` query rows allocates for their partial results."""
    return tokens * heads * -(-max_context // KV_SPLIT) * (head_dim + 2) * 4


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
    tiles = batch.tile_seqs.numel()
    if tiles * kv_heads > MAX_TILE_HEADS:
        raise ValueError(f"{tiles} query tiles of {kv_heads} KV heads: at most {MAX_TILE_HEADS}")
    out = torch.empty_like(q)
    # each row's partial result per split, where its tile has several: its weighted values,
    # max score and sum of weights
    acc = torch.empty(tokens, heads, splits, dim, device=q.device, dtype=torch.float32)
    best = torch.empty(tokens, heads, splits, device=q.device, dtype=torch.float32)
    total = torch.empty_like(best)
    _split_kernel[(tiles, kv_heads, splits)](
        q, keys, values, out, acc, best, total, _arrival_counters(q.device), batch.block_tables,
        batch.tile_seqs, batch.tile_starts, batch.query_starts_device, batch.context_lens_device,
        scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        batch.block_tables.stride(0), out.stride(0), out.stride(1), acc.stride(0), acc.stride(1),
        acc.stride(2), best.stride(0), best.stride(1),
        GROUP=group, TILE=batch.query_tile, HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim),
        BLOCK_N=BLOCK_N, BLOCK_SIZE=batch.block_size, KV_SPLIT=KV_SPLIT, ROWS=rows,
        num_warps=split_warps(rows),
    )  # fmt: skip
    return out
