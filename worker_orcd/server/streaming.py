"""SSE responses bound to a job: a client that disconnects cancels the job it was reading."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from sse_starlette import EventSourceResponse

from worker_orcd.engine.engine import Engine, Job

# Line breaks to str.splitlines (and so to httpx's `aiter_lines`) that JSON leaves unescaped.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse_json(payload: Any) -> str:
    """`payload` as JSON for one SSE data line: UTF-8 text as is, but the characters that
    clients splitting on every Unicode line break would cut the line at escaped."""
    return json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)


def event_stream(
    engine: Engine, job: Job, events: AsyncIterator[dict[str, str]]
) -> EventSourceResponse:
    """Stream `events`; when the client goes away, even before the first event, the job ends.

    The generator's own `finally` covers a stream that was started; the close handler also
    covers a client that leaves before the response pulled anything from it.
    """

    async def client_left(message: MutableMapping[str, Any]) -> None:
        engine.abort(job)

    return EventSourceResponse(events, client_close_handler_callable=client_left)
