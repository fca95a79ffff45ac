"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

What users' clients speak, modelled on vLLM's and llama.cpp's servers: request bodies ignore
unknown fields (clients send plenty), fields OpenAI defines but this worker cannot honour are
refused with 400 rather than silently dropped, and errors take OpenAI's
`{"error": {message, type, param, code}}` shape so that the official client raises its own
exception classes. Both generation endpoints share one path: prompt -> job -> answer, where the
answer is a JSON body or an SSE stream of `data:` chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from worker_orcd.engine.engine import Engine, Failed, Finished, Job, JobRejected, Started, Token
from worker_orcd.engine.output import GenerationResult
from worker_orcd.sampling_params import BOUNDS, SamplingParams
from worker_orcd.server.body import JSONRoute
from worker_orcd.server.errors import OPENAI_ERRORS, STATUS_BY_CODE, ApiError
from worker_orcd.server.narration import prompt_digest
from worker_orcd.server.schemas import MAX_STOP_SEQUENCES, MAX_STOP_TOKENS
from worker_orcd.server.streaming import event_stream, sse_json
from worker_orcd.tokenizer import ChatTemplateError, Tokenizer

if TYPE_CHECKING:
    from worker_orcd.server.app import Worker

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {
    "eos": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "context_length": "length",
}


def is_field(part: str | int) -> bool:
    """Whether a pydantic error location part names a field or an index, rather than the body or
    the member of a union that was tried (`str`, `list[int]`, `constrained-str`)."""
    return isinstance(part, int) or (
        part.isidentifier() and part not in {"body", "str", "int", "float", "bool"}
    )


def invalid_request(errors: Any) -> JSONResponse:
    """A failed body validation as OpenAI's 400, naming the first offending field."""
    first = errors[0] if errors else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if is_field(part)) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return ApiError(400, message, param).response()


