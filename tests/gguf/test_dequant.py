"""The torch dequantizers against gguf's numpy reference: bit for bit, on random and real blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize

from worker_orcd.gguf.dequant import SUPPORTED_TYPES, dequantize
from worker_orcd.gguf.reader import GGUFFile

T = GGMLQuantizationType
TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.name)
SHAPES = [(256,), (4, 512), (3, 2, 256)]

# Byte offset, width and exponent mask of the float fields in each block (the scales; the values
# themselves for the plain types), so that random blocks can be made to decode to finite values.
_F16 = (2, 0x7C00)
_FLOAT_FIELDS: dict[GGMLQuantizationType, tuple[tuple[int, int, int], ...]] = {
    T.F32: ((0, 4, 0x7F800000),),
    T.F16: ((0, *_F16),),
    T.BF16: ((0, 2, 0x7F80),),
    T.Q4_0: ((0, *_F16),),
    T.Q4_1: ((0, *_F16), (2, *_F16)),
    T.Q5_0: ((0, *_F16),),
    T.Q5_1: ((0, *_F16), (2, *_F16)),
    T.Q8_0: ((0, *_F16),),
    T.Q4_K: ((0, *_F16), (2, *_F16)),
    T.Q5_K: ((0, *_F16), (2, *_F16)),
    T.Q6_K: ((208, *_F16),),
    T.MXFP4: ((0, 1, 0xFC),),  # e8m0 exponents from 253 up overflow 12 * 2^(e-128) to Inf
}


def random_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random GGUF bytes for `shape`, shaped as gguf's reference expects: (*outer, row bytes)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    return (
        np.random.default_rng(seed)
        .integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        .reshape(*shape[:-1], shape[-1] // block_size * type_size)
    )


def make_finite(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Clear one exponent bit of every float field whose exponent is all ones (Inf/NaN), leaving
    all other bits random."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, type_size).copy()
    for start, width, exponent in _FLOAT_FIELDS[qtype]:
        dtype = np.dtype(f"<u{width}")
        field = blocks[:, start : start + width].copy().view(dtype)
        special = (field & exponent) == exponent
        field[special] &= dtype.type(~(exponent & -exponent) & (256**width - 1))
        blocks[:, start : start + width] = field.view(np.uint8)
    return blocks.reshape(data.shape)


def assert_bitwise_equal(actual: torch.Tensor, expected: np.ndarray, nan_aware: bool) -> None:
    """Equal bit patterns (stricter than torch.equal, which lets -0.0 == 0.0); with `nan_aware`,
    NaN positions must match but NaN payloads may differ, else all values must be finite."""
    expected_t = torch.from_numpy(np.ascontiguousarray(expected))
    assert actual.dtype == torch.float32 and expected_t.dtype == torch.float32
    assert actual.shape == expected_t.shape
    if nan_aware:
        nan = actual.isnan()
        assert torch.equal(nan, expected_t.isnan())
        actual, expected_t = actual[~nan], expected_t[~nan]
    else:
        assert actual.isfinite().all()
    assert torch.equal(actual.view(torch.int32), expected_t.view(torch.int32))


def check(qtype: GGMLQuantizationType, data: np.ndarray, shape: tuple[int, ...], nan_aware=False):
    actual = dequantize(torch.from_numpy(data.copy()), qtype, shape)
    assert_bitwise_equal(actual, reference_dequantize(data, qtype), nan_aware)


def test_supported_types():
    expected = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    expected |= {"Q4_K", "Q5_K", "Q6_K", "MXFP4"}
    assert {t.name for t in SUPPORTED_TYPES} == expected


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_finite_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...]):
    data = make_finite(random_bytes(qtype, shape, seed=len(shape) * 1000 + int(qtype)), qtype)
    check(qtype, data, shape)


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_raw_random_bytes_including_nan_and_inf(qtype: GGMLQuantizationType):
    """Fully random bytes, NaN/Inf scales included. NaN payloads are not compared: torch's f16
    conversion quiets signalling NaNs (numpy keeps them), and for Q5_1 with both d and m NaN
    torch's add keeps the other operand's payload."""
    shape = (16, 2048)
    data = random_bytes(qtype, shape, seed=int(qtype))
    assert not np.isfinite(reference_dequantize(data, qtype)).all()  # the case is really covered
    check(qtype, data, shape, nan_aware=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cuda_matches_reference(qtype: GGMLQuantizationType):
    shape = (16, 2048)
    raw = random_bytes(qtype, shape, seed=int(qtype))
    for data, nan_aware in ((make_finite(raw, qtype), False), (raw, True)):
        actual = dequantize(torch.from_numpy(data.copy()).cuda(), qtype, shape)
        assert actual.device.type == "cuda"
        assert_bitwise_equal(actual.cpu(), reference_dequantize(data, qtype), nan_aware)


def test_plain_types_with_odd_shapes():
    for qtype in (T.F32, T.F16, T.BF16):
        shape = (3, 5, 7)
        check(qtype, make_finite(random_bytes(qtype, shape, seed=7), qtype), shape)


def test_unaligned_and_flat_input_bytes():
    """Bytes may start at any offset of a larger buffer and arrive in any shape."""
    qtype, shape = T.Q4_K, (2, 256)
    data = make_finite(random_bytes(qtype, shape, seed=3), qtype)
    buffer = torch.zeros(data.size + 1, dtype=torch.uint8)
    buffer[1:] = torch.from_numpy(data.reshape(-1))
    assert_bitwise_equal(
        dequantize(buffer[1:], qtype, shape), reference_dequantize(data, qtype), nan_aware=False
    )


def test_empty_tensor():
    result = dequantize(torch.empty(0, dtype=torch.uint8), T.Q6_K, (0, 256))
    assert result.shape == (0, 256) and result.dtype == torch.float32


def test_result_does_not_alias_input():
    raw = torch.from_numpy(np.arange(4, dtype=np.float32).view(np.uint8).copy())
    result = dequantize(raw, T.F32, (4,))
    raw.zero_()
    assert result.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_NL, T.I8])
def test_unsupported_type(qtype: GGMLQuantizationType):
    with pytest.raises(ValueError, match=f"cannot dequantize GGUF type {qtype.name}"):
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (256,))


@pytest.mark.parametrize(
    ("nbytes", "shape", "match"),
    [
        (143, (256,), r"expected 144 bytes \(1 blocks of 144\), found 143"),
        (288, (256,), "expected 144 bytes"),
        (144, (2, 128), "multiple of the block size 256"),
        (144, (), "multiple of the block size"),
    ],
)
def test_byte_count_or_shape_mismatch(nbytes: int, shape: tuple[int, ...], match: str):
    with pytest.raises(ValueError, match=match):
        dequantize(torch.zeros(nbytes, dtype=torch.uint8), T.Q4_K, shape)


def test_non_byte_input():
    with pytest.raises(ValueError, match="expected uint8 bytes"):
        dequantize(torch.zeros(36, dtype=torch.float32), T.F32, (36,))


MODEL_TYPES = {
    "smollm2_path": {T.Q4_1, T.Q8_0, T.F32},
    "qwen_path": {T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K, T.F32},
    "gemma_path": {T.Q5_0, T.Q4_K, T.Q6_K, T.Q8_0, T.F32},
}


@pytest.mark.parametrize("model", sorted(MODEL_TYPES))
def test_real_model_tensors(model: str, request: pytest.FixtureRequest):
    """The smallest tensor of each type in each real model (at most its first 1 MiB of rows)."""
    gguf_file = GGUFFile(request.getfixturevalue(model))
    smallest = {}
    for info in sorted(gguf_file.tensors.values(), key=lambda info: info.nbytes, reverse=True):
        smallest[info.qtype] = info
    assert set(smallest) == MODEL_TYPES[model]
    for qtype, info in smallest.items():
        row_bytes = info.nbytes // int(np.prod(info.shape[:-1]))
        n_rows = max(1, min(int(np.prod(info.shape[:-1])), (1 << 20) // row_bytes))
        data = np.array(gguf_file.tensor_data(info.name)[: n_rows * row_bytes])
        data = data.reshape(n_rows, row_bytes)
        shape = (n_rows, info.shape[-1])
        actual = dequantize(torch.from_numpy(data.copy()), qtype, shape)
        assert_bitwise_equal(actual, reference_dequantize(data, qtype), nan_aware=False)
