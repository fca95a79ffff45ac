"""ASGI middleware: correlation ids on every request and response, and a request-size limit.

Written against raw ASGI rather than Starlette's BaseHTTPMiddleware so that streaming (SSE)
responses pass through untouched and still get the header on their first message.
"""

from __future__ import annotations

import json
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-correlation-id"
MAX_BODY_BYTES = 1 << 20

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


def valid_correlation_id(value: str | None) -> str | None:
    """A client's id is kept when it is a UUID; anything else is replaced (spec section 7)."""
    if not value or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


class WorkerMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(HEADER.encode(), b"").decode("latin-1")
        cid = valid_correlation_id(given) or str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = cid
        correlation_id.set(cid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), cid.encode())]
            await send(message)

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send_with_id)
            return
        # Read the body here, up to the limit, then replay it: raising from `receive` instead
        # reached FastAPI's body parser, which answers any error there with a 400.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                break
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                await self._too_large(send_with_id)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replay = [message]

        async def replayed_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed_receive, send_with_id)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(
            {
                "code": "REQUEST_TOO_LARGE",
                "message": f"the request body is larger than {self.max_body_bytes} bytes",
                "retriable": False,
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
