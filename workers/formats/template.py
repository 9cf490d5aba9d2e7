"""MODEL_FORMAT=template: turn markers from the model's `prompt_template.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import ChatMessage
from .base import FormatError, FormatSettings, ModelText, PromptFormat, register


@register
@dataclass(frozen=True)
class Template(PromptFormat):
    """`system_role` names the role a system prompt is sent as; empty means the model has no system
    turn (Gemma) and the system text is put before the first user message instead."""

    name = "template"

    user_prefix: str
    user_suffix: str
    model_prefix: str
    model_suffix: str = ""
    system_role: str = ""
    system_prefix: str = ""
    system_suffix: str = ""
    stop: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, path: Path) -> Template:
        try:
            data = json.loads(path.read_text())
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            if "stop" in fields:
                fields["stop"] = tuple(fields["stop"])
            return cls(**fields)
        except FileNotFoundError:
            raise FormatError(
                f"{path} is missing; create it with user_prefix/user_suffix/model_prefix or set MODEL_FORMAT=raw"
            ) from None
        except (json.JSONDecodeError, TypeError) as e:
            raise FormatError(f"{path} is not a valid prompt template ({e}); fix the JSON") from None

    @classmethod
    def build(cls, settings: FormatSettings, model: ModelText) -> Template:
        return cls.load(settings.template_path)

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
