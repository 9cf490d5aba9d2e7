"""Prompt formatting on exact strings."""

from __future__ import annotations

from workers.config import ROOT
from workers.prompts import Template, format_prompt
from workers.protocol import InferenceRequest

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
    assert format_prompt(req(input="no template"), None) == "no template"


def test_chatml_formatter():
    from workers.prompts import chatml

    r = req(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "model", "content": "A"}, {"role": "user", "content": "V"}])
    assert format_prompt(r, chatml) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
    )


def test_harmony_formatter_has_identity_cutoff_date_and_reasoning():
    import datetime as dt

    from workers.prompts import Harmony

    h = Harmony("You are Fleet.", "2024-06", "high", today=lambda: dt.date(2026, 11, 22))
    r = req(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert format_prompt(r, h) == (
        "<|start|>system<|message|>You are Fleet.\nKnowledge cutoff: 2024-06\nCurrent date: 2026-11-22\n\n"
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|><|start|>developer<|message|># Instructions\n\nBe terse.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_harmony_output_with_a_final_channel():
    from workers.prompts import parse_harmony

    out = ("<|channel|>analysis<|message|>User says hi; reply briefly.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")
    assert parse_harmony(out) == ("Hello!", "User says hi; reply briefly.")


def test_harmony_output_cut_off_before_the_final_channel():
    from workers.prompts import parse_harmony

    assert parse_harmony("<|channel|>analysis<|message|>Thinking about it") == ("", "Thinking about it")
    assert parse_harmony("plain text, no channels") == ("plain text, no channels", None)


def test_gguf_chat_template_is_rendered_with_jinja():
    from workers.prompts import gguf_chat

    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    render = gguf_chat(template, "<s>", "</s>")
    r = req(messages=[{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}])
    assert format_prompt(r, render) == "<|user|>Hi</s><|assistant|>Yo</s><|assistant|>"
