"""Shared fixtures: the real models, pulled from PyPI through the product's own model store.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when
`@triton.jit` decorates a kernel, so it is set here, before any test imports one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from worker_orcd.model_store import pull


def _pulled(name: str) -> Path:
    return pull(name, log=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _pulled("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _pulled("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _pulled("gemma3-270m")
