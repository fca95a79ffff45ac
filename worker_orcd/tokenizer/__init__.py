"""Tokenizers for GGUF models (spec M0-W-1360..1365): `gguf-bpe`, `gguf-spm` and `hf-json`
backends on the `tokenizers` library, chat templates, and a UTF-8-safe streaming detokenizer.

    tokenizer = load_tokenizer(GGUFFile(path).metadata)
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker_orcd.tokenizer import gguf_bpe, hf_json, spm
from worker_orcd.tokenizer.base import Tokenizer, TokenizerError
from worker_orcd.tokenizer.chat import ChatTemplate, ChatTemplateError
from worker_orcd.tokenizer.streaming import StreamingDetokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]

_GGUF_BACKENDS = {"gpt2": gguf_bpe.load, "llama": spm.load}


def load_tokenizer(metadata: Mapping[str, Any], tokenizer_json: Path | None = None) -> Tokenizer:
    """The model's tokenizer: from `tokenizer_json` when given, else from the GGUF metadata."""
    if tokenizer_json is not None:
        return hf_json.load(Path(tokenizer_json), metadata)
    model = metadata.get("tokenizer.ggml.model")
    if model not in _GGUF_BACKENDS:
        raise TokenizerError(
            f"tokenizer.ggml.model: expected one of {', '.join(_GGUF_BACKENDS)}, found {model!r}"
        )
    return _GGUF_BACKENDS[model](metadata)
