"""The M0 HTTP API (spec sections 1-3): `/execute` (SSE), `/health`, `/cancel`, `/shutdown`, and
OpenAI's `/v1`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker_orcd import __version__
from worker_orcd.engine.engine import Engine, Failed, Finished, Job, JobRejected, Started, Token
from worker_orcd.sampling_params import SamplingParams
from worker_orcd.server import openai_api
from worker_orcd.server.body import BodyError, JSONRoute
from worker_orcd.server.connections import HttpLimits
from worker_orcd.server.errors import (
    M0_BODY_ERRORS,
    M0_ERRORS,
    STATUS_BY_CODE,
    ApiError,
    error_response,
    is_openai,
    m0_error,
)
from worker_orcd.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from worker_orcd.server.metrics import Metrics
from worker_orcd.server.middleware import WorkerMiddleware
from worker_orcd.server.narration import Narrator, prompt_digest
from worker_orcd.server.schemas import (
    MAX_STOP_TOKENS,
    CancelRequest,
    ErrorBody,
    ExecuteRequest,
    FieldError,
    ValidationErrorBody,
    field_errors,
)
from worker_orcd.server.streaming import event_stream, sse_json


@dataclass
class Worker:
    """What the HTTP layer knows of the loaded worker; `/health` answers from it alone."""

    engine: Engine
    metrics: Metrics
    narrate: Narrator
    model_name: str
    device: str
    quant_kind: str
    resident: bool
    vram_bytes_used: int
    started: float  # time.monotonic() at startup
    healthy: bool = True
    draining: bool = False  # shutting down: no new jobs, running ones finish
    shutdown: Callable[[], None] = lambda: None  # begins the drain; `serve` sets it

    def health(self) -> dict[str, Any]:
        llm = self.engine.llm
        stats = self.engine.stats()
        return {
            "status": "draining" if self.draining else "healthy" if self.healthy else "unhealthy",
            "model": self.model_name,
            "resident": self.resident,
            "quant_kind": self.quant_kind,
            "vram_bytes_used": self.vram_bytes_used,
            "tokenizer_kind": llm.tokenizer.kind,
            "vocab_size": llm.tokenizer.vocab_size,
            "context_length": llm.context_length,
            "device": self.device,
            "uptime_seconds": int(time.monotonic() - self.started),
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": round(stats.kv_cache_usage, 4),
        }


def invalid(*errors: FieldError) -> JSONResponse:
    return JSONResponse(ValidationErrorBody(errors=list(errors)).model_dump(exclude_none=True), 400)


def sse(event: str, **data: Any) -> dict[str, str]:
    return {"event": event, "data": sse_json({"type": event, **data})}


async def execute_events(worker: Worker, job: Job) -> AsyncIterator[dict[str, str]]:
    """started -> token* -> [metrics] -> end | error; a client that leaves cancels its job."""
    finished = False
    try:
        async for event in job.events():
            match event:
                case Started(seed=seed):
                    started_at = datetime.now(UTC).isoformat(timespec="seconds")
                    yield sse(
                        "started",
                        job_id=job.job_id,
                        model=worker.model_name,
                        started_at=started_at.replace("+00:00", "Z"),
                        seed=seed,
                    )
                case Token(index=index, text=text):
                    yield sse("token", t=text, i=index)
                case Finished(result=result):
                    finished = True
                    yield sse(
                        "metrics",
                        tokens_per_sec=round(result.tokens_per_second, 2),
                        vram_bytes=worker.vram_bytes_used,
                    )
                    end = {
                        "tokens_out": len(result.token_ids),
                        "decode_time_ms": round(
                            1000 * (result.prefill_seconds + result.decode_seconds)
                        ),
                        "stop_reason": result.stop_reason,
                    }
                    if result.stop_sequence_matched is not None:
                        end["stop_sequence_matched"] = result.stop_sequence_matched
                    yield sse("end", **end)
                case Failed(code=code, message=message, retriable=retriable):
                    finished = True
                    yield sse("error", code=code, message=message, retriable=retriable)
    finally:
        if not finished:
            worker.engine.abort(job)


def create_app(
    worker: Worker, limits: HttpLimits | None = None, api_key: str | None = None
) -> FastAPI:
    """The HTTP app; with `api_key`, every endpoint but /health asks for it."""
    app = FastAPI(
        title="worker-orcd",
        version=__version__,
        summary="Inference worker for one GGUF model: SSE streaming, seeded sampling.",
    )
    app.router.route_class = JSONRoute
    app.add_middleware(WorkerMiddleware, limits=limits or HttpLimits(), api_key=api_key)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request: Request, error: RequestValidationError) -> JSONResponse:
        if is_openai(request.url.path):
            return openai_api.invalid_request(error.errors())
        return invalid(*field_errors(list(error.errors())))

    @app.exception_handler(BodyError)
    async def body_refused(request: Request, error: BodyError) -> JSONResponse:
        if is_openai(request.url.path):
            param = None if error.field == "body" else error.field
            return ApiError(400, error.message, param).response()
        field = FieldError(field=error.field, constraint=error.constraint, message=error.message)
        return invalid(field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """An unknown path or method, in the shape of the endpoints under that path."""
        code = HTTPStatus(error.status_code).name
        response = error_response(request.url.path, error.status_code, code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        """A bug's answer; Starlette then re-raises, and the server logs the traceback."""
        message = f"internal error (correlation id {request.state.correlation_id})"
        return error_response(request.url.path, 500, "INTERNAL", message)

    @app.post(
        "/execute",
        response_class=EventSourceResponse,
        responses={
            **M0_BODY_ERRORS,
            200: {"description": "SSE: started, token*, metrics, then end or error"},
            409: {"model": ErrorBody, "description": "the job_id is already queued or running"},
        },
    )
    async def execute(body: ExecuteRequest, request: Request):
        """Run one job; requests that arrive while one runs wait their turn, in order."""
        tokenizer = worker.engine.llm.tokenizer
        prompt_ids = await run_in_threadpool(tokenizer.encode, body.prompt)
        errors = []
        if body.top_k > tokenizer.vocab_size:
            errors.append(
                FieldError(
                    field="top_k",
                    constraint=f"range(<={tokenizer.vocab_size})",
                    message=f"top_k: at most the vocabulary size {tokenizer.vocab_size}",
                    value=str(body.top_k),
                )
            )
        for index, stop in enumerate(body.stop):
            if len(tokenizer.encode(stop, add_special=False)) > MAX_STOP_TOKENS:
                errors.append(
                    FieldError(
                        field=f"stop.{index}",
                        constraint=f"max_tokens({MAX_STOP_TOKENS})",
                        message=f"stop.{index}: at most {MAX_STOP_TOKENS} tokens",
                    )
                )
        if len(prompt_ids) >= worker.engine.llm.context_length:
            limit = worker.engine.llm.context_length - 1
            errors.append(
                FieldError(
                    field="prompt",
                    constraint=f"max_tokens({limit})",
                    message=f"prompt: {len(prompt_ids)} tokens, at most {limit} fit the context",
                )
            )
        if errors:
            return invalid(*errors)
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=tuple(body.stop),
        )
        context = {"correlation_id": request.state.correlation_id, **prompt_digest(body.prompt)}
        try:
            job = worker.engine.submit(body.job_id, prompt_ids, params, context)
        except JobRejected as rejected:
            status = STATUS_BY_CODE[rejected.code]
            return m0_error(status, rejected.code, str(rejected), retriable=status == 503)
        return event_stream(worker.engine, job, execute_events(worker, job))

    @app.get("/health", responses=M0_ERRORS)
    async def health() -> dict[str, Any]:
        """The worker's state, from cached values only (no GPU calls)."""
        return worker.health()

    @app.get("/metrics", response_class=PlainTextResponse, responses=M0_ERRORS)
    async def metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        return Response(worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/cancel", status_code=202, responses=M0_BODY_ERRORS)
    async def cancel(body: CancelRequest) -> dict[str, Any]:
        """Idempotent: the job's stream ends with `error` CANCELLED; unknown ids are accepted."""
        return {"job_id": body.job_id, "cancelled": worker.engine.cancel(body.job_id)}

    @app.post("/shutdown", status_code=202, responses=M0_ERRORS)
    async def shutdown() -> dict[str, Any]:
        """Drain, as SIGTERM does (M0-W-1340): new jobs get 503, running ones finish within the
        shutdown deadline, then the process exits 0."""
        worker.shutdown()
        return {"status": "draining"}

    app.include_router(openai_api.router(worker))
    served_description = app.openapi

    def description() -> dict[str, Any]:
        """FastAPI's, less the 422 it gives every route with a body: this worker answers an
        invalid body with 400, documented per route."""
        if app.openapi_schema is None:
            for operations in served_description()["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                app.openapi_schema["components"]["schemas"].pop(unused, None)
        return app.openapi_schema

    app.openapi = description  # type: ignore[method-assign]
    return app
