"""stderr carries narration only: log records, warnings and uncaught exceptions of any thread
become one JSON line each, an exception with its traceback in a field."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from worker_orcd.server.narration import Narrator, capture_stderr, current_correlation_id


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    stream = io.StringIO()
    capture_stderr(Narrator("worker-1", "model-a", None, stream))
    yield stream
    logging.captureWarnings(False)
    root.handlers, root.level = handlers, level


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_records_warnings_and_uncaught_exceptions_are_narration(captured: io.StringIO):
    token = current_correlation_id.set("c0ffee")
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        current_correlation_id.reset(token)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("uvicorn.error").info("Started server process")  # below WARNING: dropped
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()

    asgi, http, warned, crashed = lines(captured)
    assert asgi["event"] == "error" and asgi["code"] == "INTERNAL"
    assert asgi["correlation_id"] == "c0ffee" and asgi["logger"] == "uvicorn.error"
    assert "ValueError: broken" in asgi["traceback"]
    assert (http["event"], http["level"], http["message"]) == (
        "log",
        "WARNING",
        "Invalid HTTP request received.",
    )
    assert warned["logger"] == "py.warnings" and "an old API" in warned["message"]
    assert crashed["event"] == "error" and crashed["level"] == "CRITICAL"
    assert "ZeroDivisionError" in crashed["traceback"]
    for line in (asgi, http, warned, crashed):
        assert line["worker_id"] == "worker-1" and line["model_ref"] == "model-a"
