"""Random-weight GGUF files with the exact tensor names, shapes, types and metadata of a real one.

The GPU machine can download nothing and receives at most 64 MiB, so real-shape models are made
there. Speed does not depend on the weights' values, only on their shapes and block types, so
random valid blocks (random quants, finite scales sized for weights of about 0.02) are enough.
The tokenizer is a byte-level BPE vocabulary of the preset's size with its control tokens at
their real ids, or the real one copied from a GGUF file given with `tokenizer_from`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from worker_orcd.gguf.reader import GGUFFile

T = GGMLQuantizationType
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    architecture: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rope_base: float
    rms_eps: float
    file_type: int
    tensor_type: Callable[[str, int], GGMLQuantizationType]  # (tensor role, layer) -> type
    qkv_bias: bool
    tied_output: bool
    pre_tokenizer: str
    specials: dict[int, str]  # id -> text of the control tokens
    token_ids: dict[str, int]  # bos/eos/padding -> id
    add_bos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# llama.cpp's Q4_K_M keeps these layers' ffn_down in Q6_K and attn_v in Q8_0 in the real file.
_QWEN_MORE_BITS = frozenset({0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21})


def _qwen_q4_k_m(role: str, layer: int) -> GGMLQuantizationType:
    if role == "output":
        return T.Q8_0
    if role == "ffn_down":
        return T.Q6_K if layer in _QWEN_MORE_BITS else T.Q4_K
    if role == "attn_v" and layer in _QWEN_MORE_BITS:
        return T.Q8_0
    return T.Q5_0


def _smollm_q4_1(role: str, layer: int) -> GGMLQuantizationType:
    return T.Q8_0 if role == "token_embd" else T.Q4_1


_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

PRESETS: dict[str, Preset] = {
    "qwen2.5-0.5b": Preset(
        architecture="qwen2", layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2,
        vocab=151_936, context=32_768, rope_base=1_000_000.0, rms_eps=1e-6, file_type=15,
        tensor_type=_qwen_q4_k_m, qkv_bias=True, tied_output=False, pre_tokenizer="qwen2",
        specials={151_643 + i: text for i, text in enumerate(_QWEN_SPECIALS)},
        token_ids={"bos": 151_643, "eos": 151_645, "padding": 151_643},
    ),
    "smollm2-135m": Preset(
        architecture="llama", layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3,
        vocab=49_152, context=8_192, rope_base=100_000.0, rms_eps=1e-5, file_type=3,
        tensor_type=_smollm_q4_1, qkv_bias=False, tied_output=True, pre_tokenizer="smollm",
        specials={0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
        token_ids={"bos": 1, "eos": 2, "padding": 2, "unknown": 0},
        extra={"rope.dimension_count": 64},
    ),
}  # fmt: skip

# Byte offsets of each block's f16 scales, and the scale that gives weights of about 0.02.
_SCALES: dict[GGMLQuantizationType, tuple[tuple[int, ...], float]] = {
    T.Q4_0: ((0,), 4e-3),
    T.Q4_1: ((0, 2), 4e-3),
    T.Q5_0: ((0,), 2e-3),
    T.Q5_1: ((0, 2), 2e-3),
    T.Q8_0: ((0,), 3e-4),
    T.Q4_K: ((0, 2), 1e-4),
    T.Q5_K: ((0, 2), 5e-5),
    T.Q6_K: ((208,), 2e-5),
}


def random_blocks(
    qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    """(rows, row_bytes) uint8: random valid blocks, or float rows of about 0.02."""
    if qtype in (T.F32, T.F16):
        dtype = np.float32 if qtype == T.F32 else np.float16
        values = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)
        return values.view(np.uint8)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    offsets, scale = _SCALES[qtype]
    for offset in offsets:
        field_values = (rng.random(len(blocks), dtype=np.float32) * 2 * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = field_values.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def _tensors(preset: Preset) -> Iterator[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, shape outermost first, type) in the order llama.cpp writes them."""
    p = preset
    head_dim = p.hidden // p.heads
    kv = p.kv_heads * head_dim
    if not p.tied_output:
        yield "output.weight", (p.vocab, p.hidden), p.tensor_type("output", -1)
    yield "token_embd.weight", (p.vocab, p.hidden), p.tensor_type("token_embd", -1)
    for i in range(p.layers):
        blk = f"blk.{i}"
        yield f"{blk}.attn_norm.weight", (p.hidden,), T.F32
        yield f"{blk}.ffn_down.weight", (p.hidden, p.ffn), p.tensor_type("ffn_down", i)
        yield f"{blk}.ffn_gate.weight", (p.ffn, p.hidden), p.tensor_type("ffn_gate", i)
        yield f"{blk}.ffn_up.weight", (p.ffn, p.hidden), p.tensor_type("ffn_up", i)
        yield f"{blk}.ffn_norm.weight", (p.hidden,), T.F32
        for role, rows in (("attn_k", kv), ("attn_output", p.hidden), ("attn_q", p.hidden)):
            if p.qkv_bias and role != "attn_output":
                yield f"{blk}.{role}.bias", (rows,), T.F32
            yield f"{blk}.{role}.weight", (rows, p.hidden), p.tensor_type(role, i)
        if p.qkv_bias:
            yield f"{blk}.attn_v.bias", (kv,), T.F32
        yield f"{blk}.attn_v.weight", (kv, p.hidden), p.tensor_type("attn_v", i)
    yield "output_norm.weight", (p.hidden,), T.F32


