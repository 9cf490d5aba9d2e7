"""MODEL_FORMAT=chat: the model's own chat template (GGUF `tokenizer.chat_template`), rendered with Jinja
like llama.cpp does."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..protocol import ChatMessage
from .base import FormatError, FormatSettings, ModelText, PromptFormat, register

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage


@register
class GgufChat(PromptFormat):
    name = "chat"

    def __init__(self, template: str, bos: str, eos: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos,
                                              add_generation_prompt=True)

    @classmethod
    def build(cls, settings: FormatSettings, model: ModelText) -> GgufChat:
        template = model.metadata.get("tokenizer.chat_template")
        if not template:
            raise FormatError(f"MODEL_FORMAT=chat but {settings.model_name}'s GGUF has no tokenizer.chat_template; "
                              "use MODEL_FORMAT=template with a prompt_template.json, or chatml")
        return cls(template, model.bos, model.eos)

    def render(self, messages: list[ChatMessage]) -> str:
        role = {"model": "assistant"}
        # llama-cpp-python types each role's message as its own TypedDict; ChatMessage has already checked the role.
        msgs = cast("list[ChatCompletionRequestMessage]",
                    [{"role": role.get(m.role, m.role), "content": m.content} for m in messages])
        prompt: str = self._formatter(messages=msgs).prompt
        return prompt
