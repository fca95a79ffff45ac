"""Shared tokenizer fixtures: the corpus, and per real model our tokenizer and transformers'.

`model` is a session-scoped parameter, so pytest runs all tests of one model together and builds
each tokenizer once (transformers needs 2 to 5 s per file to convert a GGUF vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.tokenizer import Tokenizer, load_tokenizer

CORPUS: tuple[str, ...] = (
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "I'm sure they'll say it's fine, and we've seen you'd agree.",
    "DON'T SHOUT, IT'S LOUD",
    "The quick brown fox jumps over the lazy dog.",
    "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e#f",
    "CamelCaseIdentifiersAndsnake_case_names",
    "1234567890",
    "3.14159 2.71828 1e-10 -42 +7 1,000,000",
    "Year 2024, room 101, code 0042, 99999999999999999999",
    "你好世界",
    "中文字符和English混合在一起。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم",
    "النص العربي مع أرقام ١٢٣ و 456",
    "नमस्ते दुनिया",
    "हिन्दी में लिखा गया वाक्य।",
    "Привет, мир! Ёжик.",
    "Γειά σου Κόσμε",
    "ภาษาไทยไม่มีช่องว่าง",
    "Mixed: 日本語 English العربية",
    "Hello 👋 World 🌍",
    "👨‍👩‍👧‍👦 family, 👩🏽‍💻 coder, 🏳️‍🌈 flag",
    "Flags: 🇺🇸🇬🇧🇯🇵🇩🇪",
    "🤖🤖🤖🤖🤖",
    "Emoji with skin tones 👍🏻👍🏼👍🏽👍🏾👍🏿",
    "café naïve résumé",
    "cafe\u0301 decomposed",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "math: ∑ ∫ √ ∞ ≠ ≤ ≥ π ∂",
    "rare, byte fallback in Gemma: 𓀀 ꙮ \U0001fae8",
    "def f(x):\n    return x * 2\n",
    "class A:\n    def __init__(self):\n        self.x = 1\n\n    def g(self):\n\t\treturn None\n",
    'if (a && b) {\n  printf("%d\\n", a);\n}\n',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><b>bold</b> <i>italic</i></body></html>",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "a    b",
    "x" + " " * 40 + "y",
    " " * 64,
    "tabs\tand\t\ttabs\t\t\tmore",
    "\t\t\t\t",
    "line1\nline2\r\nline3\rline4",
    "\n\n\n\nparagraphs\n\n",
    " \n \t \n",
    "trailing newlines\n\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>not at the start<eos>",
    "<s>[INST] hi [/INST]</s>",
    "literal byte token <0x41> and <0xE4>",
    "▁ lower one eighth block ▁▁",
    "replacement char \ufffd here",
    "Ġ and Ċ characters",
    "supercalifragilisticexpialidocious" * 3,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "a" * 200,
    "!!!???...,,,;;;",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
)

# The root conftest's fixture that pulls each model.
PATH_FIXTURES = {"smollm2": "smollm2_path", "qwen": "qwen_path", "gemma": "gemma_path"}
# The tokenizer class AutoTokenizer picks for each file.
REFERENCE_CLASSES = {
    "smollm2": "TokenizersBackend",
    "qwen": "Qwen2Tokenizer",
    "gemma": "GemmaTokenizer",
}


@pytest.fixture(scope="session")
def corpus() -> tuple[str, ...]:
    return CORPUS


@pytest.fixture(scope="session", params=sorted(PATH_FIXTURES))
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def gguf_path(model: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(PATH_FIXTURES[model])


@pytest.fixture(scope="session")
def ours(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(GGUFFile(gguf_path).metadata)


@pytest.fixture(scope="session")
def reference(model: str, gguf_path: Path):
    """transformers' tokenizer for the same file: the independent reference.

    This is what `AutoTokenizer.from_pretrained(dir, gguf_file=name)` returns, built by the same
    GGUF conversion, but we name the class it picks (checked: same ids on the whole corpus):
    AutoTokenizer first reads the whole file with `gguf.GGUFReader` to learn the architecture,
    which alone takes 5 s for SmolLM2 and 25 s for Gemma's 262k-token vocabulary here.
    """
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, REFERENCE_CLASSES[model])
    return cls.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
