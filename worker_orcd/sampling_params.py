"""What a request asks of generation: sampling knobs, limits and stop conditions."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

# Generated seeds stay below 2**53 so that they survive a JSON round trip through any client.
MAX_GENERATED_SEED = 1 << 53


def new_seed() -> int:
    return secrets.randbelow(MAX_GENERATED_SEED)


@dataclass(frozen=True)
class Bounds:
    """A parameter's valid range, inclusive (`ge`, `le`) or exclusive (`gt`, `lt`) at either
    end: one table serves the CLI's checks, `SamplingParams`' and the HTTP schemas' (as
    pydantic `Field` constraints), so every interface states the same range."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """'within 0-2', 'at least 1', 'above 0 and at most 2', ..."""
        if self.ge is not None and self.le is not None:
            return f"within {_number(self.ge)}-{_number(self.le)}"
        low = f"at least {_number(self.ge)}" if self.ge is not None else None
        low = f"above {_number(self.gt)}" if self.gt is not None else low
        high = f"at most {_number(self.le)}" if self.le is not None else None
        high = f"below {_number(self.lt)}" if self.lt is not None else high
        return " and ".join(part for part in (low, high) if part)

    def check(self, name: str, value: float) -> None:
        if not self.holds(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def field(self) -> dict[str, float]:
        """As pydantic `Field` keyword arguments."""
        return {k: v for k, v in vars(self).items() if v is not None}


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


BOUNDS = {
    "max_tokens": Bounds(ge=1),
    "temperature": Bounds(ge=0.0, le=2.0),
    "top_k": Bounds(ge=0),
    "top_p": Bounds(ge=0.0, le=1.0),
    "min_p": Bounds(ge=0.0, le=1.0),
    "repetition_penalty": Bounds(gt=0.0, le=2.0),
    "seed": Bounds(ge=0, lt=1 << 64),
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 2048
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None  # None: a seed is generated and reported
    stop: tuple[str, ...] = field(default_factory=tuple)  # matched on text, never emitted
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        """ValueError naming the first parameter out of its range, the range and the value."""
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if value is not None:
                bounds.check(name, value)
        if not all(self.stop):
            raise ValueError("stop strings must not be empty")
