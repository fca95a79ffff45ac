"""The two error shapes, and which endpoint speaks which.

The M0 endpoints answer `{"code", "message", "retriable"}` (M0-W-1500); `/v1` answers OpenAI's
`{"error": {"message", "type", "param", "code"}}`, so that the official clients raise their own
exception classes. Whatever answers before a route's code runs (the body parser, the connection
guards) picks the shape by path with `error_response`. Every 503 says when to come back.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from worker_orcd.server.schemas import ErrorBody, ValidationErrorBody

RETRY_AFTER_SECONDS = 5  # M0-W-1630's shutdown budget: a replacement worker is up by then


# Engine codes (refusals and failures) -> HTTP status. 499 (client closed request) for a
# cancelled job: it is not the server's fault and must not be a 5xx, which clients retry.
STATUS_BY_CODE = {
    "INVALID_REQUEST": 400,
    "DUPLICATE_JOB_ID": 409,
    "CANCELLED": 499,
    "SHUTTING_DOWN": 503,
    "QUEUE_FULL": 503,
}


def headers_for(status: int) -> dict[str, str] | None:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None


class ApiError(Exception):
    """An OpenAI-shaped error; raised anywhere on a `/v1` request's path, answered by its route."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers_for(self.status))


def m0_error(status: int, code: str, message: str, retriable: bool = False) -> JSONResponse:
    body = ErrorBody(code=code, message=message, retriable=retriable).model_dump()
    return JSONResponse(body, status, headers_for(status))


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def documented(model: type[BaseModel], statuses: dict[int, str]) -> dict[int | str, Any]:
    """OpenAPI `responses` for these error statuses, all in one body shape."""
    return {status: {"model": model, "description": text} for status, text in statuses.items()}


# What any request may be answered before its route runs (the middleware, the connection cap).
TRANSPORT_ERRORS = {
    401: "the worker asks for an API key (`--api-key`) and the request lacks it",
    408: "a part of the body did not arrive within the read timeout",
    413: "the body is larger than 1 MiB",
    503: "shutting down, or too many connections: retry after Retry-After seconds",
}
M0_ERRORS = documented(ErrorBody, TRANSPORT_ERRORS)
M0_BODY_ERRORS = {
    **M0_ERRORS,
    400: {
        "model": ValidationErrorBody | ErrorBody,
        "description": "invalid fields, each named with its constraint; or unclear framing",
    },
}
OPENAI_ERRORS = documented(
    OpenAIErrorBody,
    {
        **TRANSPORT_ERRORS,
        400: "invalid or unsupported fields",
        404: "an unknown model id",
        499: "the job was cancelled",
    },
)


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(
    path: str, status: int, code: str, message: str, retriable: bool = False
) -> JSONResponse:
    """An error in the shape of the endpoint at `path`."""
    if is_openai(path):
        return ApiError(status, message, code=code).response()
    return m0_error(status, code, message, retriable)
