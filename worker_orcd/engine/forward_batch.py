"""What one forward pass needs to know of the step's batch, and nothing of sequences or blocks.

The runner builds it from the scheduler's chunks; the model passes it down to attention, which
alone reads the paging fields. Tokens of one sequence are contiguous, sequences in the order
scheduled. Host copies of the per-sequence fields serve the CPU reference; device copies serve
the kernels. Every integer field travels to the device in one copy, packed end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker_orcd.engine.scheduler import ScheduledChunk

QUERY_TILE = 16  # attention takes a sequence's query tokens this many at a time, but one at a
# time in a step of decode tokens alone (one token per sequence: smaller tiles compute faster)


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued behind the device's work without waiting for it: a
    copy to a GPU goes through pinned memory (from pageable memory it may wait for the stream,
    and the host would stop running a step ahead)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


@dataclass
class HostBatch:
    """The batch as host lists. The `pad_*` methods fill it to the fixed sizes of a CUDA
    graph with rows that it computes and nobody reads: they write only to the spare block, which
    no sequence owns, and read nothing of anyone's."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    tile_seqs: list[int] = field(default_factory=list)
    tile_starts: list[int] = field(default_factory=list)
    query_starts: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, chunks: list[ScheduledChunk], block_size: int) -> HostBatch:
        batch = cls()
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            table = seq.block_table
            slots = [
                table[p // block_size] * block_size + p % block_size
                for p in range(chunk.start, end)
            ]
            batch._add(
                seq.token_ids[chunk.start : end], chunk.start, slots, list(table), chunk.samples
            )
        return batch

    def pad_decode(self, num_seqs: int, block: int, block_size: int) -> None:
        """One-token sequences up to `num_seqs` (a decode graph draws a token for each row)."""
        while len(self.context_lens) < num_seqs:
            self._add([0], 0, [block * block_size], [block], samples=True)

    def pad_mixed(
        self, num_tokens: int, num_seqs: int, num_tiles: int, block: int, block_size: int
    ) -> None:
        """Up to `num_tokens` tokens in one more sequence, then empty sequences up to
        `num_seqs`, then tiles of the last (empty: its every split skips) up to `num_tiles`,
        and drawn rows (row 0, unread) up to `num_seqs`. Needs two sequences to spare: the
        padding tokens' and an empty last one."""
        n = num_tokens - len(self.input_ids)
        slots = [block * block_size + p % block_size for p in range(n)]
        self._add([0] * n, 0, slots, [block] * -(-n // block_size), samples=False)
        while len(self.context_lens) < num_seqs:
            self._add([], 0, [], [block], samples=False)
        self.tile_seqs += [num_seqs - 1] * (num_tiles - len(self.tile_seqs))
        self.tile_starts += [num_tokens] * (num_tiles - len(self.tile_starts))
        self.logits_indices += [0] * (num_seqs - len(self.logits_indices))

    def _add(
        self, ids: list[int], start: int, slots: list[int], table: list[int], samples: bool
    ) -> None:
        first = self.query_starts[-1]
        self.input_ids.extend(ids)
        self.positions.extend(range(start, start + len(ids)))
        self.slot_mapping.extend(slots)
        end = first + len(ids)
        if samples:
            self.logits_indices.append(end - 1)
        for row in range(first, end, QUERY_TILE):
            self.tile_seqs.append(len(self.context_lens))
            self.tile_starts.append(row)
        self.query_starts.append(end)
        self.context_lens.append(start + len(ids))
        self.tables.append(table)

    @property
    def table_width(self) -> int:
        return max(len(t) for t in self.tables)

    def packed(self, table_width: int, extra: list[int] = ()) -> torch.Tensor:
        """The device fields end to end (`FIELDS` order), then the block tables padded to
        `table_width` with block 0, then `extra`: one host tensor for one copy."""
        values = [v for name in FIELDS for v in getattr(self, name)]
        for table in self.tables:
            values += table + [0] * (table_width - len(table))
        return torch.tensor(values + list(extra), dtype=torch.long)

    def unpack(
        self, flat: torch.Tensor, table_width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`packed(table_width, extra)`, wherever it now lies, as its three parts: the fields,
        the block tables (seqs, table_width) and `extra`."""
        n = sum(self.sizes())
        end = n + len(self.tables) * table_width
        return flat[:n], flat[n:end].view(len(self.tables), table_width), flat[end:]

    def sizes(self) -> list[int]:
        return [len(getattr(self, name)) for name in FIELDS]


# The fields that travel to the device, in their packed order.
FIELDS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "logits_indices",
    "tile_seqs",
    "tile_starts",
    "query_starts",
    "context_lens",
)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    slot_mapping: torch.Tensor  # (tokens,): the cache slot each token's k and v go to
    block_tables: torch.Tensor  # (seqs, width), padded with block 0
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
    max_context: int  # at least every context_len: what the attention kernel sizes its splits by
    query_tile: int  # query tokens per tile of the work list

    @classmethod
    def build(
        cls, chunks: list[ScheduledChunk], block_size: int, device: torch.device
    ) -> ForwardBatch:
        host = HostBatch.of(chunks, block_size)
        width = host.table_width
        fields, tables, _ = host.unpack(upload(host.packed(width), device), width)
        return cls.view(fields, tables, host, block_size)

    @classmethod
    def view(
        cls,
        fields: torch.Tensor,
        tables: torch.Tensor,
        host: HostBatch,
        block_size: int,
        max_context: int | None = None,
        query_tile: int | None = None,
    ) -> ForwardBatch:
        """A batch whose device fields are views of `fields`, laid out as `host.packed`, and
        whose block tables are `tables`; a CUDA graph's batch sets its `max_context` and
        `query_tile` (one token a tile in a step of one token per sequence, else QUERY_TILE)."""
        if query_tile is None:
            query_tile = QUERY_TILE if len(host.input_ids) > len(host.context_lens) else 1
        d = dict(zip(FIELDS, fields.split(host.sizes()), strict=True))
        return cls(
            input_ids=d["input_ids"],
            positions=d["positions"],
            slot_mapping=d["slot_mapping"],
            block_tables=tables,
            query_starts=host.query_starts,
            context_lens=host.context_lens,
            tables=host.tables,
            block_size=block_size,
            logits_indices=d["logits_indices"],
            tile_seqs=d["tile_seqs"],
            tile_starts=d["tile_starts"],
            query_starts_device=d["query_starts"],
            context_lens_device=d["context_lens"],
            max_context=max_context or max(host.context_lens),
            query_tile=query_tile,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
