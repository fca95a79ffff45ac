"""The engine's fixed settings: how many sequences and tokens one step may hold, and the KV pool."""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SIZE = 16  # tokens per KV block: the prefix cache's granularity, as vLLM's default
# Tokens per step by device: a step is what a cancel waits for, and a CPU computes about a
# hundred times fewer tokens per second.
STEP_TOKENS = {"cuda": 2048, "cpu": 512}


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int  # positions a sequence may reach: prompt plus generated tokens
    max_num_seqs: int = 256  # sequences running at once; more wait
    max_num_batched_tokens: int = STEP_TOKENS["cuda"]  # per step: decodes plus prefill chunks
    max_queued: int = 1024  # sequences waiting; beyond, a request is refused with a 503
    block_size: int = BLOCK_SIZE
    gpu_memory_utilization: float = 0.90  # of the GPU's memory, for weights, activations, KV
    num_kv_blocks: int | None = None  # a fixed pool (tests); None: sized from free memory
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        checks = {
            "max_model_len": self.max_model_len >= 2,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "max_queued": self.max_queued >= 0,
            "block_size": self.block_size >= 1,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
            "num_kv_blocks": self.num_kv_blocks is None or self.num_kv_blocks >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid engine configuration: {values}")

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)
