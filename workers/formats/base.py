"""What a prompt format is, and the registry that names them (MODEL_FORMAT).

A format turns chat messages into the exact text the model sees, names the strings that end an
answer, and reads the model's output back (most formats return it as is). A new format is one
class in one file, decorated with `@register`, plus its import in `formats/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from ..protocol import ChatMessage, InferenceRequest


class FormatError(Exception):
    """The format cannot be used with this model or these settings; the message says what to change."""


class FormatSettings(Protocol):
    """The settings formats may read (the worker's Settings has them all)."""

    @property
    def model_name(self) -> str: ...
    @property
    def template_path(self) -> Path: ...
    @property
    def harmony_identity(self) -> str: ...
    @property
    def harmony_knowledge_cutoff(self) -> str: ...
    @property
    def harmony_reasoning(self) -> str: ...


@dataclass(frozen=True)
class ModelText:
    """What a format may need from the loaded model: its GGUF metadata and special tokens as text."""

    metadata: Mapping[str, str]
    bos: str = ""
    eos: str = ""


class PromptFormat(ABC):
    name: ClassVar[str]
    stop: tuple[str, ...] = ()  # strings that end an answer, on top of the caller's

    @classmethod
    def build(cls, settings: FormatSettings, model: ModelText) -> PromptFormat:
        """The format for this worker; raise FormatError when it does not fit the model or settings."""
        return cls()

    @abstractmethod
    def render(self, messages: list[ChatMessage]) -> str:
        """The prompt for these messages, ending where the model's answer begins."""

    def parse(self, text: str) -> tuple[str, str | None]:
        """(answer, reasoning) from the generated text."""
        return text, None


FORMATS: dict[str, type[PromptFormat]] = {}


def register(cls: type[PromptFormat]) -> type[PromptFormat]:
    """Make a format available as MODEL_FORMAT=<cls.name>."""
    if cls.name in FORMATS:
        raise ValueError(f"prompt format {cls.name!r} is registered twice")
    FORMATS[cls.name] = cls
    return cls


def as_messages(req: InferenceRequest) -> list[ChatMessage]:
    if req.messages:
        return list(req.messages)
    return [ChatMessage(role="user", content=req.input or "")]


def format_prompt(req: InferenceRequest, fmt: PromptFormat) -> str:
    """The formatted prompt; `raw` requests pass their text through untouched."""
    if req.raw:
        return "\n".join(m.content for m in req.messages) if req.messages else (req.input or "")
    return fmt.render(as_messages(req))
