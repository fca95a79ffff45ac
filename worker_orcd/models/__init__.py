"""Model families; importing this package registers every architecture."""

import torch
from torch import nn

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.models import llama  # noqa: F401  (registers llama, qwen2)
from worker_orcd.models.registry import UnsupportedArchitectureError, model_class


def load_model(gguf: GGUFFile, device: torch.device) -> nn.Module:
    """Build the file's architecture with its weights on `device`, kept in their GGUF blocks."""
    return model_class(gguf.architecture)(gguf, device).eval()


__all__ = ["UnsupportedArchitectureError", "load_model"]
