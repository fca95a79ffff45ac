"""Incremental detokenization that never emits part of a character (M0-W-1824).

Decoding token by token goes wrong in two ways: a character can be split over tokens (byte-level
BPE pieces, SentencePiece `<0xE4>` byte-fallback tokens), and a token's text can depend on its
neighbours (SentencePiece strips the leading space of the first piece). So, as vLLM and
llama.cpp's server do, we re-decode a short window of recent ids and emit only what the newest id
added. An incomplete UTF-8 tail decodes to U+FFFD, so while the window's text ends with one we
hold it back until the character's last byte arrives. A tail still incomplete when the stream
ends (say, at max_tokens) never became a character: `flush` drops it rather than emit U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Push ids one at a time; the pieces returned, plus `flush()`, join to `decode(all ids)`
    less any incomplete character at the very end."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window: a character boundary already emitted
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes, possibly ""."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream, less an incomplete tail."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        new = text[len(emitted) :]
        return new.rstrip(REPLACEMENT) if final else new
