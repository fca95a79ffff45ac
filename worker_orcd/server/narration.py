"""Narration logs (spec M0-W-1900): one JSON object per line on stderr.

Every line carries timestamp, level, event, worker_id, model_ref and gpu_device; job lines add
job_id and correlation_id. Prompts are never logged in clear: their sha256 and length instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO


def prompt_digest(prompt: str) -> dict[str, Any]:
    return {
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "prompt_chars": len(prompt),
    }


@dataclass
class Narrator:
    worker_id: str
    model_ref: str
    gpu_device: int | None
    stream: TextIO = sys.stderr

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(
        self,
        event: str,
        level: str = "INFO",
        job_id: str | None = None,
        correlation_id: str | None = None,
        **fields: Any,
    ) -> None:
        record = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "event": event,
            "worker_id": self.worker_id,
            "job_id": job_id,
            "model_ref": self.model_ref,
            "gpu_device": self.gpu_device,
            "correlation_id": correlation_id,
            **fields,
        }
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock:
            print(line, file=self.stream, flush=True)
