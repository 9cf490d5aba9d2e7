"""Prompt formatting: turn a request (input or chat messages) into the exact text the model sees."""

from __future__ import annotations

import json
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


def format_prompt(req: InferenceRequest, template: Template | None) -> str:
    """The formatted prompt; `raw` requests and raw-format workers pass the text through untouched."""
    if req.raw or template is None:
        if req.messages:
            return "\n".join(m.content for m in req.messages)
        return req.input or ""
    return template.render(as_messages(req))
