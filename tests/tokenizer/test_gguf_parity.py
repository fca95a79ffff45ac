"""Our GGUF tokenizers against transformers' for the same real files: ids, decode, BOS, EOG."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

SPACE = "▁"

# Where transformers 5.23 is wrong, the ids llama.cpp gives (llama_tokenize with add_special=false,
# parse_special=true; llama.cpp as vendored in llama-cpp-python 0.3.36). We must match these.
# - smollm2: transformers has no "smollm" pre-tokenizer and falls back to GPT-2's split, which
#   keeps " ١٢٣" (Arabic-Indic digits) in one piece; llama.cpp, like SmolLM2's own
#   tokenizer.json, first splits every digit off, so the space stays alone (id 216).
# - gemma, long space runs: the file's user-defined tokens of 2..31 spaces are matched whole in
#   the raw text, longest first (llama.cpp, and SentencePiece's user-defined symbols);
#   transformers respells them as "▁" runs and builds them with BPE merges (16+24, 16x4).
# - gemma, a literal U+2581 next to a space: transformers merges it into its respelled "▁▁";
#   llama.cpp has no such piece (the file spells it with real spaces), so both stay single.
# fmt: off
LLAMA_CPP_IDS = {
    ("smollm2", "النص العربي مع أرقام ١٢٣ و 456"): [
        22208, 18223, 163, 130, 27819, 34966, 20602, 31462, 23339, 36395, 34966, 14787, 113,
        20602, 43530, 10805, 21706, 216, 164, 111, 164, 112, 164, 113, 35964, 216, 36, 37, 38,
    ],
    ("gemma", "x" + " " * 40 + "y"): [236781, 167, 145, 236762],
    ("gemma", " " * 64): [167, 167, 138],
    ("gemma", "▁ lower one eighth block ▁▁"): [
        236743, 3718, 886, 35186, 3355, 236743, 236743, 236743,
    ],
}
# fmt: on

EXPECTED = {  # kind, add_bos, eog_ids
    "smollm2": ("gguf-bpe", False, {0, 2}),  # <|endoftext|>, <|im_end|> (= eos)
    "qwen": ("gguf-bpe", False, {151643, 151645}),  # <|endoftext|>, <|im_end|> (= eos)
    "gemma": ("gguf-spm", True, {1, 106}),  # <eos>, <end_of_turn>
}


def test_ids_match_transformers(model, ours, reference, corpus):
    mismatches = []
    for text in corpus:
        got = ours.encode(text, add_special=False)
        want = LLAMA_CPP_IDS.get((model, text)) or reference.encode(text, add_special_tokens=False)
        if got != want:
            mismatches.append(f"{text!r}: ours {got}, expected {want}")
    assert not mismatches, "\n".join(mismatches)


def test_decode_matches_transformers(ours, reference, corpus):
    for text in corpus:
        ids = ours.encode(text, add_special=False)
        assert ours.decode(ids) == reference.decode(ids), text


def test_decode_inverts_encode(ours, corpus):
    for text in corpus:
        if ours.kind == "gguf-spm" and SPACE in text:
            continue  # SentencePiece writes spaces as U+2581, so it decodes back to a space
        assert ours.decode(ours.encode(text, add_special=False)) == text


def test_bos_and_kind(model, ours, reference):
    kind, add_bos, _ = EXPECTED[model]
    assert (ours.kind, ours.add_bos) == (kind, add_bos)
    for text in ("", "Hello world", "<|im_start|>user\nhi<|im_end|>"):
        assert ours.encode(text) == reference.encode(text)


def test_end_of_generation_ids(model, ours):
    assert ours.eog_ids == EXPECTED[model][2]
    assert ours.eos_id in ours.eog_ids


def test_special_token_text_is_one_id(ours, reference):
    for token_id in (ours.bos_id, ours.eos_id):
        text = ours.decode([token_id])
        assert ours.encode(f"a{text}b", add_special=False)[1:-1] == [token_id]
    assert ours.decode([ours.eos_id], skip_special=True) == ""
    assert ours.vocab_size == len(reference)
