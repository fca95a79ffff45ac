"""The body parser alone: every class of bad body is a BodyError naming where, never what."""

from __future__ import annotations

import json

import pytest

from worker_orcd.server.body import MAX_DEPTH, BodyError, field_name, is_json, parse_body

SECRET = "do-not-repeat-me"


def refused(raw: bytes, content_type: str | None = "application/json") -> BodyError:
    with pytest.raises(BodyError) as caught:
        parse_body(raw, content_type)
    error = caught.value
    assert SECRET not in error.message and SECRET not in error.field
    assert error.message.startswith(f"{error.field}: ")
    return error


@pytest.mark.parametrize(
    ("content_type", "taken"),
    [
        (None, True),
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/merge-patch+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("json", False),
    ],
)
def test_only_json_content_types_are_taken(content_type: str | None, taken: bool):
    assert is_json(content_type) is taken
    if not taken:
        error = refused(json.dumps({"prompt": SECRET}).encode(), content_type)
        assert (error.field, error.constraint) == ("body", "content_type(application/json)")


@pytest.mark.parametrize(
    ("raw", "constraint"),
    [
        (b'{"prompt": "\xff' + SECRET.encode() + b'"}', "utf8"),
        ('{"prompt": "é"}'.encode("utf-16"), "utf8"),  # JSON is UTF-8 (RFC 8259)
        (b'{"prompt": "\xed\xa0\x80"}', "utf8"),  # a surrogate encoded as UTF-8 bytes
        (b'{"prompt": ' + SECRET.encode() + b"}", "json"),
        (b'{"seed": NaN}', "json"),
        (b'{"seed": -Infinity}', "json"),
        (b'{"temperature": 1e999}', "json"),
        (b'{"seed": ' + b"7" * 5000 + b"}", "json"),
        (b"[" * 50_000 + b"]" * 50_000, f"max_depth({MAX_DEPTH})"),
    ],
    ids=["latin1", "utf16", "cesu8", "syntax", "nan", "infinity", "overflow", "digits", "deep"],
)
def test_a_body_that_is_not_strict_json_is_refused(raw: bytes, constraint: str):
    error = refused(raw)
    assert (error.field, error.constraint) == ("body", constraint)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"job_id": "\\ud800"}', "job_id"),
        (b'{"prompt": "' + SECRET.encode() + b'\\udfff"}', "prompt"),
        (b'{"stop": ["ok", "\\udc00x"]}', "stop.1"),
        (
            b'{"messages": [{"role": "user", "content": [{"text": "\\ud83d"}]}]}',
            "messages.0.content.0.text",
        ),
        (b'{"\\ud800": 1}', "body"),  # the key itself, at the top
        (b'{"messages": [{"\\udfffrole": "user"}]}', "messages.0"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(raw: bytes, field: str):
    error = refused(raw)
    assert (error.field, error.constraint) == (field, "unicode")


def test_a_surrogate_pair_is_text():
    assert parse_body(b'{"prompt": "\\ud83c\\udf0d"}', None) == {"prompt": "🌍"}


def test_depth_is_checked_below_the_parser_s_own_limit():
    nested: object = "leaf"
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    assert parse_body(json.dumps({"prompt": nested}).encode(), None)  # the body's object too
    error = refused(json.dumps({"prompt": [nested]}).encode())
    assert error.constraint == f"max_depth({MAX_DEPTH})"
    assert error.field.startswith("prompt.0.0")


def test_field_names_escape_what_cannot_be_printed_and_stay_short():
    assert field_name(("messages", 0, "content")) == "messages.0.content"
    assert field_name(("\ud800x",)) == "\\ud800x"
    assert field_name(("a\nb",)) == "a\\nb"
    assert len(field_name(("k" * 10_000,))) == 64
    assert field_name(()) == "body"
