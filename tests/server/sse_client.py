"""A small client for `/execute`: SSE frames parsed from the raw bytes, and protocol checks."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(120, connect=10)
# A long job: greedy counting goes on to max_tokens (checked by hand: 300 tokens, no EOS).
COUNTING = "1, 2, 3, 4, 5, 6,"
# Fields that differ between two runs of the same request.
VARYING = {"started": {"started_at", "job_id"}, "metrics": None, "end": {"decode_time_ms"}}
TERMINAL = ("end", "error")
_FRAME_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(r"\r\n|\r|\n")  # SSE's only line ends: str.splitlines also splits at U+2028


@dataclass(frozen=True)
class Frame:
    event: str
    data: dict[str, Any]
    at: float = field(default_factory=time.monotonic, compare=False)  # when it was parsed


def parse_block(block: bytes) -> Frame | None:
    """One SSE frame (`event:` and `data:` lines); comments (`: ping`) give None.

    The bytes must be valid UTF-8: decoding is strict, so a split character fails here."""
    event, data = "message", []
    for line in _LINE_END.split(block.decode("utf-8")):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return Frame(event, json.loads("\n".join(data))) if data else None


def iter_frames(chunks: Iterable[bytes]) -> Iterator[Frame]:
    """Frames as soon as their closing blank line arrives."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while match := _FRAME_END.search(buffer):
            block, buffer = buffer[: match.start()], buffer[match.end() :]
            if (frame := parse_block(block)) is not None:
                yield frame
    assert buffer.strip() == b"", f"the stream ended inside a frame: {buffer!r}"


@dataclass
class Stream:
    """A whole `/execute` response."""

    status: int
    headers: httpx.Headers
    raw: bytes
    frames: list[Frame]

    @property
    def events(self) -> list[str]:
        return [frame.event for frame in self.frames]

    @property
    def started(self) -> dict[str, Any]:
        return self.frames[0].data

    @property
    def terminal(self) -> Frame:
        return self.frames[-1]

    @property
    def tokens(self) -> list[str]:
        return [frame.data["t"] for frame in self.frames if frame.event == "token"]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def replay_key(self) -> list[tuple[str, dict[str, Any]]]:
        """The payloads that the same request must reproduce exactly (timings left out), its
        tokens as one text: a reader that falls behind gets queued tokens joined into one
        event, so where the token events split the text may differ between two runs."""
        key: list[tuple[str, dict[str, Any]]] = []
        for frame in self.frames:
            varying = VARYING.get(frame.event, set())
            if frame.event == "token":
                if not key or key[-1][0] != "text":
                    key.append(("text", {"t": ""}))
                key[-1][1]["t"] += frame.data["t"]
            elif varying is not None:
                key.append((frame.event, {k: v for k, v in frame.data.items() if k not in varying}))
        return key


def execute(url: str, headers: dict[str, str] | None = None, **body: Any) -> Stream:
    """POST /execute and read the whole stream; non-SSE answers come back with no frames."""
    response = httpx.post(f"{url}/execute", json=body, headers=headers, timeout=TIMEOUT)
    event_stream = response.headers.get("content-type", "").startswith("text/event-stream")
    frames = list(iter_frames([response.content])) if event_stream else []
    return Stream(response.status_code, response.headers, response.content, frames)


