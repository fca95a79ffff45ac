"""The tests' own SSE parser, on fixed bytes (no server)."""

from __future__ import annotations

import pytest
from sse_client import iter_frames

WIRE = (
    'event: started\r\ndata: {"type": "started", "seed": 1}\r\n\r\n'
    ": ping - 2026-01-01\r\n\r\n"
    'event: token\r\ndata: {"type": "token", "t": "日本\u2028🌍", "i": 0}\r\n\r\n'
    'event: end\ndata: {"type": "end"}\n\n'
).encode()


def test_frames_are_the_same_however_the_bytes_are_split():
    whole = list(iter_frames([WIRE]))
    assert [(f.event, f.data.get("t")) for f in whole] == [
        ("started", None),
        ("token", "日本\u2028🌍"),  # U+2028 is not a line end in SSE
        ("end", None),
    ]
    assert list(iter_frames(WIRE[i : i + 1] for i in range(len(WIRE)))) == whole


def test_invalid_utf8_fails_the_parse():
    with pytest.raises(UnicodeDecodeError):
        list(iter_frames([b'event: token\r\ndata: {"t": "\xe6\x97"}\r\n\r\n']))


def test_a_stream_cut_inside_a_frame_fails_the_parse():
    with pytest.raises(AssertionError, match="inside a frame"):
        list(iter_frames([WIRE[:-1]]))