class OpenAIModel(BaseModel):
    """Unknown fields are ignored and null means "the default", as OpenAI and vLLM take them."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        if value is None and not field.is_required():
            return field.get_default(call_default_factory=True)
        return value


class StreamOptions(OpenAIModel):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1)]


class GenerationRequest(OpenAIModel):
    """The fields both generation endpoints share: model, limits, sampling, streaming."""

    model: str | None = Field(None, description="the served model's id; absent means that one")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, **BOUNDS["temperature"].field(), description="0 is greedy")
    top_p: float = Field(1.0, **BOUNDS["top_p"].field(), description="1 disables")
    top_k: int = Field(0, ge=-1, description="vLLM extra: 0 or -1 disables")
    min_p: float = Field(0.0, **BOUNDS["min_p"].field(), description="vLLM extra: 0 disables")
    repetition_penalty: float = Field(
        1.0, **BOUNDS["repetition_penalty"].field(), description="vLLM extra: 1 disables"
    )
    seed: int | None = Field(None, ge=-1, lt=1 << 64, description="absent or -1: random")
    stop: Stop | list[Stop] | None = Field(None, description=f"at most {MAX_STOP_SEQUENCES}")
    ignore_eos: bool = Field(False, description="vLLM extra: generate past end-of-sequence")
    n: int = Field(1, ge=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, description="only 0: unsupported")
    frequency_penalty: float = Field(0.0, description="only 0: unsupported")
    logit_bias: dict[str, float] | None = Field(None, description="unsupported")
    user: str | None = Field(None, description="accepted and ignored")

    def refusals(self) -> Iterator[tuple[str, str]]:
        """(param, message) for each OpenAI feature asked for that this worker does not have."""
        if self.n != 1:
            yield "n", f"n: only 1 choice per request is supported, got {self.n}"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                yield name, f"{name}: unsupported (only 0 is accepted); use repetition_penalty"
        if self.logit_bias:
            yield "logit_bias", "logit_bias: unsupported"
        if self.stream_options is not None and not self.stream:
            yield "stream_options", "stream_options: only allowed when stream is true"
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            yield "stop", f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}"

    def token_limit(self, room: int) -> int:
        """max_tokens to ask the engine for, given the room the context leaves after the prompt."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Tokenizer) -> tuple[list[int], str]:
        """The prompt as token ids, and as text for the narration digest."""
        raise NotImplementedError


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string or token ids; a list of one string is accepted, batches are not"
    )
    max_tokens: int = Field(DEFAULT_COMPLETION_TOKENS, ge=1)
    echo: bool = Field(False, description="only false")
    logprobs: int | None = Field(None, description="unsupported")
    best_of: int | None = Field(None, description="only 1")
    suffix: str | None = Field(None, description="unsupported")

    def refusals(self) -> Iterator[tuple[str, str]]:
        yield from super().refusals()
        if self.echo:
            yield "echo", "echo: unsupported"
        if self.logprobs is not None:
            yield "logprobs", "logprobs: unsupported"
        if self.best_of not in (None, 1):
            yield "best_of", "best_of: only 1 is supported"
        if self.suffix:
            yield "suffix", "suffix: unsupported"
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and not self.token_ids():
            yield (
                "prompt",
                (
                    f"prompt: a batch of {len(self.prompt)} prompts is not supported; "
                    "send one prompt per request"
                ),
            )

    def token_ids(self) -> list[int] | None:
        """The prompt when it was given as token ids (flat, or a batch of one)."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(item, int) for item in prompt):
            return list(prompt)
        return None

    def token_limit(self, room: int) -> int:
        return self.max_tokens

    def prompt_ids(self, tokenizer: Tokenizer) -> tuple[list[int], str]:
        ids = self.token_ids()
        if ids is None:
            text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
            return tokenizer.encode(text), text
        if bad := [i for i in ids if not 0 <= i < tokenizer.vocab_size]:
            message = (
                f"prompt: token id {bad[0]} is outside the vocabulary of {tokenizer.vocab_size}"
            )
            raise ApiError(400, message, "prompt")
        return ids, tokenizer.decode(ids)


class ContentPart(OpenAIModel):
    type: str
    text: str = ""


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def text_only(self) -> ChatMessage:
        parts = self.content if isinstance(self.content, list) else []
        if kinds := sorted({part.type for part in parts} - {"text"}):
            raise ValueError(f"only text content parts are supported, got {len(kinds)} other")
        return self

    def for_template(self) -> dict[str, str]:
        """Text parts are joined with newlines, as vLLM joins them; `developer` is OpenAI's new
        name for `system`, which is the role chat templates know."""
        content = self.content or ""
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    logprobs: bool = Field(False, description="only false")
    top_logprobs: int | None = Field(None, description="unsupported")
    tools: list[dict[str, Any]] | None = Field(None, description="unsupported")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')

    def refusals(self) -> Iterator[tuple[str, str]]:
        yield from super().refusals()
        if self.logprobs or self.top_logprobs:
            yield "logprobs", "logprobs: unsupported"
        if self.tools:
            yield "tools", "tools: tool calling is unsupported"
        if self.response_format and self.response_format.get("type") != "text":
            yield "response_format", "response_format: only type text is supported"

    def token_limit(self, room: int) -> int:
        """Unset means until end-of-sequence: whatever room the context has left."""
        return self.max_completion_tokens or self.max_tokens or room

    def prompt_ids(self, tokenizer: Tokenizer) -> tuple[list[int], str]:
        try:
            text = tokenizer.apply_chat_template([m.for_template() for m in self.messages])
        except ChatTemplateError as error:
            raise ApiError(400, f"messages: {error}", "messages") from None
        return tokenizer.encode(text, add_special=False), text


@dataclass(frozen=True)
class Flavor:
    """How the two endpoints' answers differ; everything else about them is shared."""

    id_prefix: str
    object: str
    chunk_object: str
    prompt_param: str
    chat: bool

    def choice(self, text: str | None, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
        """One choice; `text` None in a chat chunk is the opening one that names the role."""
        if not self.chat:
            content: dict[str, Any] = {"text": text or ""}
        elif not chunk:
            content = {"message": {"role": "assistant", "content": text}}
        elif finish_reason is not None:
            content = {"delta": {}}
        else:
            delta = {"content": text} if text is not None else {"role": "assistant", "content": ""}
            content = {"delta": delta}
        return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}


COMPLETION = Flavor("cmpl", "text_completion", "text_completion", "prompt", chat=False)
CHAT = Flavor("chatcmpl", "chat.completion", "chat.completion.chunk", "messages", chat=True)


