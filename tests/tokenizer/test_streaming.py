"""The streaming detokenizer: pieces join to the full decode and never hold half a character."""

from __future__ import annotations

import pytest

from worker_orcd.tokenizer import StreamingDetokenizer

REPLACEMENT = "\ufffd"


def stream(detokenizer: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("skip_special", [False, True])
def test_stream_equals_decode_on_real_models(ours, corpus, skip_special):
    for text in corpus:
        ids = ours.encode(text)
        pieces = stream(ours.detokenizer(skip_special), ids)
        assert "".join(pieces) == ours.decode(ids, skip_special).removesuffix(REPLACEMENT), text
        if REPLACEMENT not in text:
            assert not any(REPLACEMENT in piece for piece in pieces), (text, pieces)


def test_split_characters_are_held_back(ours):
    """Each of these is spread over several tokens in at least one of the models: a byte-level
    piece holding part of its UTF-8 bytes, or SentencePiece's <0xF0><0x93>... byte fallback."""
    for char in ("𓀀", "ꙮ", "👨‍👩‍👧"):
        ids = ours.encode(char, add_special=False)
        pieces = stream(ours.detokenizer(), ids)
        assert "".join(pieces) == char
        if len(ids) > 1 and len(char) == 1:
            assert pieces[: len(ids) - 1] == [""] * (len(ids) - 1)


def fake_decode(ids: list[int]) -> str:
    """Ids are byte values, decoded as byte-level BPE and SentencePiece byte fallback do."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_holds_an_incomplete_tail_and_drops_it_at_the_end():
    detokenizer = StreamingDetokenizer(fake_decode)
    euro = list("€".encode())  # three bytes
    assert [detokenizer.push(b) for b in [*b"a", *euro, *b"b"]] == ["a", "", "", "€", "b"]
    assert detokenizer.push(euro[0]) == ""
    assert detokenizer.flush() == ""  # the stream ended inside a character: no U+FFFD
    assert detokenizer.flush() == ""


def test_invalid_bytes_followed_by_text_are_not_held_forever():
    detokenizer = StreamingDetokenizer(fake_decode)
    assert detokenizer.push(0xE2) == ""
    assert detokenizer.push(ord("x")) == REPLACEMENT + "x"


def test_pieces_that_depend_on_their_neighbours():
    """A decoder that drops the first leading space (SentencePiece with add_space_prefix)."""
    table = {1: " Hello", 2: " world", 3: "!", 4: " "}

    def decode(ids: list[int]) -> str:
        return "".join(table[i] for i in ids).removeprefix(" ")

    ids = [1, 2, 4, 3, 2]
    assert (
        "".join(stream(StreamingDetokenizer(decode), ids)) == decode(ids) == "Hello world ! world"
    )
