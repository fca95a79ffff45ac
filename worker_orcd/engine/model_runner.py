"""Runs one scheduled step: the forward pass over the KV pool, then the sampled rows' tokens.

The runner owns the pool and turns the scheduler's chunks into one `ForwardBatch`; the model
sees that and nothing of sequences. Only the rows that draw a token go through the output head.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.scheduler import ScheduledChunk
from worker_orcd.engine.sequence import Sequence
from worker_orcd.layers.sampler import SamplingBatch, sample


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, num_blocks: int, block_size: int):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.cache = model.new_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Compute the chunks' tokens into the cache; the next token of each chunk that
        `samples`, in order."""
        drawing, logits = self.logits(chunks)
        if not drawing:
            return []
        sampling = SamplingBatch(
            [seq.params for seq in drawing],
            [seq.seed for seq in drawing],
            [seq.num_generated for seq in drawing],
            # copied only where the repetition penalty reads them
            [seq.generated_ids if seq.params.repetition_penalty != 1.0 else [] for seq in drawing],
            self.device,
        )
        return sample(logits, sampling).tolist()

    def logits(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The forward pass: the sequences that draw a token this step, and their logits."""
        batch = ForwardBatch.build(chunks, self.block_size, self.device)
        hidden = self.model(batch, self.cache)
        drawing = [chunk.seq for chunk in chunks if chunk.samples]
        if not drawing:
            return [], None
        return drawing, self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
