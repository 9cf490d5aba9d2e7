"""What a model is and can do, read from its GGUF metadata (docs/architecture.md, "Model info and
capabilities"), never guessed from its name."""

from __future__ import annotations

from typing import Any, Protocol

from .protocol import KINDS, Kind

# llama.cpp's `enum llama_ftype` (general.file_type): the quantization the file was made with.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}
POOLING_TYPES = {-1: "unspecified", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
ENCODER_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}


def human_count(n: int) -> str:
    """268_098_176 → '268M', 4_022_468_096 → '4.0B' (Python ints: no overflow past 2^31)."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def _int(md: dict[str, Any], key: str) -> int | None:
    try:
        return int(md[key])
    except (KeyError, TypeError, ValueError):
        return None


class Offload(Protocol):
    """The GPU settings a model was loaded with (workers.engine.Engine)."""

    n_gpu_layers: int
    flash_attn: bool
    main_gpu: int
    tensor_split: tuple[float, ...]


def offload_info(offload: Offload) -> dict[str, Any]:
    """The `offload` entry of model_info: the GPU settings llama.cpp got, and whether this build of it can
    offload at all (a CPU build ignores them)."""
    import llama_cpp

    return {
        "gpu_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "n_gpu_layers": offload.n_gpu_layers,
        "flash_attn": offload.flash_attn,
        "main_gpu": offload.main_gpu,
        "tensor_split": list(offload.tensor_split),
    }


def model_info(md: dict[str, Any], *, n_params: int | None = None, context_size: int | None = None,
               offload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `model_info` block of health: architecture, size, context, quantization, family, modalities, and
    (`offload`) the GPU settings."""
    arch = str(md.get("general.architecture", "unknown"))
    ftype = _int(md, "general.file_type")
    params = human_count(n_params) if n_params else md.get("general.size_label")
    return {
        "architecture": arch,
        "parameter_count": params,
        "parameters": n_params,
        "context_size": context_size,
        "trained_context_size": _int(md, f"{arch}.context_length"),
        "embedding_size": _int(md, f"{arch}.embedding_length"),
        "quantization": FILE_TYPES.get(ftype, f"type {ftype}") if ftype is not None else None,
        "model_family": str(md.get("general.basename") or arch),
        "pooling": POOLING_TYPES.get(_int(md, f"{arch}.pooling_type") or -1, "unspecified"),
        "modalities": ["text"],
        **({"offload": offload} if offload is not None else {}),
    }


def capabilities(md: dict[str, Any], *, kind: Kind, grammars: bool = False) -> list[str]:
    """What this worker really serves: its kind's capability (an encoder cannot generate, whatever the env
    says), then what the chat template and grammars add to text generation."""
    spec = KINDS[kind]
    arch = str(md.get("general.architecture", ""))
    template = str(md.get("tokenizer.chat_template") or "")
    if spec.generates and arch in ENCODER_ARCHS:
        return []
    caps = [spec.capability]
    if spec.generates:
        if template:
            caps.append("chat")
        if "tools" in template or "tool_call" in template:
            caps.append("tool-calling")
        if "<think>" in template or "reasoning_content" in template or "<|channel|>" in template:
            caps.append("reasoning")
        if grammars:
            caps.append("grammar-constrained")
    return caps
