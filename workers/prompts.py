"""Prompt formatting: turn a request (input or chat messages) into the exact text the model sees."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import ChatMessage, InferenceRequest


class TemplateError(Exception):
    """The prompt template file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class Template:
    """Turn markers from `prompt_template.json`.

    `system_role` names the role a system prompt is sent as; empty means the model has no system
    turn (Gemma) and the system text is put before the first user message instead.
    """

    user_prefix: str
    user_suffix: str
    model_prefix: str
    model_suffix: str = ""
    system_role: str = ""
    system_prefix: str = ""
    system_suffix: str = ""
    stop: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Template:
        try:
            data = json.loads(path.read_text())
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            return cls(**fields)
        except FileNotFoundError:
            raise TemplateError(
                f"{path} is missing; create it with user_prefix/user_suffix/model_prefix or set MODEL_FORMAT=raw"
            ) from None
        except (json.JSONDecodeError, TypeError) as e:
            raise TemplateError(f"{path} is not a valid prompt template ({e}); fix the JSON") from None

    def render(self, messages: list[ChatMessage]) -> str:
        parts: list[str] = []
        pending_system = ""
        model_suffix = self.model_suffix or self.user_suffix
        for m in messages:
            if m.role == "system":
                if self.system_role:
                    parts.append(f"{self.system_prefix}{m.content}{self.system_suffix}")
                else:
                    pending_system += m.content + "\n\n"
            elif m.role == "user":
                parts.append(f"{self.user_prefix}{pending_system}{m.content}{self.user_suffix}")
                pending_system = ""
            else:
                parts.append(f"{self.model_prefix}{m.content}{model_suffix}")
        if pending_system:  # a system prompt with no user turn after it
            parts.append(f"{self.user_prefix}{pending_system.rstrip()}{self.user_suffix}")
        parts.append(self.model_prefix)
        return "".join(parts)


def as_messages(req: InferenceRequest) -> list[ChatMessage]:
    if req.messages:
        return list(req.messages)
    return [ChatMessage(role="user", content=req.input or "")]


def format_prompt(req: InferenceRequest, template: Template | Renderer | None) -> str:
    """The formatted prompt; `raw` requests and raw-format workers pass the text through untouched."""
    if req.raw or template is None:
        if req.messages:
            return "\n".join(m.content for m in req.messages)
        return req.input or ""
    if isinstance(template, Template):
        return template.render(as_messages(req))
    return template(as_messages(req))


Renderer = Callable[[list[ChatMessage]], str]

CHATML_STOP = ["<|im_end|>"]
HARMONY_STOP = ["<|return|>", "<|call|>"]


def chatml(messages: list[ChatMessage]) -> str:
    role = {"model": "assistant"}
    body = "".join(f"<|im_start|>{role.get(m.role, m.role)}\n{m.content}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


@dataclass(frozen=True)
class Harmony:
    """OpenAI's harmony format (gpt-oss): a system block, the caller's system text as developer
    instructions, then the turns; the model answers in an `analysis` and a `final` channel."""

    identity: str
    knowledge_cutoff: str
    reasoning: str
    today: Callable[[], dt.date] = dt.date.today

    def __call__(self, messages: list[ChatMessage]) -> str:
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


_CHANNEL = re.compile(r"<\|channel\|>(\w+)<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|call\|>|<\|start\|>|$)",
                      re.S)


def parse_harmony(text: str) -> tuple[str, str | None]:
    """(answer, reasoning) from a harmony completion: the `final` channel is the answer and the
    `analysis` channel the reasoning. No final channel (cut off while thinking) means no answer yet."""
    channels: dict[str, list[str]] = {}
    for name, body in _CHANNEL.findall(text):
        channels.setdefault(name, []).append(body)
    if not channels:
        return text, None
    reasoning = "".join(channels["analysis"]) if "analysis" in channels else None
    return "".join(channels.get("final", [])), reasoning


def gguf_chat(template: str, bos: str, eos: str) -> Renderer:
    """The model's own chat template (tokenizer.chat_template), rendered with Jinja like llama.cpp does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos, add_generation_prompt=True)

    def render(messages: list[ChatMessage]) -> str:
        role = {"model": "assistant"}
        msgs = [{"role": role.get(m.role, m.role), "content": m.content} for m in messages]
        return formatter(messages=msgs).prompt  # type: ignore[arg-type]

    return render
