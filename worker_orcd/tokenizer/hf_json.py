"""`hf-json`: a model's own `tokenizer.json`, for models whose GGUF vocabulary is not enough
(GPT-OSS). The file brings its own normalizer, pre-tokenizer, decoder and BOS/EOS post-processor;
what it cannot say (which special token is BOS or EOS, the chat template) comes from the
`tokenizer_config.json` / `chat_template.jinja` beside it, as Hugging Face lays them out, and
else from the GGUF metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from worker_orcd.tokenizer.base import Tokenizer, TokenizerError, end_of_generation_ids
from worker_orcd.tokenizer.chat import ChatTemplate


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path}: expected a JSON object, found: {error}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _token_id(
    backend: Backend, config: Mapping[str, Any], name: str, metadata_id: int | None
) -> int | None:
    """The id of `config[name]` (a string or `{"content": ...}`), else the GGUF's own id."""
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return metadata_id
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer_config.json: {name} {token!r} is not in tokenizer.json")
    return token_id


def _text(backend: Backend, token_id: int | None) -> str:
    return "" if token_id is None else backend.id_to_token(token_id) or ""


def _chat_template(
    path: Path, config: Mapping[str, Any], metadata: Mapping[str, Any]
) -> str | None:
    jinja = path.with_name("chat_template.jinja")
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else metadata.get("tokenizer.chat_template")


def load(path: Path, metadata: Mapping[str, Any]) -> Tokenizer:
    try:
        backend = Backend.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for every problem
        raise TokenizerError(f"{path}: expected a tokenizers JSON file, found: {error}") from None
    config = _read_config(path.with_name("tokenizer_config.json"))
    bos_id = _token_id(backend, config, "bos_token", metadata.get("tokenizer.ggml.bos_token_id"))
    eos_id = _token_id(backend, config, "eos_token", metadata.get("tokenizer.ggml.eos_token_id"))
    special = {
        token.content: token_id
        for token_id, token in backend.get_added_tokens_decoder().items()
        if token.special
    }
    return Tokenizer(
        "hf-json",
        backend,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_id=bos_id,
        eos_id=eos_id,
        eog_ids=end_of_generation_ids(special, eos_id),
        chat_template=ChatTemplate(
            _chat_template(path, config, metadata), _text(backend, bos_id), _text(backend, eos_id)
        ),
    )
