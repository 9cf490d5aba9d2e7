"""MODEL_FORMAT=raw: the caller's text as is (chat messages joined by newlines)."""

from __future__ import annotations

from ..protocol import ChatMessage
from .base import PromptFormat, register


@register
class Raw(PromptFormat):
    name = "raw"

    def render(self, messages: list[ChatMessage]) -> str:
        return "\n".join(m.content for m in messages)
