"""MODEL_FORMAT=chat: the model's own chat template (GGUF `tokenizer.chat_template`), rendered with Jinja
like llama.cpp does: `bos_token` and `eos_token` are the model's, and the answer ends at its end-of-turn token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from jinja2 import TemplateError

from ..protocol import BadRequest, ChatMessage
from .base import FormatError, FormatSettings, ModelText, PromptFormat, register

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

# llama.cpp's default for a GGUF without tokenizer.ggml.add_bos_token, by tokenizer.ggml.model
_ADDS_BOS = {"llama": True, "bert": True, "gpt2": False, "t5": False}


def adds_bos(metadata: Mapping[str, str]) -> bool:
    """Whether llama.cpp's tokenizer puts a BOS token before the prompt by itself for this model."""
    flag = metadata.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        return str(flag).lower() == "true"
    return _ADDS_BOS.get(metadata.get("tokenizer.ggml.model", ""), False)


@register
class GgufChat(PromptFormat):
    name = "chat"

    def __init__(self, template: str, bos: str, eos: str, add_bos: bool = False) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos,
                                              add_generation_prompt=True)
        self._bos = bos if add_bos else ""
        # The end-of-turn token (EOS: <|im_end|> for ChatML models) ends the answer. The engines stop at any
        # end-of-generation token already; the string catches it where a model spells it out in pieces.
        self.stop = (eos,) if eos else ()

    @classmethod
    def build(cls, settings: FormatSettings, model: ModelText) -> GgufChat:
        template = model.metadata.get("tokenizer.chat_template")
        if not template:
            raise FormatError(f"MODEL_FORMAT=chat but {settings.model_name}'s GGUF has no tokenizer.chat_template; "
                              "use MODEL_FORMAT=template with a prompt_template.json, or chatml")
        return cls(template, model.bos, model.eos, add_bos=adds_bos(model.metadata))

    def render(self, messages: list[ChatMessage]) -> str:
        role = {"model": "assistant"}
        # llama-cpp-python types each role's message as its own TypedDict; ChatMessage has already checked the role.
        msgs = cast("list[ChatCompletionRequestMessage]",
                    [{"role": role.get(m.role, m.role), "content": m.content} for m in messages])
        try:
            prompt: str = self._formatter(messages=msgs).prompt
        except (TemplateError, ValueError, TypeError) as e:  # the template's raise_exception(): roles out of order
            raise BadRequest("invalid_input", f"the model's chat template refused these messages ({e}); "
                             "check the order of the roles") from None
        # The tokenizer adds the model's BOS itself; a template that writes {{ bos_token }} would give two (llama.cpp
        # strips it the same way).
        if self._bos and prompt.startswith(self._bos):
            prompt = prompt[len(self._bos):]
        return prompt
