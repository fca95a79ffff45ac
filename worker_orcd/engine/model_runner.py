"""Runs the model's forward passes over one persistent KV cache.

On CUDA both phases replay CUDA graphs, because a batch-1 forward is hundreds of small launches
and the host cannot issue them as fast as the GPU runs them. Decode is captured once. Prefill is
captured per length bucket (16, 32, ..., 512 tokens): a prompt's first chunk is padded to its
bucket, and the padding sits after the real tokens, so causal attention keeps it out of their
results. Its KV entries lie past the chunk, where the next chunk or decode step writes before it
reads. Later chunks of a longer prompt run eagerly. Graphs read tokens and positions from static
device buffers, and attention reads the decode position from device memory. All graphs share one
memory pool; they never run at the same time. On the CPU every step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
# Prompts are prefilled in chunks of at most this many tokens: a cancel lands between two chunks,
# and activations stay bounded whatever the prompt's length.
PREFILL_CHUNK = PREFILL_BUCKETS[-1]


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, max_positions: int):
        self.model = model
        self.device = device
        self.max_positions = max_positions
        self.cache = model.new_kv_cache(max_positions)
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._prefill_ids = torch.zeros(PREFILL_BUCKETS[-1], dtype=torch.long, device=device)
        self._prefill_positions = torch.arange(PREFILL_BUCKETS[-1], device=device)
        self._last = torch.zeros(1, dtype=torch.long, device=device)  # the prompt's last index
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # tokens: graph
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def prefill(
        self, ids: list[int], cancelled: Callable[[], bool] = lambda: False
    ) -> torch.Tensor | None:
        """Logits (vocab,) after the prompt `ids`, cached from position 0, run `PREFILL_CHUNK`
        tokens at a time; None when `cancelled()` turns true between two chunks."""
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            if cancelled():
                return None
            logits = self.prefill_chunk(ids[start : start + PREFILL_CHUNK], start)
        return logits

    @torch.inference_mode()
    def prefill_chunk(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits (vocab,) after `ids`, cached at positions `start`, `start + 1`, ...; the
        positions before `start` must hold the earlier chunks of the same prompt."""
        bucket = next((b for b in PREFILL_BUCKETS if b >= len(ids)), None)
        if self.device.type != "cuda" or start or bucket is None or bucket > self.max_positions:
            tokens = torch.tensor(ids, device=self.device)
            positions = torch.arange(start, start + len(ids), device=self.device)
            return self._logits(tokens, positions, start)
        self._prefill_ids[: len(ids)].copy_(torch.tensor(ids))
        self._last.fill_(len(ids) - 1)  # before a capture too: its warm-up runs index with it
        if bucket not in self._graphs:
            ids_in, positions = self._prefill_ids[:bucket], self._prefill_positions[:bucket]
            self._capture(bucket, lambda: self._logits(ids_in, positions, last=self._last))
        return self._replay(bucket)

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Logits (vocab,) after `token` at `position`. The token may be a one-element tensor on
        the device, still being computed: the step is queued behind it, with no wait."""
        if isinstance(token, torch.Tensor):
            self._token.copy_(token.view(1))
        else:
            self._token.fill_(token)
        self._position.fill_(position)
        if self.device.type != "cuda":
            return self._logits(self._token, self._position, start=position)
        if 1 not in self._graphs:
            # one CUDA token's attention reads its position from the device, never `start`
            self._capture(1, lambda: self._logits(self._token, self._position))
        return self._replay(1)

    def _logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        start: int = 0,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (vocab,) of the last token, or of the row `last` (a device index) when the
        tokens are a padded bucket."""
        hidden = self.model(tokens, positions, self.cache, start)
        rows = hidden[-1:] if last is None else hidden.index_select(0, last)
        return self.model.compute_logits(rows)[0]

    def _capture(self, tokens: int, step: Callable[[], torch.Tensor]) -> None:
        """Warm up on a side stream (kernels compile, allocations settle), then capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self._graphs[tokens] = (graph, logits)

    def _replay(self, tokens: int) -> torch.Tensor:
        graph, logits = self._graphs[tokens]
        graph.replay()
        return logits
