"""SSE responses bound to a job: a client that disconnects cancels the job it was reading."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from sse_starlette import EventSourceResponse

from worker_orcd.engine.engine import Engine, Job


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
