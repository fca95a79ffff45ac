"""Hands a model its tensors from the GGUF file and reports load progress by bytes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.layers.quant_linear import QuantWeight

PROGRESS_MARKS = (0, 25, 50, 75, 100)  # spec M0-W-1621


class WeightLoader:
    def __init__(
        self, gguf: GGUFFile, device: torch.device, progress: Callable[[int], None] | None = None
    ):
        self.gguf = gguf
        self.device = device
        self._progress = progress or (lambda percent: None)
        self._total = sum(info.nbytes for info in gguf.tensors.values()) or 1
        self._loaded = 0
        self._marks = list(PROGRESS_MARKS)
        self._report()

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def quant(self, name: str) -> QuantWeight:
        """A weight kept in its GGUF blocks."""
        weight = QuantWeight.load(self.gguf, name, self.device)
        self._loaded += weight.blocks.numel()
        self._report()
        return weight

    def vector(self, name: str) -> torch.Tensor:
        """A small tensor (norm weight, bias) as float32."""
        return self.quant(name).dequantize()

    def optional_vector(self, name: str) -> torch.Tensor | None:
        return self.vector(name) if self.has(name) else None

    def finish(self) -> None:
        self._loaded = self._total
        self._report()

    def _report(self) -> None:
        percent = 100 * self._loaded // self._total
        while self._marks and percent >= self._marks[0]:
            self._progress(self._marks.pop(0))
