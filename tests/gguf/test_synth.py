"""Synthetic models have the real files' exact tensor tables, and the whole stack runs on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd.engine.llm import LLM
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.gguf.synth import PRESETS, synthesize
from worker_orcd.sampling_params import SamplingParams


def tensor_table(gguf: GGUFFile) -> dict[str, tuple]:
    return {name: (info.qtype, info.shape) for name, info in gguf.tensors.items()}


@pytest.mark.parametrize(
    ("preset", "real"), [("qwen2.5-0.5b", "qwen_path"), ("smollm2-135m", "smollm2_path")]
)
def test_a_preset_matches_the_real_file(
    preset: str, real: str, request: pytest.FixtureRequest, tmp_path: Path
):
    real_file = GGUFFile(request.getfixturevalue(real))
    synthetic = GGUFFile(synthesize(preset, tmp_path / "synth.gguf"))
    assert tensor_table(synthetic) == tensor_table(real_file)
    arch = real_file.architecture
    for key, value in real_file.metadata.items():
        if key.startswith(f"{arch}.") and key != f"{arch}.vocab_size":
            assert synthetic.metadata[key] == pytest.approx(value), key
    assert len(synthetic.metadata["tokenizer.ggml.tokens"]) == PRESETS[preset].vocab


def test_a_synthetic_model_loads_and_generates_reproducibly(tmp_path: Path):
    path = synthesize("qwen2.5-0.5b", tmp_path / "small.gguf", layers=2)
    llm = LLM.load(path, "cpu")
    prompt = llm.tokenizer.encode("<|im_start|>user\nhello<|im_end|>")
    assert prompt[0] == 151_644 and prompt[-1] == 151_645  # the real special-token ids
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    runs = []
    for _ in range(2):
        generation = llm.stream(prompt, params)
        list(generation)
        runs.append(generation.result.token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_the_tokenizer_can_be_copied_from_a_real_file(smollm2_path: Path, tmp_path: Path):
    path = synthesize("smollm2-135m", tmp_path / "t.gguf", layers=1, tokenizer_from=smollm2_path)
    copied, real = GGUFFile(path).metadata, GGUFFile(smollm2_path).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert copied[key] == real[key]


def test_an_unknown_preset_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown preset 'gpt-9'"):
        synthesize("gpt-9", tmp_path / "x.gguf")
