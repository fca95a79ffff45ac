"""The GGUF backends on small synthetic vocabularies: pre-tokenizer splits with no real file here
(`llama-bpe`, `gpt-4o`, `default`), metadata handling, special tokens and errors.

The expected splits were checked against llama.cpp's own `unicode_regex_split` with the regex
lists of its `llm_tokenizer_bpe` (llama.cpp as vendored in llama-cpp-python 0.3.36).
"""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import pre_tokenizers

from worker_orcd.tokenizer import Tokenizer, TokenizerError, load_tokenizer

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"]


def byte_level(text: str) -> str:
    """`text` spelled in GPT-2's byte alphabet, as byte-level vocabularies store their tokens."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[
        0
    ][0]


def bpe_metadata(pre: str | None, words: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """Every byte, then `words` built up by left-to-right merges, then control tokens."""
    prefixes = list(
        dict.fromkeys(w[:end] for w in map(byte_level, words) for end in range(2, len(w) + 1))
    )
    tokens = [*ALPHABET, *prefixes, *SPECIALS]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS),
        "tokenizer.ggml.merges": [f"{prefix[:-1]} {prefix[-1]}" for prefix in prefixes],
        "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|end_of_text|>"),
        **extra,
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    return metadata


def add_token(metadata: dict[str, Any], text: str, token_type: int) -> int:
    metadata["tokenizer.ggml.tokens"].append(text)
    metadata["tokenizer.ggml.token_type"].append(token_type)
    return len(metadata["tokenizer.ggml.tokens"]) - 1


def splits(tokenizer: Tokenizer, text: str) -> list[str]:
    backend = tokenizer.backend
    return [
        backend.decoder.decode([piece]) for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)
    ]


# (pre-tokenizer, text, its pieces joined by "|")
SPLITS = [
    ("llama-bpe", "I'M here, DON'T go 12345678!", "I|'M| here|,| DON|'T| go| |123|456|78|!"),
    ("llama-bpe", "$hello world?\n\n  next\n", "$hello| world|?\n\n| | next|\n"),
    ("llama-bpe", "XMLHttpRequest iPhone's a/b/c", "XMLHttpRequest| iPhone|'s| a|/b|/c"),
    ("gpt-4o", "I'M here, DON'T go 12345678!", "I'M| here|,| DON'T| go| |123|456|78|!"),
    ("gpt-4o", "XMLHttpRequest iPhone's a/b/c", "XMLHttp|Request| i|Phone's| a|/b|/c"),
    ("gpt-4o", "HELLOWorld helloWORLD", "HELLOWorld| hello|WORLD"),
    ("default", "I'M here, DON'T go 12345678!", "I|'|M| here|,| DON|'|T| go| |123|456|78|!"),
    ("default", "$hello world?\n\n  next\n", "$|hello| world|?|\n\n | next|\n"),
    ("default", "foo.bar(baz)!? 12345 x+y<=z", "foo|.|bar|(|baz|)!?| |123|45| x|+|y|<=|z"),
    ("smollm", "Year 2024!", "Year| |2|0|2|4|!"),
    ("qwen2", "x = 42\n\n", "x| =| |4|2|\n\n"),
]


@pytest.mark.parametrize(("pre", "text", "pieces"), SPLITS)
def test_pre_tokenizer_splits(pre, text, pieces):
    tokenizer = load_tokenizer(bpe_metadata(pre))
    assert splits(tokenizer, text) == pieces.split("|")
    assert tokenizer.decode(tokenizer.encode(text, add_special=False)) == text


def test_merges_never_cross_a_split():
    """ " 2024" is one token of this vocabulary, but smollm splits digits off first."""
    tokenizer = load_tokenizer(bpe_metadata("smollm", words=(" 2024", "Year")))
    tokens = [tokenizer.decode([i]) for i in tokenizer.encode("Year 2024")]
    assert tokens == ["Year", " ", "2", "0", "2", "4"]
    tokenizer = load_tokenizer(bpe_metadata("gpt-2", words=(" 2024", "Year")))
    assert [tokenizer.decode([i]) for i in tokenizer.encode("Year 2024")] == ["Year", " 2024"]


def test_llama3_keeps_a_piece_that_is_a_token_whole():
    """llama.cpp's ignore_merges for llama-bpe: "hello" is in the vocabulary with no merges."""
    metadata = bpe_metadata("llama-bpe")
    hello = add_token(metadata, "hello", 1)
    assert load_tokenizer(metadata).encode("hello", add_special=False) == [hello]
    metadata["tokenizer.ggml.pre"] = "default"
    assert len(load_tokenizer(metadata).encode("hello", add_special=False)) == 5


