"""Runs one scheduled step: the forward pass over the KV pool, then the sampled rows' tokens.

The runner owns the pool and turns the scheduler's chunks into one `ForwardBatch`; the model
sees that and nothing of sequences. Only the rows that draw a token go through the output head.
`launch` queues a step and returns before its tokens exist, so that the host prepares the next
step while the device computes this one: a decode token still being computed is a `PLACEHOLDER`
in its sequence, and the next step reads it from the device. On CUDA, steps of up to about a
thousand tokens replay CUDA graphs (`cuda_graph.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.cuda_graph import StepGraphs
from worker_orcd.engine.forward_batch import ForwardBatch, HostBatch, upload
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import PLACEHOLDER, Sequence
from worker_orcd.layers.sampler import SamplingBatch, sample


class StepTokens:
    """The tokens a launched step draws, one per sampling chunk in order; `tolist` waits."""

    def __init__(self, tokens: torch.Tensor):
        self._host = tokens
        self._ready = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def tolist(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, num_blocks: int):
        self.model = model
        self.device = model.device
        self.block_size = config.block_size
        graphs = self.device.type == "cuda"
        # On CUDA, one block beyond the scheduler's pool: a graph's padding rows write there.
        self.cache = model.new_kv_cache(num_blocks + graphs, config.block_size)
        self.graphs = None
        if graphs:
            self.graphs = StepGraphs(
                model,
                self.cache,
                config.max_num_seqs,
                config.max_num_batched_tokens,
                config.blocks_for(config.max_model_len),
            )
        # The last launched step's tokens, and the row of each sequence that drew one.
        self._last: tuple[torch.Tensor, dict[int, int]] | None = None

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk]) -> StepTokens:
        """Queue the step and the draw of each sampling chunk's next token, without waiting."""
        drawing, logits = self.logits(chunks)
        if not drawing:
            return StepTokens(torch.empty(0, dtype=torch.long))
        sampling = SamplingBatch(
            [seq.params for seq in drawing],
            [seq.seed for seq in drawing],
            [seq.num_generated for seq in drawing],
            # copied only where the repetition penalty reads them
            [seq.generated_ids if seq.params.repetition_penalty != 1.0 else [] for seq in drawing],
            self.device,
        )
        tokens = sample(logits, sampling)
        self._last = (tokens, {seq.seq_id: row for row, seq in enumerate(drawing)})
        return StepTokens(tokens)

    @torch.inference_mode()
    def logits(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The forward pass: the sequences that draw a token this step, and their logits."""
        host = HostBatch.of(chunks, self.block_size)
        shape = self.graphs.shape_for(host) if self.graphs else None
        if shape is not None:
            self.graphs.pad(host, shape)
        rows, sources = self._placeholders(chunks)
        width = host.table_width
        fields, tables, fills = host.unpack(
            upload(host.packed(width, rows + sources), self.device), width
        )
        if shape is not None:
            batch = self.graphs.load(shape, fields, tables)
        else:
            batch = ForwardBatch.view(fields, tables, host, self.block_size)
        if rows:
            fills = fills.view(2, -1)
            batch.input_ids.index_copy_(0, fills[0], self._last[0].index_select(0, fills[1]))
        drawing = [chunk.seq for chunk in chunks if chunk.samples]
        if shape is not None and shape.decode:
            return drawing, self.graphs.replay(shape)[: len(drawing)]
        hidden = self.graphs.replay(shape) if shape is not None else self.model(batch, self.cache)
        if not drawing:
            return [], None
        drawn = batch.logits_indices[: len(drawing)]  # a graph's batch has padding beyond
        return drawing, self.model.compute_logits(hidden.index_select(0, drawn))

    def _placeholders(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int]]:
        """The batch rows whose token the last step is still computing, and its rows there."""
        rows, sources, end = [], [], 0
        for chunk in chunks:
            end += chunk.num_tokens
            seq = chunk.seq
            if seq.token_ids[chunk.start + chunk.num_tokens - 1] == PLACEHOLDER:
                rows.append(end - 1)
                sources.append(self._last[1][seq.seq_id])
        return rows, sources
