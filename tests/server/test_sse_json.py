"""SSE data lines that every client splits where the server means them to end."""

from __future__ import annotations

import json

from worker_orcd.server.streaming import sse_json


def test_sse_json_survives_clients_that_split_on_unicode_line_breaks():
    # httpx's aiter_lines splits as str.splitlines does: at U+0085, U+2028 and U+2029 too,
    # which JSON leaves unescaped in text; a token's text may hold any of them.
    payload = {"text": "a\u2028b\u2029c\x85d\n\r日本🌍é"}
    line = sse_json(payload)
    assert line.splitlines() == [line]
    assert json.loads(line) == payload
    assert "日本🌍é" in line  # other text stays UTF-8, unescaped
