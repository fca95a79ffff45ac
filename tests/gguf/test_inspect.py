"""`describe` on the real models: the figures are right and vocabulary-sized values stay short."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd.gguf.inspect import describe
from worker_orcd.gguf.reader import GGUFFile


@pytest.fixture(scope="module")
def qwen(qwen_path: Path) -> GGUFFile:
    return GGUFFile(qwen_path)


def _section(report: str, title: str) -> list[str]:
    """The lines under the heading that starts with `title`, up to the next blank line."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


def _value(report: str, key: str) -> str:
    line = next(line for line in _section(report, "metadata") if line.split()[0] == key)
    return line.split(maxsplit=1)[1]


def test_header_and_type_table(qwen: GGUFFile) -> None:
    report = describe(qwen, max_tensors=0)
    assert report.startswith(f"file       {qwen.path}\nsize       491,400,064 bytes (468.6 MiB)\n")
    assert "version    3\nalignment  32\n" in report
    header, *rows, total = _section(report, "tensor types")
    assert header.split() == ["type", "count", "bytes"]
    counts = [tuple(row.split()[:2]) for row in rows]
    assert counts == [
        ("Q5_0", "133"),
        ("F32", "121"),
        ("Q8_0", "13"),
        ("Q4_K", "12"),
        ("Q6_K", "12"),
    ]
    tensor_bytes = sum(t.nbytes for t in qwen.tensors.values())
    assert total.split() == ["total", "291", f"{tensor_bytes:,}"]


def test_long_values_are_summarized_on_one_line(qwen: GGUFFile) -> None:
    report = describe(qwen, max_tensors=0)
    assert len(report) < 5_000  # not 151,936 tokens and 151,387 merges
    assert len(_section(report, "metadata")) == len(qwen.metadata) == 26
    assert _value(report, "tokenizer.ggml.tokens").startswith("[151936 × str] '!', '\"', '#', ")
    assert _value(report, "tokenizer.ggml.tokens").endswith(", …")
    assert _value(report, "tokenizer.ggml.merges").startswith("[151387 × str] 'Ġ Ġ', ")
    template = _value(report, "tokenizer.chat_template")
    assert template.startswith("{%- if tools %}\\n    {{- '<|im_start|>system\\n' }}")
    assert template.endswith("… (2,507 chars)")
    assert _value(report, "qwen2.attention.layer_norm_rms_epsilon") == "1e-06"


def test_tensor_listing_is_aligned_and_capped(qwen: GGUFFile) -> None:
    full = _section(describe(qwen), "tensors (291)")
    assert len(full) == 1 + 291
    assert full[1].split() == ["output.weight", "Q8_0", "151936", "×", "896", "144,643,072"]
    assert len({len(line) for line in full}) == 1  # the right-aligned bytes column ends evenly
    capped = _section(describe(qwen, max_tensors=10), "tensors (291)")
    assert [line.split() for line in capped[:11]] == [line.split() for line in full[:11]]
    assert capped[11:] == ["  … 281 more"]


def test_short_arrays_are_shown_whole(gemma_path: Path) -> None:
    report = describe(GGUFFile(gemma_path), max_tensors=0)
    assert _value(report, "general.tags") == "['gemma3', 'gemma', 'google', 'text-generation']"
    assert _value(report, "tokenizer.ggml.scores").startswith("[262144 × float] -1000, -1000, ")