def test_bos_defaults_follow_llama_cpp():
    """Without add_bos_token, llama.cpp adds BOS for Llama 3 vocabularies only."""
    assert load_tokenizer(bpe_metadata("llama-bpe")).add_bos
    assert not load_tokenizer(bpe_metadata("default")).add_bos
    explicit = load_tokenizer(bpe_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert not explicit.add_bos
    both = load_tokenizer(
        bpe_metadata(
            "default",
            **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True},
        )
    )
    assert both.encode("a") == [both.bos_id, ALPHABET.index("a"), both.eos_id]
    assert both.encode("a", add_special=False) == [ALPHABET.index("a")]


def test_missing_pre_tokenizer_is_llama_cpp_default():
    assert splits(load_tokenizer(bpe_metadata(None)), "a+b") == ["a", "+", "b"]


def test_special_and_user_defined_tokens():
    metadata = bpe_metadata("llama-bpe")
    think = add_token(metadata, "<think>", 4)  # user-defined: matched whole, but it is text
    custom = add_token(metadata, "<|custom_end|>", 3)
    metadata["tokenizer.ggml.eot_token_id"] = custom
    tokenizer = load_tokenizer(metadata)
    ids = tokenizer.encode("<think>hi<|eot_id|>", add_special=False)
    eot = SPECIALS.index("<|eot_id|>") + len(ALPHABET)
    assert ids[0] == think and ids[-1] == eot and len(ids) == 4
    assert tokenizer.decode(ids, skip_special=True) == "<think>hi"
    # eos, <|eot_id|> (a known end-of-turn text), and whatever eot_token_id names
    assert tokenizer.eog_ids == {tokenizer.eos_id, eot, custom}


def test_harmony_end_is_not_end_of_generation():
    """gpt-oss ends messages inside a turn with <|end|>; <|return|> and <|call|> end it."""
    metadata = bpe_metadata("gpt-4o")
    end, ret, call = (add_token(metadata, t, 3) for t in ("<|end|>", "<|return|>", "<|call|>"))
    eog_ids = load_tokenizer(metadata).eog_ids
    assert {ret, call} <= eog_ids and end not in eog_ids


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.pre": "no-such-pre"}, "tokenizer.ggml.pre: expected one of"),
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model: expected one of gpt2, llama"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id: expected a token id below"),
        ({"tokenizer.ggml.token_type": [1]}, "token_type: expected"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges: expected a list"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens: expected a list"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.scores: expected"),
    ],
)
def test_unsupported_metadata_is_a_clear_error(change, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer({**bpe_metadata("default"), **change})
    assert issubclass(TokenizerError, ValueError)


def spm_metadata(pieces: dict[str, float], add_space_prefix: bool) -> dict[str, Any]:
    """<unk>, <s>, </s>, the 256 byte pieces, then `pieces` with their scores."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(pieces.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def pieces_of(tokenizer: Tokenizer, text: str) -> list[str]:
    backend = tokenizer.backend
    return [backend.id_to_token(i) for i in tokenizer.encode(text, add_special=False)]


def test_spm_merges_follow_the_scores():
    """llama.cpp merges the pair whose joined piece scores best, wherever it is."""
    prefer_bc = spm_metadata({"a": -1, "b": -1, "c": -1, "ab": -3, "bc": -2}, False)
    assert pieces_of(load_tokenizer(prefer_bc), "abc") == ["a", "bc"]
    prefer_ab = spm_metadata({"a": -1, "b": -1, "c": -1, "ab": -2, "bc": -3}, False)
    assert pieces_of(load_tokenizer(prefer_ab), "abc") == ["ab", "c"]


def test_spm_space_prefix_as_llama_cpp():
    """With add_space_prefix, every run of text, also one after a special token, gets a `▁`;
    decoding drops the one in front (llama.cpp does both; transformers' Metaspace only prefixes
    the start)."""
    words = {"▁": -1, "h": -1, "i": -1, "▁h": -2, "hi": -3, "▁hi": -4}
    tokenizer = load_tokenizer(spm_metadata(words, add_space_prefix=True))
    assert pieces_of(tokenizer, "hi hi") == ["▁hi", "▁hi"]
    assert pieces_of(tokenizer, "</s>hi") == ["</s>", "▁hi"]
    assert tokenizer.encode("hi") == [1, tokenizer.backend.token_to_id("▁hi")]  # BOS by default
    assert tokenizer.decode(tokenizer.encode("hi hi", add_special=False)) == "hi hi"
    plain = load_tokenizer(spm_metadata(words, add_space_prefix=False))
    assert pieces_of(plain, "hi hi") == ["hi", "▁hi"]


def test_spm_byte_fallback():
    tokenizer = load_tokenizer(spm_metadata({"▁": -1, "a": -1}, add_space_prefix=False))
    assert pieces_of(tokenizer, "aé") == ["a", "<0xC3>", "<0xA9>"]
    ids = tokenizer.encode("aé", add_special=False)
    assert tokenizer.decode(ids) == "aé"
    detokenizer = tokenizer.detokenizer()
    assert [detokenizer.push(i) for i in ids] == ["a", "", "é"]
