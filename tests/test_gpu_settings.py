"""GPU settings (N_GPU_LAYERS, FLASH_ATTN, MAIN_GPU, TENSOR_SPLIT) reach llama.cpp and health.

This machine has no GPU and a CPU build of llama.cpp, which ignores the values: the tests read back what
llama-cpp-python handed llama.cpp, and check that the defaults give the very params a worker used before.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import pytest

from workers.config import ConfigError, load_settings

ENV = "gemma3-270m"


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(ENV)


def test_defaults_are_cpu_only(monkeypatch):
    for key in ("N_GPU_LAYERS", "FLASH_ATTN", "MAIN_GPU", "TENSOR_SPLIT"):
        monkeypatch.delenv(key, raising=False)
    s = load_settings(ENV)
    assert (s.n_gpu_layers, s.flash_attn, s.main_gpu, s.gpu_split) == (0, False, 0, ())


def test_gpu_values_parse(monkeypatch):
    s = settings(monkeypatch, N_GPU_LAYERS="-1", FLASH_ATTN="on", MAIN_GPU="1", TENSOR_SPLIT=" 3, 1 ,0.5")
    assert (s.n_gpu_layers, s.flash_attn, s.main_gpu, s.gpu_split) == (-1, True, 1, (3.0, 1.0, 0.5))
    assert settings(monkeypatch, FLASH_ATTN="off").flash_attn is False
    assert settings(monkeypatch, FLASH_ATTN="1").flash_attn is True


@pytest.mark.parametrize("key,value", [
    ("TENSOR_SPLIT", "a,b"), ("TENSOR_SPLIT", "1,,2"), ("TENSOR_SPLIT", "0,0"), ("TENSOR_SPLIT", "-1,2"),
    ("TENSOR_SPLIT", "inf"), ("TENSOR_SPLIT", "nan"), ("N_GPU_LAYERS", "-2"), ("N_GPU_LAYERS", "all"),
    ("FLASH_ATTN", "auto"), ("FLASH_ATTN", "maybe"), ("MAIN_GPU", "-1"), ("MAIN_GPU", "gpu0"),
])
def test_a_bad_value_is_one_line_naming_the_key(monkeypatch, key, value):
    with pytest.raises(ConfigError) as e:
        settings(monkeypatch, **{key: value})
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"config: {key}=")


def _fields(struct: ctypes.Structure) -> dict[str, Any]:
    """Every field of a llama.cpp params struct; a pointer as whether it is set (each Llama makes its own
    progress callback and arrays, so their addresses differ)."""
    out = {}
    for name, _ in struct._fields_:  # type: ignore[attr-defined]
        value = getattr(struct, name)
        out[name] = value if isinstance(value, (int, float, bool, bytes)) or value is None else bool(value)
    return out


@pytest.mark.model
def test_the_cpu_default_gives_llama_cpp_the_same_params_as_before(model_path: Path):
    from llama_cpp import Llama

    from workers.engine import Engine

    # what the engine built before the GPU settings existed
    before = Llama(model_path=str(model_path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    llm = Engine(model_path, embedding=False, concurrency=1, ctx_size=256, threads=1)._new_context()
    try:
        assert _fields(llm.model_params) == _fields(before.model_params)
        assert _fields(llm.context_params) == _fields(before.context_params)
        assert llm.model_params.n_gpu_layers == 0 and llm.model_params.main_gpu == 0
        assert not llm.model_params.tensor_split and llm.tensor_split is None
        assert llm.context_params.flash_attn_type == 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED, as before
    finally:
        llm.close()
        before.close()


@pytest.mark.model
def test_explicit_gpu_values_reach_llama_cpp_params(model_path: Path):
    import llama_cpp

    from workers.engine import Engine

    engine = Engine(model_path, embedding=False, concurrency=1, ctx_size=256, threads=1, n_gpu_layers=-1,
                    flash_attn=True, main_gpu=1, tensor_split=(3.0, 1.0))
    llm = engine._new_context()
    try:
        assert llm.model_params.n_gpu_layers == 0x7FFFFFFF  # -1: llama-cpp-python's "every layer"
        assert llm.model_params.main_gpu == 1
        assert [llm.model_params.tensor_split[i] for i in range(3)] == [3.0, 1.0, 0.0]
        assert llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if not llama_cpp.llama_supports_gpu_offload():  # a CPU build ignores them and still generates
            out = llm.create_completion("The capital of France is", max_tokens=3, temperature=0.0)
            assert out["usage"]["completion_tokens"] > 0  # type: ignore[index]
    finally:
        llm.close()


@pytest.mark.model
async def test_health_model_info_shows_the_gpu_settings(start_worker, nc):
    import llama_cpp

    await start_worker(N_GPU_LAYERS="8", FLASH_ATTN="on", MAIN_GPU="0", TENSOR_SPLIT="1")
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    assert health["model_info"]["offload"] == {
        "gpu_supported": bool(llama_cpp.llama_supports_gpu_offload()), "n_gpu_layers": 8, "flash_attn": True,
        "main_gpu": 0, "tensor_split": [1.0]}
    assert health["model_info"]["architecture"] == "gemma3"  # the rest of model_info is as before


@pytest.mark.model
async def test_health_of_a_default_worker_says_cpu_only(start_worker, nc):
    import llama_cpp

    await start_worker()
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    offload = health["model_info"]["offload"]
    assert (offload["n_gpu_layers"], offload["flash_attn"], offload["main_gpu"], offload["tensor_split"]) == (
        0, False, 0, [])
    assert offload["gpu_supported"] is bool(llama_cpp.llama_supports_gpu_offload())  # False here: a CPU build
