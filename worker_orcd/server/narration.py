"""Narration logs (spec M0-W-1900): one JSON object per line on stderr, and nothing else there.

Every line carries timestamp, level, event, worker_id, model_ref and gpu_device; job lines add
job_id and correlation_id. Prompts are never logged in clear: their sha256 and length instead.
`capture_stderr` routes what else would reach stderr (the HTTP server's log records, warnings,
uncaught exceptions) through the same narrator, so a log pipeline can parse every line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

# The request being handled, set by the HTTP middleware: log records raised while handling it
# carry its correlation id.
current_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


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


def _traceback(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> str:
    return "".join(traceback.format_exception(kind, error, tb))


class NarrationHandler(logging.Handler):
    """Log records as narration lines: `log` events, or an `error` event (code INTERNAL) with
    the traceback in a field when the record carries an exception."""

    def __init__(self, narrate: Narrator):
        super().__init__(logging.WARNING)
        self.narrate = narrate

    def emit(self, record: logging.LogRecord) -> None:
        fields = {
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": current_correlation_id.get(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            trace = _traceback(*record.exc_info)
            self.narrate("error", level="ERROR", code="INTERNAL", traceback=trace, **fields)
        else:
            self.narrate("log", level=record.levelname, **fields)


def capture_stderr(narrate: Narrator) -> None:
    """Send log records, warnings and uncaught exceptions (any thread's) through `narrate`."""
    root = logging.getLogger()
    root.handlers = [NarrationHandler(narrate)]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)

    def uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        message = f"{kind.__name__}: {error}"
        trace = _traceback(kind, error, tb)
        narrate("error", level="CRITICAL", code="INTERNAL", message=message, traceback=trace)

    sys.excepthook = uncaught
    threading.excepthook = lambda args: uncaught(
        args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback
    )
