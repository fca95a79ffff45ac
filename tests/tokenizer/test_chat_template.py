"""Chat templates: the files' own templates render as transformers renders them; the fallback,
the helpers templates rely on, and the sandbox."""

from __future__ import annotations

import pytest

from worker_orcd.tokenizer import ChatTemplate, ChatTemplateError
from worker_orcd.tokenizer.chat import CHATML

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Write a haiku about GPUs 🌍, 日本語で。"},
    ],
    [
        {"role": "user", "content": "  spaces  and\nnewlines\n"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_file_templates_render_as_in_transformers(ours, reference, add_generation_prompt):
    if reference.chat_template is None:
        pytest.skip("the file has no chat template")
    for messages in CONVERSATIONS:
        want = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == want


def test_a_file_without_template_falls_back_to_chatml(model, ours):
    """Gemma-3-270m (a base model) has no `tokenizer.chat_template`; SmolLM2 and Qwen have one."""
    assert (ours.chat_template.source == CHATML) == (model == "gemma")
    if model == "gemma":
        assert ours.apply_chat_template(CONVERSATIONS[0]) == (
            "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
        )


def test_bos_eos_and_helpers():
    source = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}\n"
        "  {{ m | tojson }}{{ eos_token }}\n"
        "{% endfor %}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    rendered = template.render([{"role": "user", "content": "日本"}], add_generation_prompt=False)
    # trim_blocks and lstrip_blocks remove the block lines; tojson keeps non-ASCII text.
    assert rendered == '<s>  {"role": "user", "content": "日本"}</s>\n'
    with pytest.raises(ChatTemplateError, match="Unknown role: tool"):
        template.render([{"role": "tool", "content": ""}])


def test_templates_are_sandboxed():
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
