"""`gguf-spm`: SentencePiece BPE vocabularies (`tokenizer.ggml.model == "llama"`: Llama 2, Gemma,
Phi-3) as a `tokenizers` BPE with byte fallback.

The file has pieces and scores but no merges. llama.cpp's `llm_tokenizer_spm` merges, at each
step, the adjacent pair whose joined text is the best-scoring piece; listing every way to split
each piece into two pieces, best score first, gives a merge table that makes BPE do the same
(as transformers' `generate_merges` does). Only normal pieces are merge results: the special and
user-defined ones are matched whole in the raw text first, and bytes come from fallback.

Spaces become `▁` before merging, with one more in front of each run of text when the file asks
for `add_space_prefix` (llama.cpp prefixes the start and every text after a special token; a
`Prepend` normalizer does exactly that, where transformers' `Metaspace` only prefixes the start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers

from worker_orcd.tokenizer.base import Tokenizer, TokenizerError
from worker_orcd.tokenizer.gguf_vocab import GGUFVocab, TokenType

SPACE = "▁"


def merges(tokens: list[str], scores: list[float], mergeable: list[int]) -> list[tuple[str, str]]:
    """Pairs of pieces whose join is one of the `mergeable` ids, best-scoring join first.

    Ties go to the lower id, then the longer left half, so equal scores stay deterministic.
    """
    known = set(tokens)
    ranked = []
    for token_id in mergeable:
        piece = tokens[token_id]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                ranked.append((-scores[token_id], token_id, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(add_space_prefix: bool) -> normalizers.Normalizer:
    escape = normalizers.Replace(" ", SPACE)
    if not add_space_prefix:
        return escape
    return normalizers.Sequence([normalizers.Prepend(SPACE), escape])


def _decoder(add_space_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def load(metadata: Mapping[str, Any]) -> Tokenizer:
    vocab = GGUFVocab.from_metadata(metadata, add_bos_default=True)
    scores = metadata.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(vocab.tokens):
        raise TokenizerError(
            f"tokenizer.ggml.scores: expected {len(vocab.tokens)} scores, "
            f"found {len(scores) if isinstance(scores, list) else 'none'}"
        )
    backend = Backend(
        models.BPE(
            vocab=vocab.token_ids(),
            merges=merges(vocab.tokens, scores, vocab.ids_of(TokenType.NORMAL)),
            byte_fallback=True,
            fuse_unk=True,
            unk_token=None if vocab.unk_id is None else vocab.tokens[vocab.unk_id],
        )
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = _normalizer(add_space_prefix)
    backend.decoder = _decoder(add_space_prefix)
    return vocab.finish("gguf-spm", backend)
