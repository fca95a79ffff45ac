"""Decode steps replayed from CUDA graphs.

A decode forward is hundreds of small launches, and Python issues a Triton launch in tens of
microseconds: eagerly, the host and not the GPU sets the pace. So a step whose chunks are all one
token (decode) replays a graph captured for the next batch size on a ladder, its rows padded
with one-token sequences that write only to the pool's spare block and read nothing of anyone's.
Each graph reads its batch from static device buffers that a replay refills with two copies;
prefill and mixed steps run eagerly. All graphs share one memory pool: they never run at once.
Every size is captured when the engine starts, largest first (the pool grows once), as vLLM
does: a capture in the middle of serving would stall every running stream for its duration.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd.engine.forward_batch import ForwardBatch, HostBatch
from worker_orcd.layers.attention import KVCache

BATCH_SIZES = (1, 2, 4, 8, *range(16, 1025, 16))


class DecodeGraphs:
    def __init__(self, model: nn.Module, cache: KVCache, max_num_seqs: int, max_blocks: int):
        self.model = model
        self.cache = cache
        self.sizes = [size for size in BATCH_SIZES if size < max_num_seqs] + [max_num_seqs]
        self.max_blocks = max_blocks
        self.pad_block = cache.num_blocks - 1  # the spare block: padded rows write there
        device = cache.keys.device
        self.tables = torch.full((self.sizes[-1], max_blocks), self.pad_block, device=device)
        # size: (graph, its packed integer fields, the batch over them, its logits)
        self._graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, ForwardBatch, torch.Tensor]
        ] = {}
        self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._capture(size)

    def size_for(self, host: HostBatch) -> int | None:
        """The graph's batch size for a step, None when the step runs eagerly."""
        num_seqs = len(host.context_lens)
        decode = len(host.input_ids) == len(host.logits_indices) == num_seqs
        if not decode or num_seqs > self.sizes[-1]:
            return None
        return next(size for size in self.sizes if size >= num_seqs)

    def pad(self, host: HostBatch, size: int) -> None:
        host.pad(size, self.pad_block * self.cache.block_size, self.pad_block)

    def load(self, size: int, fields: torch.Tensor, tables: torch.Tensor) -> ForwardBatch:
        """Copy a decode batch padded to `size`, already on the device (`HostBatch.unpack`),
        into the buffers of the graph for `size`; that graph's batch."""
        _, static_fields, batch, _ = self._graphs[size]
        static_fields.copy_(fields)
        self.tables[:size, : tables.shape[1]].copy_(tables)
        return batch

    def replay(self, size: int) -> torch.Tensor:
        """Logits (size, vocab) of the batch last loaded for `size`."""
        graph, _, _, logits = self._graphs[size]
        graph.replay()
        return logits

    def _capture(self, size: int) -> None:
        """Warm up on a side stream (kernels compile, allocations settle), then capture, over
        buffers that hold a valid batch: padding rows alone."""
        template = HostBatch()
        self.pad(template, size)
        fields, _, _ = template.unpack(template.packed(1).to(self.tables.device), 1)
        block_size = self.cache.block_size
        max_context = self.max_blocks * block_size
        batch = ForwardBatch.view(fields, self.tables[:size], template, block_size, max_context)

        def step() -> torch.Tensor:
            hidden = self.model(batch, self.cache)
            return self.model.compute_logits(hidden.index_select(0, batch.logits_indices))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self._graphs[size] = (graph, fields, batch, logits)
