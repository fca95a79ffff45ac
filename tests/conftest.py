"""Shared fixtures: the real models, pulled from PyPI through the product's own model store.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when
`@triton.jit` decorates a kernel, so it is set here, before any test imports one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """`tl.dot` as a GPU computes it, each output element from its own row and column alone.
    The interpreter's own calls numpy's matmul, and OpenBLAS's AVX-512 sgemm rounds a row
    differently by where it sits in the matrix, which would fail batch-invariance tests that
    hold on the hardware. Products summed over k in order, in the accumulator's type."""
    from triton.runtime.interpreter import TensorHandle

    dtype = d.data.dtype
    products = a.data.astype(dtype)[:, :, None] * b.data.astype(dtype)[None, :, :]
    return TensorHandle(products.sum(axis=1, dtype=dtype) + d.data, d.dtype.scalar)


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime.interpreter import InterpreterBuilder

    InterpreterBuilder.create_dot = _exact_dot

from worker_orcd.model_store import pull  # noqa: E402 (after the interpreter switch)


def _pulled(name: str) -> Path:
    """A first run pulls the model, one line per part on stderr (shown with `pytest -s`)."""
    return pull(name, log=lambda message: print(message, file=sys.stderr))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _pulled("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _pulled("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _pulled("gemma3-270m")
