"""Model families; importing this package registers every architecture."""

from collections.abc import Callable

import torch
from torch import nn

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.models import llama  # noqa: F401  (registers llama, qwen2)
from worker_orcd.models.registry import ARCHITECTURES, UnsupportedArchitectureError, model_class
from worker_orcd.models.weights import WeightLoader


def load_model(
    gguf: GGUFFile, device: torch.device, progress: Callable[[int], None] | None = None
) -> nn.Module:
    """Build the file's architecture with its weights on `device`, kept in their GGUF blocks;
    `progress` hears the percentages 0, 25, 50, 75 and 100 of the bytes loaded."""
    cls = model_class(gguf.architecture)
    weights = WeightLoader(gguf, device, progress)
    model = cls(weights).eval()
    weights.finish()
    return model


__all__ = ["ARCHITECTURES", "UnsupportedArchitectureError", "load_model"]
