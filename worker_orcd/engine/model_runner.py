"""Runs the model's forward passes over one persistent KV cache.

Prefill runs eagerly (its length varies). On CUDA, decode is captured once as a CUDA graph and
replayed for every token, so a token costs one graph launch instead of hundreds of kernel
launches; the graph reads its token and position from static device buffers, and attention
reads the sequence length from device memory. On the CPU every step runs eagerly.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, max_positions: int):
        self.model = model
        self.device = device
        self.max_positions = max_positions
        self.cache = model.new_kv_cache(max_positions)
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits (vocab,) after the prompt `ids`, cached from position 0."""
        tokens = torch.tensor(ids, device=self.device)
        positions = torch.arange(len(ids), device=self.device)
        return self._logits(tokens, positions)

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> torch.Tensor:
        """Logits (vocab,) after `token` at `position`."""
        self._token.fill_(token)
        self._position.fill_(position)
        if self.device.type != "cuda":
            return self._logits(self._token, self._position)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_logits

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model(tokens, positions, self.cache)
        return self.model.compute_logits(hidden[-1])

    def _capture(self) -> None:
        """Warm up on a side stream (kernels compile, allocations settle), then capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._logits(self._token, self._position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._logits(self._token, self._position)
        self._graph = graph
