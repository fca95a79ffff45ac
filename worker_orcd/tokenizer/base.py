"""The one tokenizer type the rest of the worker sees, whatever file the vocabulary came from.

Every backend ends in a `tokenizers.Tokenizer`, so encoding, decoding and special-token parsing
run in the same Rust code for all of them; only how that object is built differs per source.
"""

from __future__ import annotations

from collections.abc import Mapping

import tokenizers

from worker_orcd.tokenizer.chat import ChatTemplate
from worker_orcd.tokenizer.streaming import StreamingDetokenizer

# Texts that llama.cpp (`llama_vocab::impl::load`) treats as ending the generation. llama.cpp
# matches them on any token and now also lists `</s>`; we take special (control) tokens only, so
# Gemma 3's `</s>` HTML tag and Qwen's plain-text `</s>` do not stop a generation.
END_OF_TURN_MARKERS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
        "<｜end▁of▁sentence｜>",
    }
)


class TokenizerError(ValueError):
    """A tokenizer the worker cannot build: unsupported model or pre-tokenizer, broken metadata."""


def end_of_generation_ids(special: Mapping[str, int], *ids: int | None) -> frozenset[int]:
    """The ids that end a generation: `ids` (eos, eot, eom) plus special end-of-turn markers.

    As in llama.cpp, a vocabulary with both `<|return|>` and `<|call|>` (gpt-oss's harmony
    format) uses `<|end|>` to close one message inside a turn, so it does not stop there.
    """
    eog = {token_id for text, token_id in special.items() if text in END_OF_TURN_MARKERS}
    if "<|return|>" in special and "<|call|>" in special and "<|end|>" in special:
        eog.discard(special["<|end|>"])
    eog.update(token_id for token_id in ids if token_id is not None)
    return frozenset(eog)


class Tokenizer:
    """Text to token ids and back for one model, plus its chat template and stop tokens."""

    def __init__(
        self,
        kind: str,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: frozenset[int],
        chat_template: ChatTemplate,
    ):
        self.kind = kind
        self.backend = backend
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = eog_ids
        self.chat_template = chat_template
        # Read off what encoding does, so the flag can never disagree with the ids it produces.
        self.add_bos = bos_id is not None and self.encode("")[:1] == [bos_id]

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS per the model when `add_special`. Special-token text
        such as `<|im_start|>` always becomes its one id, as llama.cpp's server does."""
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.chat_template.render(messages, add_generation_prompt)

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(lambda ids: self.decode(ids, skip_special))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
