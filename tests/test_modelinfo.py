"""Capabilities and model_info come from GGUF metadata, never from the model's name."""

from __future__ import annotations

import pytest

from workers.modelinfo import capabilities, human_count, model_info

GEMMA3_BASE = {"general.architecture": "gemma3", "general.basename": "gemma-3", "general.size_label": "270M",
               "general.file_type": "15", "gemma3.context_length": "32768", "gemma3.embedding_length": "640"}
QWEN3 = {"general.architecture": "qwen3", "general.file_type": "7", "qwen3.context_length": "40960",
         "qwen3.embedding_length": "2560",
         "tokenizer.chat_template": "{%- if tools %}<|im_start|>system\n# Tools{% endif %}"
                                    "{%- if enable_thinking %}<think>\n\n</think>{% endif %}"}
GPT_OSS = {"general.architecture": "gpt-oss", "general.file_type": "38", "gpt-oss.embedding_length": "2880",
           "tokenizer.chat_template": "<|start|>assistant<|channel|>analysis<|message|>{{ reasoning }}"}
NOMIC_BERT = {"general.architecture": "nomic-bert", "general.file_type": "1", "nomic-bert.pooling_type": "1",
              "nomic-bert.embedding_length": "768", "nomic-bert.context_length": "2048"}
BERT = {"general.architecture": "bert", "general.file_type": "1", "bert.pooling_type": "1",
        "bert.embedding_length": "384"}


def test_gemma3_base_generates_text_and_nothing_more():
    assert capabilities(GEMMA3_BASE, kind="inference") == ["text-generation"]
    info = model_info(GEMMA3_BASE, context_size=2048)
    assert info["architecture"] == "gemma3" and info["quantization"] == "Q4_K_M"
    assert info["embedding_size"] == 640 and info["trained_context_size"] == 32768 and info["context_size"] == 2048
    assert info["parameter_count"] == "270M" and info["model_family"] == "gemma-3"


def test_qwen3_template_means_chat_tools_and_reasoning():
    assert capabilities(QWEN3, kind="inference") == ["text-generation", "chat", "tool-calling", "reasoning"]
    assert model_info(QWEN3)["quantization"] == "Q8_0"


def test_harmony_template_means_reasoning():
    caps = capabilities(GPT_OSS, kind="inference")
    assert "reasoning" in caps and "tool-calling" not in caps
    assert model_info(GPT_OSS)["quantization"] == "MXFP4_MOE"


@pytest.mark.parametrize("md", [NOMIC_BERT, BERT])
def test_encoders_only_embed(md):
    assert capabilities(md, kind="embedding") == ["embeddings"]
    assert capabilities(md, kind="inference") == []  # an encoder cannot generate, whatever the env says
    assert model_info(md)["pooling"] == "mean" and model_info(md)["quantization"] == "F16"


def test_grammar_capability_only_when_grammars_are_applied():
    assert "grammar-constrained" not in capabilities(GEMMA3_BASE, kind="inference")
    assert "grammar-constrained" in capabilities(GEMMA3_BASE, kind="inference", grammars=True)


def test_embedding_worker_of_a_causal_model_does_not_claim_generation():
    assert capabilities(GEMMA3_BASE, kind="embedding") == ["embeddings"]


@pytest.mark.parametrize("n,text", [(268_098_176, "268M"), (4_022_468_096, "4.0B"), (20_914_757_184, "20.9B"),
                                    (2**31 + 5, "2.1B"), (22_700, "23K")])
def test_parameter_counts_read_like_people_write_them(n, text):
    assert human_count(n) == text


@pytest.mark.model
async def test_the_real_gemma3_file(model_path):
    from workers.engine import Engine

    engine = Engine(model_path, embedding=False, concurrency=1, ctx_size=512, threads=1)
    await engine.load()
    try:
        info = model_info(engine.metadata, n_params=engine.n_params, context_size=512)
        caps = capabilities(engine.metadata, kind="inference")
        special = engine.special_tokens()
    finally:
        engine.close()
    assert info["architecture"] == "gemma3" and info["quantization"] == "Q4_K_M" and info["embedding_size"] == 640
    assert 250_000_000 < info["parameters"] < 290_000_000 and info["parameter_count"] in ("268M", "270M")
    assert caps == ["text-generation"]  # the base model ships no chat template
    assert special == {"bos": "<bos>", "eos": "<eos>"}  # what MODEL_FORMAT=chat hands its Jinja template