def sampling_params(body: GenerationRequest, tokenizer: Tokenizer, room: int) -> SamplingParams:
    """The engine's parameters from the fields both endpoints share."""
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    for index, stop in enumerate(stops):
        if len(tokenizer.encode(stop, add_special=False)) > MAX_STOP_TOKENS:
            message = f"stop: sequence {index} is longer than {MAX_STOP_TOKENS} tokens"
            raise ApiError(400, message, "stop")
    try:
        return SamplingParams(
            max_tokens=body.token_limit(room),
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=None if body.seed == -1 else body.seed,  # -1 is random, as in llama.cpp
            stop=stops,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def unknown_model(served: str) -> ApiError:
    message = f"The model does not exist: this worker serves `{served}`."
    return ApiError(404, message, "model", "model_not_found")


def usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_token_ids), len(result.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def failure(event: Failed) -> ApiError:
    return ApiError(STATUS_BY_CODE.get(event.code, 500), event.message, code=event.code)


async def cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """A non-streaming client that hangs up frees the engine too, as vLLM's does. The body has
    been read, so the next ASGI message is the disconnect (or never comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.abort(job)


async def collect(request: Request, engine: Engine, job: Job) -> GenerationResult:
    """The job's result, or its failure raised as an ApiError."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, engine, job))
    ended = False
    try:
        async for event in job.events():
            ended = isinstance(event, Finished | Failed)
            if isinstance(event, Failed):
                raise failure(event)
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("a job's events end with Finished or Failed")
    finally:
        watcher.cancel()
        if not ended:  # this handler was cancelled: nobody will read the result
            engine.abort(job)


def data(payload: dict[str, Any] | str) -> dict[str, str]:
    """One SSE message with only a `data:` line, as OpenAI streams them."""
    if isinstance(payload, str):
        return {"data": payload}
    return {"data": sse_json(payload)}


async def stream_chunks(
    engine: Engine, job: Job, flavor: Flavor, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    """Chunks as the tokens come, then finish_reason, [usage], [DONE]; an engine failure is an
    `error` chunk. A client that leaves cancels its job."""
    head = {**head, "object": flavor.chunk_object}
    ended = False
    try:
        async for event in job.events():
            match event:
                case Started() if flavor.chat:
                    yield data({**head, "choices": [flavor.choice(None, None, chunk=True)]})
                case Token(text=text):
                    yield data({**head, "choices": [flavor.choice(text, None, chunk=True)]})
                case Finished(result=result):
                    ended = True
                    finish = FINISH_REASONS[result.stop_reason]
                    yield data({**head, "choices": [flavor.choice("", finish, chunk=True)]})
                    if include_usage:
                        yield data({**head, "choices": [], "usage": usage(result)})
                case Failed():
                    ended = True
                    yield data(failure(event).body())
        yield data("[DONE]")
    finally:
        if not ended:
            engine.abort(job)


async def answer(
    worker: Worker, request: Request, body: GenerationRequest, flavor: Flavor
) -> Response:
    """Both endpoints: check, tokenize, queue the job, then answer in JSON or as a stream."""
    engine, tokenizer = worker.engine, worker.engine.llm.tokenizer
    try:
        if body.model and body.model != worker.model_name:
            raise unknown_model(worker.model_name)
        if refusal := next(body.refusals(), None):
            raise ApiError(400, refusal[1], refusal[0])
        ids, text = await run_in_threadpool(body.prompt_ids, tokenizer)
        room = engine.llm.context_length - len(ids)
        if not ids or room < 1:
            message = (
                f"{flavor.prompt_param}: the prompt has {len(ids)} tokens; this model's context "
                f"length of {engine.llm.context_length} tokens fits 1 to "
                f"{engine.llm.context_length - 1}"
            )
            raise ApiError(400, message, flavor.prompt_param)
        params = sampling_params(body, tokenizer, room)
        job_id = f"{flavor.id_prefix}-{uuid.uuid4().hex}"
        context = {"correlation_id": request.state.correlation_id, **prompt_digest(text)}
        try:
            job = engine.submit(job_id, ids, params, context)
        except JobRejected as rejected:
            status = STATUS_BY_CODE.get(rejected.code, 500)
            raise ApiError(status, str(rejected), code=rejected.code) from None
        head = {"id": job_id, "created": int(time.time()), "model": worker.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = stream_chunks(engine, job, flavor, head, include_usage)
            return event_stream(engine, job, chunks)
        result = await collect(request, engine, job)
    except ApiError as error:
        return error.response()
    finish = FINISH_REASONS[result.stop_reason]
    choice = flavor.choice(result.text, finish, chunk=False)
    return JSONResponse(
        {**head, "object": flavor.object, "choices": [choice], "usage": usage(result)}
    )


GENERATED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `stream`: SSE `data:` chunks ending with `[DONE]`",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


def router(worker: Worker) -> APIRouter:
    routes = APIRouter(
        prefix="/v1", tags=["OpenAI-compatible"], route_class=JSONRoute, responses=OPENAI_ERRORS
    )
    created = int(time.time())

    def card() -> dict[str, Any]:
        return {
            "id": worker.model_name,
            "object": "model",
            "created": created,
            "owned_by": "worker-orcd",
            "max_model_len": worker.engine.llm.context_length,
        }

    @routes.get("/models")
    async def models() -> dict[str, Any]:
        """The one model this worker serves."""
        return {"object": "list", "data": [card()]}

    @routes.get("/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != worker.model_name:
            return unknown_model(worker.model_name).response()
        return JSONResponse(card())

    @routes.post("/completions", responses=GENERATED)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of one prompt (a string or token ids)."""
        return await answer(worker, request, body, COMPLETION)

    @routes.post("/chat/completions", responses=GENERATED)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """A reply to a conversation, rendered with the model's own chat template."""
        return await answer(worker, request, body, CHAT)

    return routes
