"""What a request asks of generation: sampling knobs, limits and stop conditions."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

# Generated seeds stay below 2**53 so that they survive a JSON round trip through any client.
MAX_GENERATED_SEED = 1 << 53


def new_seed() -> int:
    return secrets.randbelow(MAX_GENERATED_SEED)


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
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= 2.0,
            "top_k": self.top_k >= 0,
            "top_p": 0.0 <= self.top_p <= 1.0,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "repetition_penalty": 0.0 < self.repetition_penalty <= 2.0,
            "seed": self.seed is None or 0 <= self.seed < 1 << 64,
            "stop": all(self.stop),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid sampling parameters: {values}")
