"""Prompt formatting on exact strings."""

from __future__ import annotations

import pytest

from workers import formats
from workers.config import ROOT
from workers.formats import FORMATS, FormatError, ModelText, PromptFormat, format_prompt, register
from workers.formats.chat import GgufChat
from workers.formats.chatml import ChatML
from workers.formats.harmony import Harmony
from workers.formats.raw import Raw
from workers.formats.template import Template
from workers.protocol import ChatMessage, InferenceRequest

GEMMA = Template.load(ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json")
QWEN = Template.load(ROOT / "data" / "models" / "qwen3-4b" / "prompt_template.json")


def req(**kw) -> InferenceRequest:
    return InferenceRequest.model_validate(kw)


def test_gemma_single_turn():
    assert format_prompt(req(input="Hi"), GEMMA) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_has_no_system_turn_so_system_goes_before_the_first_user_message():
    r = req(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}])
    assert format_prompt(r, GEMMA) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chatml_system_turn():
    r = req(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert format_prompt(r, QWEN) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raw_passes_through():
    assert format_prompt(req(input="<b>as is", raw=True), GEMMA) == "<b>as is"
    assert format_prompt(req(input="no template"), Raw()) == "no template"


def test_chatml_formatter():
    r = req(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "model", "content": "A"}, {"role": "user", "content": "V"}])
    assert format_prompt(r, ChatML()) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
    )


def test_harmony_formatter_has_identity_cutoff_date_and_reasoning():
    import datetime as dt

    h = Harmony("You are Fleet.", "2024-06", "high", today=lambda: dt.date(2026, 11, 22))
    r = req(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert format_prompt(r, h) == (
        "<|start|>system<|message|>You are Fleet.\nKnowledge cutoff: 2024-06\nCurrent date: 2026-11-22\n\n"
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|><|start|>developer<|message|># Instructions\n\nBe terse.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def parse_harmony(text: str) -> tuple[str, str | None]:
    return Harmony("", "", "").parse(text)


def test_harmony_output_with_a_final_channel():
    out = ("<|channel|>analysis<|message|>User says hi; reply briefly.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")
    assert parse_harmony(out) == ("Hello!", "User says hi; reply briefly.")


def test_harmony_output_cut_off_before_the_final_channel():
    assert parse_harmony("<|channel|>analysis<|message|>Thinking about it") == ("", "Thinking about it")
    assert parse_harmony("plain text, no channels") == ("plain text, no channels", None)


def test_gguf_chat_template_is_rendered_with_jinja():
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = GgufChat.build(SETTINGS, ModelText({"tokenizer.chat_template": template}, bos="<s>", eos="</s>"))
    r = req(messages=[{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}])
    assert format_prompt(r, chat) == "<|user|>Hi</s><|assistant|>Yo</s><|assistant|>"


class _Settings:
    model_name = "m"
    template_path = ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json"
    harmony_identity = "You are Fleet."
    harmony_knowledge_cutoff = "2024-06"
    harmony_reasoning = "low"


SETTINGS = _Settings()


def test_every_format_is_registered_by_name_with_its_stop_strings():
    assert {"template", "chat", "chatml", "harmony", "raw"} <= set(FORMATS)
    model = ModelText({})
    assert formats.build("chatml", SETTINGS, model).stop == ("<|im_end|>",)
    assert formats.build("harmony", SETTINGS, model).stop == ("<|return|>", "<|call|>")
    assert formats.build("template", SETTINGS, model).stop == GEMMA.stop
    assert formats.build("raw", SETTINGS, model).stop == ()


def test_an_unknown_format_or_a_model_without_a_chat_template_is_a_one_line_error():
    with pytest.raises(FormatError, match="MODEL_FORMAT=nope is not a known prompt format; use one of chat, "):
        formats.build("nope", SETTINGS, ModelText({}))
    with pytest.raises(FormatError, match="has no tokenizer.chat_template; use MODEL_FORMAT=template"):
        formats.build("chat", SETTINGS, ModelText({}))


def test_a_new_format_is_one_registered_class():
    @register
    class Shouting(PromptFormat):
        name = "test-shouting"
        stop = ("!!",)

        def render(self, messages: list[ChatMessage]) -> str:
            return "".join(m.content.upper() for m in messages) + " >"

    try:
        built = formats.build("test-shouting", SETTINGS, ModelText({}))
        assert format_prompt(req(input="hi"), built) == "HI >" and built.stop == ("!!",)
    finally:
        del FORMATS["test-shouting"]
