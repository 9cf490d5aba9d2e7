"""MODEL_FORMAT=harmony: OpenAI's format for gpt-oss; the answer comes in a `final` channel and the
reasoning in an `analysis` channel."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import ChatMessage
from .base import FormatSettings, ModelText, PromptFormat, register

_CHANNEL = re.compile(r"<\|channel\|>(\w+)<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|call\|>|<\|start\|>|$)",
                      re.S)


@register
@dataclass(frozen=True)
class Harmony(PromptFormat):
    """A system block (identity, knowledge cutoff, today's date, reasoning effort), the caller's system
    text as developer instructions, then the turns."""

    name = "harmony"
    stop = ("<|return|>", "<|call|>")

    identity: str
    knowledge_cutoff: str
    reasoning: str
    today: Callable[[], dt.date] = dt.date.today

    @classmethod
    def build(cls, settings: FormatSettings, model: ModelText) -> Harmony:
        return cls(settings.harmony_identity, settings.harmony_knowledge_cutoff, settings.harmony_reasoning)

    def render(self, messages: list[ChatMessage]) -> str:
        system = (f"{self.identity}\nKnowledge cutoff: {self.knowledge_cutoff}\n"
                  f"Current date: {self.today().isoformat()}\n\nReasoning: {self.reasoning}\n\n"
                  "# Valid channels: analysis, commentary, final. Channel must be included for every message.")
        out = [f"<|start|>system<|message|>{system}<|end|>"]
        instructions = "\n\n".join(m.content for m in messages if m.role == "system")
        if instructions:
            out.append(f"<|start|>developer<|message|># Instructions\n\n{instructions}<|end|>")
        for m in messages:
            if m.role == "user":
                out.append(f"<|start|>user<|message|>{m.content}<|end|>")
            elif m.role in ("assistant", "model"):
                out.append(f"<|start|>assistant<|channel|>final<|message|>{m.content}<|end|>")
        out.append("<|start|>assistant")
        return "".join(out)

    def parse(self, text: str) -> tuple[str, str | None]:
        """The `final` channel is the answer and `analysis` the reasoning. No final channel (cut off while
        thinking) means no answer yet; no channels at all means the text is returned as is."""
        channels: dict[str, list[str]] = {}
        for name, body in _CHANNEL.findall(text):
            channels.setdefault(name, []).append(body)
        if not channels:
            return text, None
        reasoning = "".join(channels["analysis"]) if "analysis" in channels else None
        return "".join(channels.get("final", [])), reasoning
