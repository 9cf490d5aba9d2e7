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
