"""Steps replayed from CUDA graphs.

A forward pass is hundreds of small launches, and Python issues a Triton launch in tens of
microseconds: eagerly, the host and not the GPU sets the pace of any step of up to about a
thousand tokens. So such a step replays a graph captured for fixed sizes, its batch padded up to
them (`HostBatch.pad_decode`, `pad_mixed`): a decode step (one token per sequence, each drawing)
at the next batch size on a ladder, with the output head inside; any other step (prefill chunks,
with or without decodes: under load most steps) at the next token count on a ladder, the body
alone: the head runs eagerly on the rows that draw, as a head over every padded row would cost
more than its few launches. Longer steps run eagerly: their GPU time dwarfs their launches'.

Each graph reads its batch from static device buffers that a replay refills with two copies,
and sizes attention's splits by the longest context. All graphs share one memory pool: they
never run at once. Every shape is captured when the engine starts, largest first (the pool grows
once), as vLLM does: a capture in the middle of serving would stall every running stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from worker_orcd.engine.forward_batch import QUERY_TILE, ForwardBatch, HostBatch
from worker_orcd.layers.attention import KVCache

DECODE_SIZES = (1, 2, 4, 8, *range(16, 1025, 16))
MIXED_TOKENS = (16, 32, 64, 128, *range(192, 1025, 64))


@dataclass(frozen=True)
class GraphShape:
    """A graph's fixed sizes: tokens, sequences (block table rows) and attention tiles."""

    num_tokens: int
    num_seqs: int
    num_tiles: int
    decode: bool  # one token per sequence, each drawing: the output head is inside

    @classmethod
    def for_decode(cls, num_seqs: int) -> GraphShape:
        return cls(num_seqs, num_seqs, num_seqs, decode=True)

    @classmethod
    def for_mixed(cls, num_tokens: int, max_num_seqs: int) -> GraphShape:
        """Room for every batch of up to `num_tokens` tokens (a multiple of QUERY_TILE): each
        sequence has one at least, and its tiles number at most one more than its tokens / 16."""
        num_seqs = min(num_tokens, max_num_seqs) + 2  # the padding tokens', an empty one
        return cls(num_tokens, num_seqs, num_tokens // QUERY_TILE + num_seqs, decode=False)

    @property
    def query_tile(self) -> int:
        return 1 if self.decode else QUERY_TILE

    def pad(self, host: HostBatch, block: int, block_size: int) -> None:
        """Fill a batch that fits up to these sizes, its padding rows in `block`."""
        if self.decode:
            host.pad_decode(self.num_seqs, block, block_size)
        else:
            host.pad_mixed(self.num_tokens, self.num_seqs, self.num_tiles, block, block_size)


@dataclass(frozen=True)
class _Graph:
    replay: Callable[[], torch.Tensor]  # its logits (decode) or hidden states
    fields: torch.Tensor  # its packed integer fields
    batch: ForwardBatch  # the batch over them


class StepGraphs:
    def __init__(
        self,
        model: nn.Module,
        cache: KVCache,
        max_num_seqs: int,
        max_num_tokens: int,
        max_blocks: int,
    ):
        self.model = model
        self.cache = cache
        self.max_blocks = max_blocks
        self.pad_block = cache.num_blocks - 1  # the spare block: padding rows write there
        decode = [size for size in DECODE_SIZES if size < max_num_seqs] + [max_num_seqs]
        # a mixed step's padding tokens are one sequence: within one sequence's table
        limit = min(max_num_tokens, max_blocks * cache.block_size)
        self.decode_shapes = [GraphShape.for_decode(size) for size in decode]
        self.mixed_shapes = [
            GraphShape.for_mixed(tokens, max_num_seqs) for tokens in MIXED_TOKENS if tokens <= limit
        ]
        shapes = self.decode_shapes + self.mixed_shapes
        rows = max(shape.num_seqs for shape in shapes)
        self.tables = torch.full((rows, max_blocks), self.pad_block, device=cache.keys.device)
        self._graphs: dict[GraphShape, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        for shape in sorted(shapes, key=lambda shape: shape.num_tokens, reverse=True):
            self._capture(shape)

    def shape_for(self, host: HostBatch) -> GraphShape | None:
        """The graph a step replays, None when it runs eagerly."""
        num_seqs, num_tokens = len(host.context_lens), len(host.input_ids)
        if num_tokens == len(host.logits_indices) == num_seqs:
            return next((s for s in self.decode_shapes if s.num_seqs >= num_seqs), None)
        return next((s for s in self.mixed_shapes if s.num_tokens >= num_tokens), None)

    def pad(self, host: HostBatch, shape: GraphShape) -> None:
        shape.pad(host, self.pad_block, self.cache.block_size)

    def load(self, shape: GraphShape, fields: torch.Tensor, tables: torch.Tensor) -> ForwardBatch:
        """Copy a batch padded to `shape`, already on the device (`HostBatch.unpack`), into the
        buffers of its graph; that graph's batch."""
        graph = self._graphs[shape]
        graph.fields.copy_(fields)
        self.tables[: shape.num_seqs, : tables.shape[1]].copy_(tables)
        return graph.batch

    def replay(self, shape: GraphShape) -> torch.Tensor:
        """The batch last loaded for `shape`: its logits (decode) or hidden states."""
        return self._graphs[shape].replay()

    def _capture(self, shape: GraphShape) -> None:
        """Capture a step over static buffers that hold a valid batch: padding alone."""
        template = HostBatch()
        self.pad(template, shape)
        width = template.table_width
        fields, _, _ = template.unpack(template.packed(width).to(self.tables.device), width)
        block_size = self.cache.block_size
        batch = ForwardBatch.view(
            fields,
            self.tables[: shape.num_seqs],
            template,
            block_size,
            max_context=self.max_blocks * block_size,
            query_tile=shape.query_tile,
        )

        def step() -> torch.Tensor:
            hidden = self.model(batch, self.cache)
            if not shape.decode:
                return hidden
            return self.model.compute_logits(hidden.index_select(0, batch.logits_indices))

        self._graphs[shape] = _Graph(self._record(step), fields, batch)

    def _record(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """`step` captured, after a warm-up on a side stream (kernels compile, allocations
        settle); its replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