def check_protocol(stream: Stream, job_id: str | None = None) -> None:
    """started -> token* (i = 0, 1, ...) -> [metrics] -> exactly one end | error, nothing after;
    or, for a job that ended before it ran, its one error alone."""
    assert stream.status == 200, stream.raw
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.frames, "no frames"
    for frame in stream.frames:
        assert frame.data["type"] == frame.event
    if stream.events == ["error"]:
        check_error(stream.terminal.data)
        return
    started = stream.frames[0]
    assert started.event == "started", stream.events
    assert {"job_id", "model", "started_at", "seed"} <= started.data.keys()
    assert job_id is None or started.data["job_id"] == job_id
    assert isinstance(started.data["seed"], int) and started.data["seed"] >= 0
    assert started.data["started_at"].endswith("Z")
    started_at = datetime.fromisoformat(started.data["started_at"])
    assert started_at.utcoffset() == timedelta(0)

    terminal = stream.frames[-1]
    assert terminal.event in TERMINAL, stream.events
    middle = stream.events[1:-1]
    assert not set(middle) & {"started", *TERMINAL}, stream.events
    assert middle.count("metrics") <= 1 and "metrics" not in middle[:-1], stream.events
    tokens = [frame.data for frame in stream.frames if frame.event == "token"]
    assert [token["i"] for token in tokens] == list(range(len(tokens)))
    assert all(isinstance(token["t"], str) and token["t"] for token in tokens)
    if terminal.event == "end":
        end = terminal.data
        assert isinstance(end["tokens_out"], int) and isinstance(end["decode_time_ms"], int)
        assert isinstance(end["stop_reason"], str)
        assert ("stop_sequence_matched" in end) == (end["stop_reason"] == "stop_sequence")
    else:
        check_error(terminal.data)


def check_error(error: dict[str, Any]) -> None:
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert isinstance(error["retriable"], bool)


class StreamReader(threading.Thread):
    """Reads one `/execute` stream on a thread, recording each frame's arrival time."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(daemon=True)
        self.url, self.body, self.request_headers = url, body, headers
        self.frames: list[Frame] = []
        self.status: int | None = None
        self.headers = httpx.Headers()
        self.raw = b""
        self.failure: BaseException | None = None
        self.responded = threading.Event()  # set once the response headers are in
        self._finished = False
        self._changed = threading.Condition()

    def run(self) -> None:
        def recorded(chunks: Iterable[bytes]) -> Iterator[bytes]:
            for chunk in chunks:
                self.raw += chunk
                yield chunk

        try:
            with (
                httpx.Client(timeout=TIMEOUT) as client,
                client.stream(
                    "POST", f"{self.url}/execute", json=self.body, headers=self.request_headers
                ) as response,
            ):
                self.status, self.headers = response.status_code, response.headers
                self.responded.set()
                for frame in iter_frames(recorded(response.iter_bytes())):
                    with self._changed:
                        self.frames.append(frame)
                        self._changed.notify_all()
        except BaseException as failure:  # reported by result()
            self.failure = failure
        finally:
            self.responded.set()
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def wait_for(self, event: str, count: int = 1, timeout: float = 60) -> Frame:
        """The `count`-th frame of this event, once it has arrived."""

        def matches() -> list[Frame]:
            return [frame for frame in self.frames if frame.event == event]

        with self._changed:
            self._changed.wait_for(lambda: self._finished or len(matches()) >= count, timeout)
            found = matches()
        assert len(found) >= count, f"no {event} #{count}: {[f.event for f in self.frames]}"
        return found[count - 1]

    def result(self, timeout: float = 60) -> Stream:
        self.join(timeout)
        assert not self.is_alive(), f"the stream did not end within {timeout} s"
        if self.failure is not None:
            raise self.failure
        assert self.status is not None
        return Stream(self.status, self.headers, self.raw, self.frames)


def cancel(url: str, job_id: str) -> httpx.Response:
    return httpx.post(f"{url}/cancel", json={"job_id": job_id}, timeout=TIMEOUT)


def new_job_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def counting(job_id: str, max_tokens: int = 2048) -> dict[str, Any]:
    """A long greedy job: cancel it rather than wait for its 2048 tokens."""
    return {"job_id": job_id, "prompt": COUNTING, "temperature": 0.0, "max_tokens": max_tokens}


@contextlib.contextmanager
def long_job(url: str, job_id: str | None = None) -> Iterator[StreamReader]:
    """A counting job that has streamed its first token; cancelled on exit."""
    reader = StreamReader(url, counting(job_id or new_job_id("long")))
    reader.start()
    try:
        reader.wait_for("token")
        yield reader
    finally:
        cancel(url, reader.body["job_id"])
        reader.join(30)
