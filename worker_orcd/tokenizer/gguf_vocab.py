"""The vocabulary a GGUF file carries in its `tokenizer.ggml.*` metadata, shared by both GGUF
backends: token texts and types, BOS/EOS, the chat template, and the finishing steps that turn a
backend's `tokenizers` model into a `Tokenizer` the way llama.cpp would use it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from worker_orcd.tokenizer.base import Tokenizer, TokenizerError, end_of_generation_ids
from worker_orcd.tokenizer.chat import ChatTemplate


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


def _optional_id(metadata: Mapping[str, Any], key: str, size: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < size:
        raise TokenizerError(f"{key}: expected a token id below {size}, found {value!r}")
    return value


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]
    chat_template: str | None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], add_bos_default: bool) -> GGUFVocab:
        """`add_bos_default` is llama.cpp's default for files without `add_bos_token`."""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise TokenizerError("tokenizer.ggml.tokens: expected a list of strings, found none")
        types = metadata.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(
                f"tokenizer.ggml.token_type: expected {len(tokens)} entries, found {len(types)}"
            )

        def token_id(name: str) -> int | None:
            return _optional_id(metadata, f"tokenizer.ggml.{name}_token_id", len(tokens))

        control = {
            text: index
            for index, (text, kind) in enumerate(zip(tokens, types, strict=True))
            if kind == TokenType.CONTROL
        }
        eos_id = token_id("eos")
        return cls(
            tokens=tokens,
            types=types,
            bos_id=token_id("bos"),
            eos_id=eos_id,
            unk_id=token_id("unknown"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            eog_ids=end_of_generation_ids(control, eos_id, token_id("eot"), token_id("eom")),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    def token_ids(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}

    def ids_of(self, kind: TokenType) -> list[int]:
        return [index for index, found in enumerate(self.types) if found == kind]

    def finish(self, kind: str, backend: tokenizers.Tokenizer) -> Tokenizer:
        """Add the special tokens and BOS/EOS handling to `backend` and wrap it."""
        backend.add_tokens(self._added_tokens())
        backend.post_processor = self._post_processor()
        return Tokenizer(
            kind,
            backend,
            vocab_size=len(self.tokens),
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            eog_ids=self.eog_ids,
            chat_template=ChatTemplate(
                self.chat_template, self._text(self.bos_id), self._text(self.eos_id)
            ),
        )

    def _added_tokens(self) -> list[AddedToken]:
        """Tokens that llama.cpp matches whole in the raw text before any model runs.

        Control and unknown tokens are special (skipped by `decode(skip_special=True)`, which
        is llama.cpp's rendering too); user-defined ones such as `<tool_call>` or Gemma's
        whitespace runs are ordinary text that must never be cut into pieces.
        """
        special = (TokenType.CONTROL, TokenType.UNKNOWN)
        return [
            AddedToken(token, special=kind in special, normalized=False)
            for token, kind in zip(self.tokens, self.types, strict=True)
            if kind in (*special, TokenType.USER_DEFINED)
        ]

    def _post_processor(self) -> processors.TemplateProcessing | None:
        """BOS/EOS around the text, per `add_bos_token`/`add_eos_token`. Template pieces are
        named, not spelled: its parser would misread a token text holding `:` or `$`."""
        bos = ["bos"] if self.add_bos else []
        eos = ["eos"] if self.add_eos else []
        if not bos and not eos:
            return None
        ids = {"bos": self.bos_id, "eos": self.eos_id}
        special = []
        for name in bos + eos:
            token_id = ids[name]
            if token_id is None:
                raise TokenizerError(f"tokenizer.ggml.add_{name}_token: set, but no {name} token")
            special.append({"id": name, "ids": [token_id], "tokens": [self.tokens[token_id]]})
        return processors.TemplateProcessing(single=[*bos, "$A", *eos], special_tokens=special)

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokens[token_id]
