"""The validating GGUF reader: exact round trips, the real models, every malformed file rejected.

Malformed files are a valid writer-made file with one field patched; the fields are located with
`gguf.GGUFReader`, so the tests do not trust the reader under test to find them.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from worker_orcd.gguf.reader import MAX_ARRAY_DEPTH, GGUFError, GGUFFile, TensorInfo

V = GGUFValueType
ALIGNMENT = 64  # not the default 32, so that honouring general.alignment is observable

# key -> (value, type, element type): one of every value type, and arrays of several.
METADATA: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
    "general.alignment": (ALIGNMENT, V.UINT32, None),
    "test.u8": (255, V.UINT8, None),
    "test.i8": (-128, V.INT8, None),
    "test.u16": (65535, V.UINT16, None),
    "test.i16": (-32768, V.INT16, None),
    "test.u32": (2**32 - 1, V.UINT32, None),
    "test.i32": (-(2**31), V.INT32, None),
    "test.f32": (-0.15625, V.FLOAT32, None),
    "test.true": (True, V.BOOL, None),
    "test.false": (False, V.BOOL, None),
    "test.str": ("héllo wörld ✓ 日本", V.STRING, None),
    "test.empty": ("", V.STRING, None),
    "test.u64": (2**64 - 1, V.UINT64, None),
    "test.i64": (-(2**63), V.INT64, None),
    "test.f64": (math.pi, V.FLOAT64, None),
    "test.strings": (["a", "", "bc", "日本"], V.ARRAY, V.STRING),
    "test.u8s": ([0, 1, 255], V.ARRAY, V.UINT8),
    "test.i64s": ([-(2**63), 0, 2**63 - 1], V.ARRAY, V.INT64),
    "test.f32s": ([0.5, -1.25, 3.0], V.ARRAY, V.FLOAT32),
    "test.f64s": ([math.e, -0.1], V.ARRAY, V.FLOAT64),
    "test.bools": ([True, False, True], V.ARRAY, V.BOOL),
    "test.nested": ([[1, 2], [3]], V.ARRAY, None),
    "test.nested_strings": ([["a"], ["b", "c"]], V.ARRAY, None),
}


Tensors = dict[str, tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]]


def _tensors() -> Tensors:
    """name -> (stored array, type, logical shape); ranks 1 to 4, one size not a multiple of 64."""
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(
        rng.standard_normal((2, 64), dtype=np.float32), GGMLQuantizationType.Q8_0
    )
    return {
        "f32": (rng.standard_normal((4, 8), dtype=np.float32), GGMLQuantizationType.F32, (4, 8)),
        "f32.vec": (rng.standard_normal(7, dtype=np.float32), GGMLQuantizationType.F32, (7,)),
        "f16": (
            rng.standard_normal((2, 3, 16)).astype(np.float16),
            GGMLQuantizationType.F16,
            (2, 3, 16),
        ),
        "f32.4d": (
            rng.standard_normal((1, 2, 3, 4), dtype=np.float32),
            GGMLQuantizationType.F32,
            (1, 2, 3, 4),
        ),
        "q8_0": (q8, GGMLQuantizationType.Q8_0, (2, 64)),
    }


@dataclass(frozen=True)
class Layout:
    """Byte positions of the fields of a file, found with `gguf.GGUFReader`."""

    key: dict[str, int]  # key -> its length field
    value: dict[str, int]  # key -> its value-type field
    tensor: dict[str, int]  # tensor name -> its name-length field
    rank: dict[str, int]  # tensor name -> its rank field; dims, type and offset follow
    ndims: dict[str, int]
    infos_end: int
    data_offset: int
    data_end: int  # end of the last tensor's bytes (the padding after it is not needed)

    def dims(self, name: str) -> int:
        return self.rank[name] + 4

    def type(self, name: str) -> int:
        return self.dims(name) + 8 * self.ndims[name]

    def offset(self, name: str) -> int:
        return self.type(name) + 4


@dataclass(frozen=True)
class Small:
    path: Path
    data: bytes
    layout: Layout
    tensors: Tensors


def _write(path: Path, tensors: Tensors) -> None:
    writer = gguf.GGUFWriter(path, arch="test")
    for key, (value, kind, sub_type) in METADATA.items():
        writer.add_key_value(key, value, kind, sub_type)
    for name, (array, qtype, _) in tensors.items():
        raw = qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        writer.add_tensor(name, array, raw_dtype=qtype if raw else None)
    writer.data_alignment = ALIGNMENT  # general.alignment is in METADATA; this makes the padding
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _layout(path: Path) -> Layout:
    reference = gguf.GGUFReader(path)
    key = {name: f.offset for name, f in reference.fields.items() if not name.startswith("GGUF.")}
    value = {name: at + 8 + len(name.encode()) for name, at in key.items()}
    tensor = {t.name: t.field.offset for t in reference.tensors}
    rank = {name: at + 8 + len(name.encode()) for name, at in tensor.items()}
    ndims = {t.name: len(t.shape) for t in reference.tensors}
    last = reference.tensors[-1]
    infos_end = last.field.offset + sum(int(part.nbytes) for part in last.field.parts)
    ends = [t.data_offset + t.n_bytes for t in reference.tensors]
    data_offset = int(reference.data_offset)
    return Layout(key, value, tensor, rank, ndims, infos_end, data_offset, max(ends))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Small:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    tensors = _tensors()
    _write(path, tensors)
    return Small(path, path.read_bytes(), _layout(path), tensors)


def _flatten(value: Any) -> list[Any]:
    """gguf.GGUFReader flattens nested arrays; so does this, to compare with it."""
    if not isinstance(value, list):
        return [value]
    return [leaf for item in value for leaf in _flatten(item)]


def test_metadata_round_trips_exactly(small: Small) -> None:
    gf = GGUFFile(small.path)
    expected = {"general.architecture": "test"} | {k: v for k, (v, _, _) in METADATA.items()}
    assert gf.version == 3
    assert gf.metadata == expected
    assert list(gf.metadata) == list(expected)
    assert gf.architecture == "test"
    assert gf.alignment == ALIGNMENT


def test_tensors_round_trip_exactly(small: Small) -> None:
    gf = GGUFFile(small.path)
    assert list(gf.tensors) == list(small.tensors)
    for name, (array, qtype, shape) in small.tensors.items():
        info = gf.tensors[name]
        assert info == TensorInfo(name, qtype, shape, info.offset, array.nbytes)
        assert info.offset % ALIGNMENT == 0
        assert gf.tensor_data(name).tobytes() == array.tobytes()


def test_agrees_with_gguf_reader(small: Small) -> None:
    gf = GGUFFile(small.path)
    reference = gguf.GGUFReader(small.path)
    assert gf.data_offset == reference.data_offset
    fields = {name: f for name, f in reference.fields.items() if not name.startswith("GGUF.")}
    assert list(fields) == list(gf.metadata)
    for key, field in fields.items():
        ours = gf.metadata[key]
        assert (_flatten(ours) if isinstance(ours, list) else ours) == field.contents(), key
    assert [t.name for t in reference.tensors] == list(gf.tensors)
    for theirs in reference.tensors:
        info = gf.tensors[theirs.name]
        assert info.qtype == theirs.tensor_type
        assert info.shape == tuple(reversed(theirs.shape.tolist()))
        assert (info.offset, info.nbytes) == (theirs.data_offset, theirs.n_bytes)


@pytest.mark.parametrize(
    ("fixture", "architecture", "tensor_count"),
    [("smollm2_path", "llama", 272), ("qwen_path", "qwen2", 291), ("gemma_path", "gemma3", 236)],
)
def test_real_models_open(
    request: pytest.FixtureRequest, fixture: str, architecture: str, tensor_count: int
) -> None:
    gf = GGUFFile(request.getfixturevalue(fixture))
    assert gf.architecture == architecture
    assert len(gf.tensors) == tensor_count
    assert max(t.offset + t.nbytes for t in gf.tensors.values()) <= gf.path.stat().st_size


# ---- malformed files -----------------------------------------------------------------------------


def _rejected(path: Path, data: bytes) -> str:
    """Write `data` to `path`, assert the reader rejects it properly, and return the problem."""
    path.write_bytes(data)
    with pytest.raises(GGUFError) as caught:
        GGUFFile(path)
    assert str(path) in str(caught.value)
    assert "expected" in caught.value.problem
    assert "found" in caught.value.problem
    return caught.value.problem


def _put(data: bytes, at: int, fmt: str, value: Any) -> bytes:
    packed = struct.pack(fmt, value)
    return data[:at] + packed + data[at + len(packed) :]


Mutation = Callable[[bytes, Layout], bytes]
VERSION_AT, TENSOR_COUNT_AT, KV_COUNT_AT = 4, 8, 16


def _past_end(data: bytes, lay: Layout) -> bytes:
    """Move the last tensor so that it starts inside the file and ends past it."""
    start = (len(data) - lay.data_offset - 1) // ALIGNMENT * ALIGNMENT
    return _put(data, lay.offset("q8_0"), "<Q", start)


def _overlap(data: bytes, lay: Layout) -> bytes:
    """Start tensor f32.vec 64 bytes into tensor f32 (128 bytes long)."""
    return _put(data, lay.offset("f32.vec"), "<Q", ALIGNMENT)


def _rename(data: bytes, at: int, new: bytes) -> bytes:
    """Replace the name whose length field is at `at` by one of the same length."""
    (length,) = struct.unpack_from("<Q", data, at)
    assert length == len(new)
    return data[: at + 8] + new + data[at + 8 + length :]


CASES: list[tuple[str, Mutation, str]] = [
    ("bad-magic", lambda d, lay: b"GGML" + d[4:], "expected magic bytes b'GGUF', found b'GGML'"),
    ("version-2", lambda d, lay: _put(d, VERSION_AT, "<I", 2), "expected version 3, found 2"),
    ("version-4", lambda d, lay: _put(d, VERSION_AT, "<I", 4), "expected version 3, found 4"),
    (
        "10000-tensors",
        lambda d, lay: _put(d, TENSOR_COUNT_AT, "<Q", 10_000),
        "expected fewer than 10000 tensors, found 10000",
    ),
    (
        "2**63-tensors",
        lambda d, lay: _put(d, TENSOR_COUNT_AT, "<Q", 2**63),
        f"expected fewer than 10000 tensors, found {2**63}",
    ),
    ("huge-kv-count", lambda d, lay: _put(d, KV_COUNT_AT, "<Q", 2**64 - 1), "metadata key #"),
    (
        "string-2**40",
        lambda d, lay: _put(d, lay.value["test.str"] + 4, "<Q", 2**40),
        f"test.str: expected a string under 1048576 bytes, found {2**40}",
    ),
    (
        "string-1MiB",
        lambda d, lay: _put(d, lay.value["test.str"] + 4, "<Q", 2**20),
        "test.str: expected a string under 1048576 bytes, found 1048576",
    ),
    (
        "key-1MiB",
        lambda d, lay: _put(d, lay.key["test.u8"], "<Q", 2**20),
        "expected a string under 1048576 bytes, found 1048576",
    ),
    (
        "array-2**20",
        lambda d, lay: _put(d, lay.value["test.u8s"] + 8, "<Q", 2**20),
        "test.u8s: expected an array under 1048576 elements, found 1048576",
    ),
    (
        "value-type-13",
        lambda d, lay: _put(d, lay.value["test.u8"], "<I", 13),
        "test.u8: expected a known metadata value type, found 13",
    ),
    (
        "element-type-255",
        lambda d, lay: _put(d, lay.value["test.strings"] + 4, "<I", 255),
        "elements of test.strings: expected a known metadata value type, found 255",
    ),
    (
        "tensor-type-255",
        lambda d, lay: _put(d, lay.type("q8_0"), "<I", 255),
        "tensor q8_0: expected a known type, found 255",
    ),
    (
        "tensor-type-removed-4",
        lambda d, lay: _put(d, lay.type("q8_0"), "<I", 4),
        "tensor q8_0: expected a known type, found 4",
    ),
    (
        "rank-0",
        lambda d, lay: _put(d, lay.rank["f16"], "<I", 0),
        "tensor f16: expected 1 to 4 dimensions, found 0",
    ),
    (
        "rank-5",
        lambda d, lay: _put(d, lay.rank["f16"], "<I", 5),
        "tensor f16: expected 1 to 4 dimensions, found 5",
    ),
    (
        "zero-dimension",
        lambda d, lay: _put(d, lay.dims("f16") + 8, "<Q", 0),
        "tensor f16: expected dimensions from 1 to",
    ),
    (
        "dimension-past-int64",
        lambda d, lay: _put(d, lay.dims("f16") + 8, "<Q", 2**63),
        "tensor f16: expected dimensions from 1 to",
    ),
    (
        "row-not-whole-blocks",
        lambda d, lay: _put(d, lay.dims("q8_0"), "<Q", 48),
        "tensor q8_0: expected a row length divisible by Q8_0's block of 32, found 48",
    ),
    (
        "offset-out-of-range",
        lambda d, lay: _put(d, lay.offset("f32"), "<Q", 2**63),
        "tensor f32: expected bytes",
    ),
    ("offset-plus-size-past-end", _past_end, "tensor q8_0: expected bytes"),
    (
        "misaligned-offset",
        lambda d, lay: _put(d, lay.offset("f16"), "<Q", 3 * ALIGNMENT + 4),
        f"tensor f16: expected an offset aligned to {ALIGNMENT}, found {3 * ALIGNMENT + 4}",
    ),
    ("overlapping-tensors", _overlap, "tensor f32.vec: expected data after tensor f32's end"),
    (
        "duplicate-key",
        lambda d, lay: _rename(d, lay.key["test.i8"], b"test.u8"),
        "expected unique metadata keys, found 'test.u8' twice",
    ),
    (
        "duplicate-tensor-name",
        lambda d, lay: _rename(d, lay.tensor["f16"], b"f32"),
        "expected unique tensor names, found 'f32' twice",
    ),
    (
        "non-utf8-key",
        lambda d, lay: _rename(d, lay.key["test.u8"], b"test.\xffu"),
        "expected UTF-8 text, found invalid bytes",
    ),
    (
        "non-utf8-tensor-name",
        lambda d, lay: _rename(d, lay.tensor["f16"], b"f\xff6"),
        "name of tensor #2: expected UTF-8 text, found invalid bytes",
    ),
    *(
        (
            f"alignment-{bad}",
            lambda d, lay, bad=bad: _put(d, lay.value["general.alignment"] + 4, "<I", bad),
            f"general.alignment: expected a power of two, found {bad}",
        )
        for bad in (0, 3, 48)
    ),
    (
        "alignment-float",
        lambda d, lay: _put(
            _put(d, lay.value["general.alignment"], "<I", V.FLOAT32),
            lay.value["general.alignment"] + 4,
            "<f",
            64.0,
        ),
        "general.alignment: expected a power of two, found 64.0",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file_is_rejected(
    small: Small, tmp_path: Path, mutate: Mutation, expected: str
) -> None:
    assert expected in _rejected(tmp_path / "bad.gguf", mutate(small.data, small.layout))


def test_empty_or_missing_file_is_rejected(tmp_path: Path) -> None:
    assert "non-empty file" in _rejected(tmp_path / "empty.gguf", b"")
    with pytest.raises(GGUFError, match="expected a readable, non-empty file, found"):
        GGUFFile(tmp_path / "missing.gguf")


def test_every_truncation_is_rejected(small: Small, tmp_path: Path) -> None:
    """Cut at every byte before the end of the last tensor's data: the header, the metadata, the
    tensor infos, the padding before the data and the data itself."""
    lay = small.layout
    assert lay.infos_end < lay.data_offset < lay.data_end <= len(small.data)
    for cut in range(1, lay.data_end):
        problem = _rejected(tmp_path / f"cut{cut}.gguf", small.data[:cut])
        within = "(truncated?)" if cut < lay.infos_end else "inside the file"
        assert within in problem, cut


def _raw(kvs: bytes, kv_count: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, kv_count) + kvs


def _key(name: bytes, kind: GGUFValueType) -> bytes:
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", kind)


def _nested(depth: int) -> bytes:
    """A file whose one key holds `depth` arrays, each the only element of the one before."""
    nest = struct.pack("<IQ", V.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", V.UINT8, 0)
    return _raw(_key(b"k", V.ARRAY) + nest, 1)


@pytest.mark.parametrize("depth", [2, MAX_ARRAY_DEPTH])
def test_nested_arrays_open(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "nested.gguf"
    path.write_bytes(_nested(depth))
    expected: list[Any] = []
    for _ in range(depth - 1):
        expected = [expected]
    assert GGUFFile(path).metadata == {"k": expected}


@pytest.mark.parametrize("depth", [MAX_ARRAY_DEPTH + 1, 100_000])
def test_deeply_nested_arrays_are_rejected(tmp_path: Path, depth: int) -> None:
    """Each level recurses: a deep nest must be a GGUFError, not a RecursionError."""
    problem = _rejected(tmp_path / "nested.gguf", _nested(depth))
    assert f"expected arrays nested at most {MAX_ARRAY_DEPTH} deep, found deeper" in problem


def test_largest_allowed_string_and_array_open(tmp_path: Path) -> None:
    """The limits are exclusive: one byte or element under them still opens."""
    longest = b"x" * (2**20 - 1)
    kvs = _key(b"s", V.STRING) + struct.pack("<Q", len(longest)) + longest
    kvs += _key(b"a", V.ARRAY) + struct.pack("<IQ", V.UINT8, len(longest)) + longest
    path = tmp_path / "limits.gguf"
    path.write_bytes(_raw(kvs, 2))
    metadata = GGUFFile(path).metadata
    assert len(metadata["s"]) == len(metadata["a"]) == 2**20 - 1


def _mutate(data: bytes, structure_end: int, rng: random.Random) -> bytes:
    """A few byte flips, mostly in the header and infos, sometimes a boundary value or a cut."""
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 2)):
        at = rng.randrange(structure_end if rng.random() < 0.7 else len(mutated))
        if rng.random() < 0.2:
            value = rng.choice([0, 1, 2**20, 2**32 - 1, 2**63, 2**64 - 1])
            mutated[at : at + 8] = value.to_bytes(8, "little")
        else:
            mutated[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    if rng.random() < 0.2:
        del mutated[rng.randrange(len(mutated)) :]
    return bytes(mutated)


def test_fuzzed_files_open_or_raise_gguf_error(small: Small, tmp_path: Path) -> None:
    outcomes = {"opened": 0, "rejected": 0}
    for seed in range(200):
        path = tmp_path / f"fuzz{seed}.gguf"
        path.write_bytes(_mutate(small.data, small.layout.infos_end, random.Random(seed)))
        try:
            GGUFFile(path)
            outcomes["opened"] += 1
        except GGUFError:
            outcomes["rejected"] += 1
        except Exception as error:
            error.add_note(f"fuzz mutation #{seed} raised something other than GGUFError")
            raise
    assert min(outcomes.values()) >= 20, outcomes  # both paths really exercised
