"""ASGI middleware: correlation ids on every request and response, the API key when one is set,
and the body's framing, size and read deadline, all checked before any route runs.

Written against raw ASGI rather than Starlette's BaseHTTPMiddleware so that streaming (SSE)
responses pass through untouched and still get the header on their first message.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker_orcd.server.connections import HttpLimits
from worker_orcd.server.errors import error_response
from worker_orcd.server.narration import current_correlation_id

HEADER = "x-correlation-id"
OPEN_PATHS = {"/health"}  # answered without the API key: an orchestrator's liveness probe


def valid_correlation_id(value: str | None) -> str | None:
    """A client's id is kept when it is a UUID; anything else is replaced (spec section 7)."""
    if not value or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def authorized(headers: dict[bytes, bytes], api_key: str) -> bool:
    """Whether the request carries `Authorization: Bearer <api_key>`, compared in constant
    time (how long the check takes tells nothing of the key)."""
    given = headers.get(b"authorization", b"")
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode())


class WorkerMiddleware:
    def __init__(self, app: ASGIApp, limits: HttpLimits, api_key: str | None = None):
        self.app = app
        self.limits = limits
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(HEADER.encode(), b"").decode("latin-1")
        cid = valid_correlation_id(given) or str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = cid
        current_correlation_id.set(cid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), cid.encode())]
            await send(message)

        async def refuse(status: int, code: str, message: str) -> None:
            """Answer and close: the rest of the body is never read, so the connection's
            framing is lost (RFC 9112 section 6.3)."""
            response = error_response(scope["path"], status, code, message)
            response.headers["connection"] = "close"
            if status == 401:
                response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send_with_id)

        if (
            self.api_key
            and scope["path"] not in OPEN_PATHS
            and not authorized(headers, self.api_key)
        ):
            message = "a valid API key is required: send the header Authorization: Bearer <key>"
            await refuse(401, "UNAUTHORIZED", message)
            return

        if b"transfer-encoding" in headers and b"content-length" in headers:
            message = "Content-Length and Transfer-Encoding together: the body's length is unclear"
            await refuse(400, "INVALID_REQUEST", message)
            return
        limit = self.limits.max_body_bytes
        too_large = f"the request body is larger than {limit} bytes"
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await refuse(413, "REQUEST_TOO_LARGE", too_large)
            return
        # Read the body here, up to the limit, then replay it: raising from `receive` instead
        # reached FastAPI's body parser, which answers any error there with a 400.
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.limits.read_timeout)
            except TimeoutError:
                stalled = f"no part of the body arrived for {self.limits.read_timeout:g} s"
                await refuse(408, "REQUEST_TIMEOUT", stalled)
                return
            if message["type"] != "http.request":  # the client left mid-body
                break
            received += len(message.get("body", b""))
            if received > limit:
                await refuse(413, "REQUEST_TOO_LARGE", too_large)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replay = [message]

        async def replayed_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed_receive, send_with_id)
