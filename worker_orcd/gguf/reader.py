"""Reading and validating GGUF files (spec M0-W-1200..1212).

The file is memory-mapped and every read is bounds-checked, so a malformed file is rejected with
one `GGUFError` that names the file, what was expected and what was found, before any tensor is
touched. Values are decoded here rather than with `gguf.GGUFReader`, which builds a numpy view
per string and needs 14 s to open a 262k-token vocabulary (about 0.3 s here); the `gguf` package
still supplies the type tables, the writer and the reference dequantizers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import pairwise
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
SUPPORTED_VERSION = 3
MAX_TENSORS = 10_000
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_ELEMENTS = 1 << 20
MAX_ARRAY_DEPTH = 8  # arrays of arrays recurse: without a bound, a small file is a RecursionError
MAX_DIMS = 4
MAX_DIM_SIZE = 1 << 63  # llama.cpp holds dimensions as int64
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFError(ValueError):
    """A file that is not a usable GGUF model."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"invalid GGUF file {path}: {problem}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost dimension first (ggml's `ne` reversed), as torch and numpy
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Sequential little-endian reads over the mapped bytes; reading past the end is an error."""

    def __init__(self, path: Path, buffer: memoryview):
        self.path = path
        self.buffer = buffer
        self.pos = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.pos + size
        if end > len(self.buffer):
            raise GGUFError(
                self.path,
                f"{what} at byte {self.pos}: expected {size} more bytes, "
                f"found the file ends at byte {len(self.buffer)} (truncated?)",
            )
        view = self.buffer[self.pos : end]
        self.pos = end
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        if length >= MAX_STRING_BYTES:
            raise GGUFError(
                self.path,
                f"{what}: expected a string under {MAX_STRING_BYTES} bytes, found {length}",
            )
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(
                self.path, f"{what}: expected UTF-8 text, found invalid bytes"
            ) from None

    def value_type(self, what: str) -> GGUFValueType:
        code = self.scalar("<I", f"type of {what}")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise GGUFError(
                self.path, f"{what}: expected a known metadata value type, found {code}"
            ) from None

    def value(self, kind: GGUFValueType, what: str) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if kind == GGUFValueType.ARRAY:
            return self.array(what, depth=1)
        return self.scalar(_SCALARS[kind], what)

    def array(self, what: str, depth: int) -> list[Any]:
        kind = self.value_type(f"elements of {what}")
        count = self.scalar("<Q", f"length of {what}")
        if count >= MAX_ARRAY_ELEMENTS:
            raise GGUFError(
                self.path,
                f"{what}: expected an array under {MAX_ARRAY_ELEMENTS} elements, found {count}",
            )
        if kind == GGUFValueType.STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)]
        if kind == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(
                    self.path,
                    f"{what}: expected arrays nested at most {MAX_ARRAY_DEPTH} deep, found deeper",
                )
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = np.dtype(_SCALARS[kind])
        raw = self.take(count * dtype.itemsize, what)
        return np.frombuffer(raw, dtype=dtype).tolist()


class GGUFFile:
    """A validated, memory-mapped GGUF file: metadata as Python values, tensors as byte views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as error:
            raise GGUFError(
                self.path, f"expected a readable, non-empty file, found: {error}"
            ) from None
        cursor = _Cursor(self.path, memoryview(self._map))
        self.version, self.metadata = self._read_header(cursor)
        self.alignment = self._alignment()
        infos = self._read_tensor_infos(cursor)
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors = self._place_tensors(infos)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(self.path, "expected metadata key general.architecture, found none")
        return arch

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes (its GGUF blocks) as a read-only view into the map."""
        info = self.tensors[name]
        return self._map[info.offset : info.offset + info.nbytes]

    def _read_header(self, cursor: _Cursor) -> tuple[int, dict[str, Any]]:
        magic = bytes(cursor.take(4, "magic"))
        if magic != MAGIC:
            raise GGUFError(self.path, f"expected magic bytes {MAGIC!r}, found {magic!r}")
        version = cursor.scalar("<I", "version")
        if version != SUPPORTED_VERSION:
            raise GGUFError(self.path, f"expected version {SUPPORTED_VERSION}, found {version}")
        self._tensor_count = cursor.scalar("<Q", "tensor count")
        if self._tensor_count >= MAX_TENSORS:
            raise GGUFError(
                self.path, f"expected fewer than {MAX_TENSORS} tensors, found {self._tensor_count}"
            )
        kv_count = cursor.scalar("<Q", "metadata count")
        metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = cursor.string(f"metadata key #{index}")
            if key in metadata:
                raise GGUFError(self.path, f"expected unique metadata keys, found {key!r} twice")
            metadata[key] = cursor.value(cursor.value_type(key), key)
        return version, metadata

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(
                self.path, f"general.alignment: expected a power of two, found {alignment!r}"
            )
        return alignment

    def _read_tensor_infos(
        self, cursor: _Cursor
    ) -> list[tuple[str, GGMLQuantizationType, tuple, int]]:
        infos = []
        seen = set()
        for index in range(self._tensor_count):
            name = cursor.string(f"name of tensor #{index}")
            if name in seen:
                raise GGUFError(self.path, f"expected unique tensor names, found {name!r} twice")
            seen.add(name)
            n_dims = cursor.scalar("<I", f"rank of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(
                    self.path, f"tensor {name}: expected 1 to {MAX_DIMS} dimensions, found {n_dims}"
                )
            ne = tuple(cursor.scalar("<Q", f"shape of tensor {name}") for _ in range(n_dims))
            if not all(0 < n < MAX_DIM_SIZE for n in ne):
                raise GGUFError(
                    self.path,
                    f"tensor {name}: expected dimensions from 1 to {MAX_DIM_SIZE - 1}, found {ne}",
                )
            code = cursor.scalar("<I", f"type of tensor {name}")
            if code not in GGMLQuantizationType._value2member_map_ or (
                GGMLQuantizationType(code) not in GGML_QUANT_SIZES
            ):
                raise GGUFError(self.path, f"tensor {name}: expected a known type, found {code}")
            offset = cursor.scalar("<Q", f"offset of tensor {name}")
            infos.append((name, GGMLQuantizationType(code), ne, offset))
        return infos

    def _place_tensors(self, infos: list) -> dict[str, TensorInfo]:
        file_size = len(self._map)
        tensors: dict[str, TensorInfo] = {}
        for name, qtype, ne, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            if ne[0] % block_size:
                raise GGUFError(
                    self.path,
                    f"tensor {name}: expected a row length divisible by {qtype.name}'s block of "
                    f"{block_size}, found {ne[0]}",
                )
            if offset % self.alignment:
                raise GGUFError(
                    self.path,
                    f"tensor {name}: expected an offset aligned to {self.alignment}, "
                    f"found {offset}",
                )
            nbytes = prod(ne) // block_size * type_size
            start = self.data_offset + offset
            if start + nbytes > file_size:
                raise GGUFError(
                    self.path,
                    f"tensor {name}: expected bytes {start}..{start + nbytes} inside the file, "
                    f"found the file ends at byte {file_size}",
                )
            tensors[name] = TensorInfo(name, qtype, tuple(reversed(ne)), start, nbytes)
        ordered = sorted(tensors.values(), key=lambda t: t.offset)
        for before, after in pairwise(ordered):
            if after.offset < before.offset + before.nbytes:
                raise GGUFError(
                    self.path,
                    f"tensor {after.name}: expected data after tensor {before.name}'s end at byte "
                    f"{before.offset + before.nbytes}, found it starts at byte {after.offset}",
                )
        return tensors
