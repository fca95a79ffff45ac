"""The `hf-json` backend: tokenizer.json, with BOS/EOS and the template from the files beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.tokenizer import TokenizerError, load_tokenizer
from worker_orcd.tokenizer.chat import CHATML

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>", "<|end|>", "<|start|>"]


def write_tokenizer_json(folder: Path) -> Path:
    """A byte-level tokenizer like gpt-oss's: harmony special tokens, BOS added by its template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(text, special=True) for text in SPECIALS])
    bos = backend.token_to_id("<|startoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", bos)]
    )
    path = folder / "tokenizer.json"
    backend.save(str(path))
    return path


def test_bos_eos_and_template_from_tokenizer_config(tmp_path):
    path = write_tokenizer_json(tmp_path)
    config = {
        "bos_token": "<|startoftext|>",
        "eos_token": {"content": "<|return|>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer({"tokenizer.ggml.eos_token_id": 0}, tokenizer_json=path)
    ids = {text: tokenizer.encode(text, add_special=False)[0] for text in SPECIALS}
    assert tokenizer.kind == "hf-json"
    assert tokenizer.vocab_size == 256 + len(SPECIALS)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (ids["<|startoftext|>"], ids["<|return|>"])
    assert tokenizer.add_bos  # its post-processor adds <|startoftext|>
    assert tokenizer.encode("hi") == [tokenizer.bos_id, *tokenizer.encode("hi", add_special=False)]
    # <|end|> closes a message inside a harmony turn, so it is not end of generation.
    assert tokenizer.eog_ids == {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]}
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hey"}]) == "<|startoftext|>hey"
    )
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}")
    assert load_tokenizer({}, tokenizer_json=path).apply_chat_template([]) == "<|return|>"


def test_without_config_the_gguf_metadata_names_bos_and_eos(tmp_path):
    path = write_tokenizer_json(tmp_path)
    metadata = {"tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}
    tokenizer = load_tokenizer(metadata, tokenizer_json=path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (256, 257)
    assert tokenizer.chat_template.source == CHATML


@pytest.mark.parametrize(
    ("tokenizer_json", "config", "message"),
    [
        ("{}", None, "expected a tokenizers JSON file"),
        (None, "[1]", "expected a JSON object, found list"),
        (None, '{"eos_token": "<|nope|>"}', "eos_token '<|nope|>' is not in tokenizer.json"),
    ],
)
def test_broken_files_are_clear_errors(tmp_path, tokenizer_json, config, message):
    path = write_tokenizer_json(tmp_path)
    if tokenizer_json is not None:
        path.write_text(tokenizer_json)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer({}, tokenizer_json=path)


def test_a_real_vocabulary_saved_as_json_tokenizes_the_same(ours, gguf_path, corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    ours.backend.save(str(path))
    again = load_tokenizer(GGUFFile(gguf_path).metadata, tokenizer_json=path)
    assert (again.bos_id, again.eos_id, again.add_bos) == (ours.bos_id, ours.eos_id, ours.add_bos)
    assert (again.vocab_size, again.eog_ids) == (ours.vocab_size, ours.eog_ids)
    for text in corpus:
        assert again.encode(text) == ours.encode(text), text