def _synthetic_vocabulary(preset: Preset) -> tuple[list[str], list[str], list[int]]:
    """Byte-level BPE tokens, merges and types: the 256 byte symbols, then each token so far
    extended by each byte symbol, in order, up to the vocabulary size; the preset's control
    tokens sit at their real ids."""
    byte_symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
    byte_symbols += [chr(c) for c in range(174, 256)]
    byte_symbols += [chr(256 + i) for i in range(256 - len(byte_symbols))]
    ordinary = preset.vocab - len(preset.specials)
    tokens, merges = list(byte_symbols), []
    stem = 0
    while len(tokens) < ordinary:
        for symbol in byte_symbols[: ordinary - len(tokens)]:
            tokens.append(tokens[stem] + symbol)
            merges.append(f"{tokens[stem]} {symbol}")
        stem += 1
    types = [1] * ordinary
    for token_id, text in sorted(preset.specials.items()):
        tokens.insert(token_id, text)
        types.insert(token_id, 3)
    return tokens, merges, types


def _write_tokenizer(writer: GGUFWriter, preset: Preset, tokenizer_from: Path | None) -> None:
    if tokenizer_from is not None:
        source = GGUFFile(tokenizer_from).metadata
        for key, value in source.items():
            if key.startswith("tokenizer."):
                _add(writer, key, value)
        return
    tokens, merges, types = _synthetic_vocabulary(preset)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", preset.pre_tokenizer)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    for name, token_id in preset.token_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{name}_token_id", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", preset.add_bos)
    writer.add_string("tokenizer.chat_template", CHATML)


def _add(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_key_value(key, value, GGUFValueType.ARRAY)


def synthesize(
    preset_name: str,
    output: Path,
    *,
    layers: int | None = None,
    tokenizer_from: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight GGUF of `preset_name` (optionally with fewer `layers`)."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}: expected one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    if layers is not None:
        preset = Preset(**{**preset.__dict__, "layers": layers})
    rng = np.random.default_rng(seed)
    arch = preset.architecture
    writer = GGUFWriter(str(output), arch)
    writer.add_string("general.name", f"synthetic {preset_name}")
    writer.add_uint32("general.file_type", preset.file_type)
    writer.add_uint32("general.quantization_version", 2)
    hparams = {
        "block_count": preset.layers,
        "context_length": preset.context,
        "embedding_length": preset.hidden,
        "feed_forward_length": preset.ffn,
        "attention.head_count": preset.heads,
        "attention.head_count_kv": preset.kv_heads,
        "rope.freq_base": preset.rope_base,
        "attention.layer_norm_rms_epsilon": preset.rms_eps,
        **preset.extra,
    }
    for key, value in hparams.items():
        _add(writer, f"{arch}.{key}", value)
    _write_tokenizer(writer, preset, tokenizer_from)
    for name, shape, qtype in _tensors(preset):
        if name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        elif qtype == T.F32:
            data = rng.standard_normal(shape, dtype=np.float32) * 0.02
        else:
            rows = int(np.prod(shape[:-1]))
            data = random_blocks(qtype, rows, shape[-1], rng)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            continue
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output
