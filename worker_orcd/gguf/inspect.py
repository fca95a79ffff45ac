"""The text `worker-orcd inspect FILE` prints: header, metadata, a per-type summary, the tensors.

A model's vocabulary is an array of 150k+ strings and its chat template runs to kilobytes, so every
metadata value is kept to one line: long arrays show their length, element type and first few
elements, long strings are cut with an ellipsis and their length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from worker_orcd.gguf.reader import GGUFFile

INDENT = "  "
VALUE_WIDTH = 72  # characters of a metadata value before it is cut
ELEMENT_WIDTH = 24  # characters of one array element in a preview
SHORT_ARRAY = 8  # arrays up to this long are shown whole, if they fit the width
_CONTROL = {code: repr(chr(code))[1:-1] for code in range(32)}  # "\n" -> "\\n": one line


def describe(gguf: GGUFFile, max_tensors: int | None = None) -> str:
    """The whole report; `max_tensors` caps the tensor list, which runs to hundreds of lines."""
    size = gguf.path.stat().st_size
    header = [
        ("file", str(gguf.path)),
        ("size", f"{size:,} bytes ({_human(size)})"),
        ("version", str(gguf.version)),
        ("alignment", str(gguf.alignment)),
    ]
    metadata = [(key, _value(value)) for key, value in gguf.metadata.items()]
    tensors = list(gguf.tensors.values())
    shown = tensors if max_tensors is None else tensors[:max_tensors]
    listing = [("name", "type", "shape", "bytes")]
    listing += [(t.name, t.qtype.name, _shape(t.shape), f"{t.nbytes:,}") for t in shown]
    lines = [
        *_table(header, indent=""),
        "",
        f"metadata ({len(metadata)} keys)",
        *_table(metadata),
        "",
        "tensor types",
        *_table(_type_summary(gguf), right=(1, 2)),
        "",
        f"tensors ({len(tensors)})",
        *_table(listing, right=(3,)),
    ]
    if len(shown) < len(tensors):
        lines.append(f"{INDENT}… {len(tensors) - len(shown)} more")
    return "\n".join(lines) + "\n"


def _type_summary(gguf: GGUFFile) -> list[tuple[str, ...]]:
    """Count and bytes per tensor type, most common first, then the total."""
    counts: dict[str, int] = defaultdict(int)
    sizes: dict[str, int] = defaultdict(int)
    for tensor in gguf.tensors.values():
        counts[tensor.qtype.name] += 1
        sizes[tensor.qtype.name] += tensor.nbytes
    ordered = sorted(counts, key=lambda name: (-counts[name], name))
    rows = [("type", "count", "bytes")]
    rows += [(name, str(counts[name]), f"{sizes[name]:,}") for name in ordered]
    rows.append(("total", str(len(gguf.tensors)), f"{sum(sizes.values()):,}"))
    return rows


def _table(
    rows: list[tuple[str, ...]], right: tuple[int, ...] = (), indent: str = INDENT
) -> list[str]:
    """Rows as lines of aligned columns; the `right` columns (numbers) are right-aligned."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    return [
        indent
        + "  ".join(
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _value(value: Any) -> str:
    if isinstance(value, list):
        return _array(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, float):
        return f"{value:.7g}"  # metadata floats are mostly float32: 1e-06, not 9.99999997e-07
    return str(value)


def _string(text: str) -> str:
    line = text.translate(_CONTROL)
    if not line:
        return '""'
    if len(line) <= VALUE_WIDTH:
        return line
    return f"{line[:VALUE_WIDTH]}… ({len(text):,} chars)"


def _array(values: list[Any]) -> str:
    """Whole when short, else `[151936 × str] '!', '"', '#', …` with as many elements as fit."""
    if len(values) <= SHORT_ARRAY:
        whole = "[" + ", ".join(map(_element, values)) + "]"
        if len(whole) <= VALUE_WIDTH:
            return whole
    summary = f"[{len(values)} × {type(values[0]).__name__}]"
    elements: list[str] = []
    width = len(summary) + len(", …")
    for value in values:
        element = _element(value)
        width += len(element) + 2
        if elements and width > VALUE_WIDTH:
            break
        elements.append(element)
    more = [] if len(elements) == len(values) else ["…"]
    return f"{summary} " + ", ".join(elements + more)


def _element(value: Any) -> str:
    """One array element: strings quoted, as tokens are often bare punctuation or spaces."""
    text = repr(value) if isinstance(value, str) else _value(value)
    return text if len(text) <= ELEMENT_WIDTH else text[: ELEMENT_WIDTH - 1] + "…"


def _shape(shape: tuple[int, ...]) -> str:
    return " × ".join(map(str, shape))


def _human(size: int) -> str:
    amount, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, larger
    return f"{amount:.1f} {unit}"
