"""Prompt formats by name (MODEL_FORMAT). Each format is one module; importing it registers it."""

from __future__ import annotations

from . import chat, chatml, harmony, raw, template
from .base import FORMATS, FormatError, FormatSettings, ModelText, PromptFormat, as_messages, format_prompt, register

__all__ = ["FORMATS", "FormatError", "FormatSettings", "ModelText", "PromptFormat", "as_messages", "build",
           "format_prompt", "register", "chat", "chatml", "harmony", "raw", "template"]


def build(name: str, settings: FormatSettings, model: ModelText) -> PromptFormat:
    """The registered format `name`, built for this worker; FormatError says what to change."""
    try:
        cls = FORMATS[name]
    except KeyError:
        raise FormatError(f"MODEL_FORMAT={name} is not a known prompt format; use one of "
                          f"{', '.join(sorted(FORMATS))}") from None
    return cls.build(settings, model)
