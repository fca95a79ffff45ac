"""What one forward pass needs to know of the step's batch, and nothing of sequences or blocks.

The runner builds it from the scheduler's chunks; the model passes it down to attention, which
alone reads the paging fields. Tokens of one sequence are contiguous, sequences in the order
scheduled. Host copies of the per-sequence fields serve the CPU reference; device copies serve
the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_orcd.engine.scheduler import ScheduledChunk

QUERY_TILE = 16  # attention takes a sequence's query tokens this many at a time


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    slot_mapping: torch.Tensor  # (tokens,): the cache slot each token's k and v go to
    block_tables: torch.Tensor  # (seqs, max blocks), padded with block 0
    query_starts: list[int]  # (seqs + 1,): sequence i's tokens are rows [starts[i], starts[i+1])
    context_lens: list[int]  # (seqs,): positions each sequence's last token sees, itself included
    tables: list[list[int]]  # host block tables
    block_size: int
    logits_indices: torch.Tensor  # (sampled,): the rows whose next token is drawn
    # The attention kernel's work list: tile i is rows tile_starts[i].. of sequence tile_seqs[i].
    tile_seqs: torch.Tensor
    tile_starts: torch.Tensor
    query_starts_device: torch.Tensor
    context_lens_device: torch.Tensor
    query_tile: int = QUERY_TILE

    @classmethod
    def build(
        cls,
        chunks: list[ScheduledChunk],
        block_size: int,
        device: torch.device,
    ) -> ForwardBatch:
        ids, positions, slots, starts, lens, tables, sampled = [], [], [], [0], [], [], []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            span = range(chunk.start, end)
            ids.extend(seq.token_ids[chunk.start : end])
            positions.extend(span)
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            starts.append(starts[-1] + chunk.num_tokens)
            lens.append(end)
            tables.append(list(table))
            if chunk.samples:
                sampled.append(starts[-1] - 1)
        tile_seqs, tile_starts = [], []
        for i in range(len(chunks)):
            for row in range(starts[i], starts[i + 1], QUERY_TILE):
                tile_seqs.append(i)
                tile_starts.append(row)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            input_ids=tensor(ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_tables=tensor(padded),
            query_starts=starts,
            context_lens=lens,
            tables=tables,
            block_size=block_size,
            logits_indices=tensor(sampled),
            tile_seqs=tensor(tile_seqs),
            tile_starts=tensor(tile_starts),
            query_starts_device=tensor(starts),
            context_lens_device=tensor(lens),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
