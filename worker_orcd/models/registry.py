"""From `general.architecture` to the class that implements it (spec M0-W-1212)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ARCHITECTURES: dict[str, type[nn.Module]] = {}


class UnsupportedArchitectureError(ValueError):
    def __init__(self, arch: str):
        self.arch = arch
        known = ", ".join(sorted(ARCHITECTURES))
        super().__init__(f"Unsupported architecture: {arch} (supported: {known})")


def register(*archs: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        for arch in archs:
            ARCHITECTURES[arch] = cls
        return cls

    return add


def model_class(arch: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise UnsupportedArchitectureError(arch) from None
