"""MODEL_FORMAT=chatml: `<|im_start|>role ... <|im_end|>` turns (Qwen, SmolLM2 and many fine-tunes)."""

from __future__ import annotations

from ..protocol import ChatMessage
from .base import PromptFormat, register


@register
class ChatML(PromptFormat):
    name = "chatml"
    stop = ("<|im_end|>",)

    def render(self, messages: list[ChatMessage]) -> str:
        role = {"model": "assistant"}
        body = "".join(f"<|im_start|>{role.get(m.role, m.role)}\n{m.content}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"
