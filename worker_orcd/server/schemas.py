"""Request bodies of the M0 API and the one shape every validation error takes (M0-W-1302).

Types are strict (a string is never taken for a number) and unknown fields are refused, so a
typo in a field name is an error rather than a silently ignored default.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from worker_orcd.sampling_params import BOUNDS
from worker_orcd.server.body import field_name

MAX_PROMPT_CHARS = 32_768
MAX_TOKENS = 2_048
MAX_STOP_SEQUENCES = 4
MAX_STOP_TOKENS = 32


class ExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(MAX_TOKENS, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, **BOUNDS["temperature"].field(), description="0 is greedy")
    top_p: float = Field(1.0, **BOUNDS["top_p"].field(), description="1 disables")
    top_k: int = Field(
        0, **BOUNDS["top_k"].field(), description="0 disables; at most the vocabulary size"
    )
    min_p: float = Field(0.0, **BOUNDS["min_p"].field(), description="0 disables")
    repetition_penalty: float = Field(
        1.0, **BOUNDS["repetition_penalty"].field(), description="1 disables"
    )
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, description="each at most 32 tokens"
    )
    seed: int | None = Field(None, **BOUNDS["seed"].field(), description="generated when absent")


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(min_length=1, max_length=256)


class FieldError(BaseModel):
    field: str
    constraint: str
    message: str
    value: str | None = None


class ValidationErrorBody(BaseModel):
    code: str = "INVALID_REQUEST"
    errors: list[FieldError]


class ErrorBody(BaseModel):
    code: str
    message: str
    retriable: bool = False


def _constraint(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    bounds = {
        "greater_than_equal": f">={ctx.get('ge')}",
        "greater_than": f">{ctx.get('gt')}",
        "less_than_equal": f"<={ctx.get('le')}",
        "less_than": f"<{ctx.get('lt')}",
    }
    if kind in bounds:
        return f"range({bounds[kind]})"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "non_empty"
    if kind in ("string_too_short", "string_too_long", "too_short", "too_long"):
        limit = "min" if "short" in kind else "max"
        return f"{limit}_length({ctx.get(f'{limit}_length')})"
    names = {"missing": "required", "extra_forbidden": "unknown_field"}
    if kind in names:
        return names[kind]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"type({kind.rsplit('_', 1)[0]})"
    return kind


def field_errors(errors: list[dict[str, Any]]) -> list[FieldError]:
    """pydantic's errors as the spec's `{field, constraint, message, value}` list.

    A value is repeated only when it is a number, a boolean or null: strings are what a request
    says (prompts, stop strings, ids), and no error carries them back."""
    result = []
    for error in errors:
        location = error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"]
        field = field_name(location)
        value, given = None, error.get("input")
        if error["type"] != "missing" and (given is None or isinstance(given, int | float)):
            value = str(given)
        message = f"{field}: {error['msg']}" + (f" (got {value})" if value is not None else "")
        result.append(
            FieldError(field=field, constraint=_constraint(error), message=message, value=value)
        )
    return result
