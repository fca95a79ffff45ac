"""Request bodies parsed strictly, before any model sees them.

JSON as RFC 8259 has it: sent as `application/json` (or with no content type), UTF-8 only, no
NaN or Infinity, finite numbers, at most `MAX_DEPTH` levels deep, and every string and key valid
Unicode (`"\\ud800"` is valid JSON, but a lone surrogate is no text: it cannot be encoded, so
neither the tokenizer nor an error message may meet it). A failure names the field and the
constraint and never repeats what was sent. `JSONRoute` runs the check for every route with a
body; the app answers `BodyError` in the endpoint's own error shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

MAX_DEPTH = 32  # the deepest a valid request goes is 5 (messages.0.content.0.text)
MAX_FIELD_CHARS = 64  # a field name in an error is cut to this


class BodyError(Exception):
    """A body that is not the JSON this worker takes; nothing of it is repeated."""

    def __init__(self, field: str, constraint: str, message: str):
        super().__init__(message)
        self.field, self.constraint, self.message = field, constraint, message


def field_name(location: tuple[str | int, ...] | list[str | int]) -> str:
    """A location as a dotted field name; keys that are not plain text are escaped."""
    parts = [
        part if not isinstance(part, str) or part.isprintable() else ascii(part)[1:-1]
        for part in location
    ]
    return ".".join(str(part)[:MAX_FIELD_CHARS] for part in parts) or "body"


def _reject_constant(name: str) -> Any:
    raise BodyError("body", "json", f"body: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError("body", "json", "body: a number is too large to be finite")
    return value


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (`application/json`, `application/*+json`)."""
    if not content_type:
        return True  # no header: taken as JSON, as FastAPI does
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse_body(raw: bytes, content_type: str | None) -> Any:
    """The body's JSON value, or BodyError saying which rule it broke and where."""
    if not is_json(content_type):
        raise BodyError(
            "body",
            "content_type(application/json)",
            "body: send JSON with Content-Type: application/json",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BodyError(
            "body", "utf8", f"body: not valid UTF-8 (byte {error.start} is not)"
        ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise BodyError(
            "body", f"max_depth({MAX_DEPTH})", f"body: nested deeper than {MAX_DEPTH} levels"
        ) from None
    except json.JSONDecodeError as error:
        message = f"body: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        raise BodyError("body", "json", message) from None
    except ValueError:  # an integer of more digits than Python converts
        raise BodyError("body", "json", "body: a number has too many digits") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Depth and Unicode of every member, without recursion (the body may be deep)."""
    pending: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while pending:
        item, location = pending.pop()
        if isinstance(item, str):
            _check_text(item, location)
            continue
        if isinstance(item, dict | list) and len(location) >= MAX_DEPTH:
            field = field_name(location)
            message = f"{field}: nested deeper than {MAX_DEPTH} levels"
            raise BodyError(field, f"max_depth({MAX_DEPTH})", message)
        if isinstance(item, dict):
            for key, member in item.items():
                _check_text(key, location)
                pending.append((member, (*location, key)))
        elif isinstance(item, list):
            pending.extend((member, (*location, index)) for index, member in enumerate(item))


def _check_text(text: str, location: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        field = field_name(location)
        message = f"{field}: not valid Unicode (a lone surrogate at character {error.start})"
        raise BodyError(field, "unicode", message) from None


class CheckedRequest(Request):
    """A request whose `json()` is `parse_body`'s, so FastAPI validates what was checked."""

    async def json(self) -> Any:
        if not hasattr(self, "_checked"):
            self._checked = parse_body(await self.body(), self.headers.get("content-type"))
        return self._checked


class JSONRoute(APIRoute):
    """FastAPI's route, with the body parsed by `parse_body` before FastAPI reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            request = CheckedRequest(request.scope, request.receive)
            if self.body_field is not None and await request.body():
                await request.json()  # a BodyError here is answered before FastAPI's parse
            return await handler(request)

        return checked
