"""`gguf-bpe`: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from vocab + merges metadata.

The merges only reproduce the model's tokenization if the text is first split the way it was
when they were learned; `tokenizer.ggml.pre` names that split. The regexes are the originals
from each model's `tokenizer.json`, which llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp)
rewrites for its own regex engine; a list of several is applied one after the other, each
splitting the pieces the previous one left, as llama.cpp's `unicode_regex_split` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from worker_orcd.tokenizer.base import Tokenizer, TokenizerError
from worker_orcd.tokenizer.gguf_vocab import GGUFVocab

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, also used when a file names no pre-tokenizer.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # digits one by one, then GPT-2's split
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
}
# llama.cpp turns these on for Llama 3 (as its tokenizer.json does): a piece that is already a
# token is kept whole, even where the merges would spell it differently.
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})
_ADD_BOS_BY_DEFAULT = _IGNORE_MERGES  # llama.cpp's default when add_bos_token is absent


def pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The split named by `tokenizer.ggml.pre`, then the GPT-2 byte-to-character mapping."""
    try:
        splits = PRE_TOKENIZER_SPLITS[name]
    except KeyError:
        known = ", ".join(sorted(PRE_TOKENIZER_SPLITS))
        raise TokenizerError(
            f"tokenizer.ggml.pre: expected one of {known}, found {name!r}"
        ) from None
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def load(metadata: Mapping[str, Any]) -> Tokenizer:
    name = metadata.get("tokenizer.ggml.pre", "default")
    vocab = GGUFVocab.from_metadata(metadata, add_bos_default=name in _ADD_BOS_BY_DEFAULT)
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise TokenizerError("tokenizer.ggml.merges: expected a list of 'left right' strings")
    backend = Backend(
        models.BPE(
            vocab=vocab.token_ids(),
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            ignore_merges=name in _IGNORE_MERGES,
        )
    )
    backend.pre_tokenizer = pre_tokenizer(name)
    backend.decoder = decoders.ByteLevel()
    return vocab.finish("gguf-bpe", backend)
