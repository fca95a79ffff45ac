"""Deadlines and a cap for HTTP connections, so that no client can hold the worker's sockets.

uvicorn closes a keep-alive connection that stays idle after a response, but has no deadline for
a request's headers (a connection that sends nothing, or a byte at a time, stays open forever)
and answers its own concurrency cap in plain text. `GuardedProtocol` is uvicorn's HTTP/1.1
protocol (h11 still parses everything) with those two added; the deadline for each read of a
body is the middleware's, which sees the reads.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker_orcd.server.errors import error_response


@dataclass(frozen=True)
class HttpLimits:
    read_timeout: float = 10.0  # seconds for a request's headers, and for each read of its body
    keep_alive_timeout: float = 5.0  # an idle connection between requests is closed after this
    max_connections: int = 1024  # open connections; the next one gets 503 and is closed
    max_body_bytes: int = 1 << 20


async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer on a connection past the cap, in the shape of the endpoint it asked for."""
    response = error_response(
        scope["path"], 503, "OVERLOADED", "too many open connections; retry shortly", True
    )
    response.headers["connection"] = "close"
    await response(scope, receive, send)


class GuardedProtocol(H11Protocol):
    """A connection must deliver each request's headers within `read_timeout` of opening or of
    its previous response; past `max_connections`, its request gets a 503 and it is closed."""

    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._headers_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, limits: HttpLimits) -> functools.partial[GuardedProtocol]:
        """What uvicorn's `Config(http=...)` takes: the protocol with these limits."""
        return functools.partial(cls, limits=limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = overloaded
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._cancel_deadline()
        self._headers_deadline = self.loop.call_later(
            self.limits.read_timeout, self._headers_overdue
        )

    def _cancel_deadline(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _headers_overdue(self) -> None:
        """Close the connection if it is still waiting for a request's headers."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
