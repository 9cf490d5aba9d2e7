"""The chat default, smollm2-135m, as shipped: MODEL_FORMAT=chat renders the GGUF's own chat template, and an
answer ends at the model's end-of-turn token.

One nats-server and one smollm2-135m worker (its env file as `make up` runs it) for the module. The expected
prompt is the GGUF file's own template (read from its bytes) rendered with `jinja2`, not through llama-cpp-python."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers import formats
from workers.config import ROOT, Settings
from workers.protocol import BadRequest, ChatMessage

from .conftest import SMOLLM2_ENV, WorkerProc, serve_nats, wait_online

MODEL = "smollm2-135m"
SUBJECT = f"inference.request.{MODEL}"
END_OF_TURN = "<|im_end|>"


@dataclass
class Chat:
    url: str
    worker: WorkerProc

    async def ask(self, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        nc = await nats.connect(self.url)
        try:
            msg = await nc.request(SUBJECT, json.dumps(body).encode(), timeout=timeout)
        finally:
            await nc.close()
        reply: dict[str, Any] = json.loads(msg.data)
        return reply

    def row(self, req_id: str, timeout: float = 10) -> sqlite3.Row:
        """The worker's request row for `req_id` (the store writes it just after the reply)."""
        ends = time.monotonic() + timeout
        while True:
            if self.worker.db.exists():
                with sqlite3.connect(self.worker.db) as db:
                    db.row_factory = sqlite3.Row
                    row = db.execute("SELECT * FROM requests WHERE req_id = ?", (req_id,)).fetchone()
                if row is not None:
                    return row
            assert time.monotonic() < ends, f"no request row for {req_id}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Chat]:
    tmp = tmp_path_factory.mktemp("smollm2")
    servers = serve_nats(tmp)
    server = next(servers)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_", "DEFAULT_"))}
    env.update(NATS_URL=server.url, DATA_DIR=str(tmp / "data"), HTTP_ADDR="", NATS_CONNECT_TIMEOUT="10")
    log = tmp / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(SMOLLM2_ENV)], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    worker = WorkerProc(proc, MODEL, env, log, tmp / "data")
    try:
        asyncio.run(wait_online(server.url, worker))
        yield Chat(server.url, worker)
    finally:
        worker.kill()
        next(servers, None)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value section of a GGUF file (v2/v3), read straight from its bytes: an oracle that shares no code
    with llama.cpp. (gguf.GGUFReader would do, but it builds every tensor and token entry and takes seconds.)"""
    with path.open("rb") as f:
        def take(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(take("<Q")).decode()

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, n = take("<I"), take("<Q")
                return [value(item) for _ in range(n)]
            return take(_SCALARS[kind])

        assert f.read(4) == b"GGUF" and take("<I") >= 2
        _, n_kv = take("<Q"), take("<Q")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            out[key] = value(take("<I"))
        return out


@functools.cache
def gguf_chat_template(path: Path) -> tuple[str, str, str]:
    """(chat template, BOS text, EOS text) as the GGUF file stores them."""
    meta = gguf_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    return (meta["tokenizer.chat_template"], tokens[meta["tokenizer.ggml.bos_token_id"]],
            tokens[meta["tokenizer.ggml.eos_token_id"]])


def rendered(path: Path, messages: list[dict[str, str]]) -> str:
    """The prompt as Hugging Face's apply_chat_template renders it (its Jinja environment settings)."""
    template, bos, eos = gguf_chat_template(path)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=True)


@pytest.mark.model
def test_the_gguf_names_im_end_as_its_end_of_turn_token(smollm2_path: Path) -> None:
    template, _, eos = gguf_chat_template(smollm2_path)
    assert eos == END_OF_TURN and END_OF_TURN in template


@pytest.mark.model
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Largest planet?"},
     {"role": "assistant", "content": "Jupiter"}, {"role": "user", "content": "And the smallest?"}],
], ids=["one-question", "system-and-history"])
async def test_formatted_input_is_the_gguf_template_rendered_by_jinja2(chat: Chat, smollm2_path: Path,
                                                                      messages: list[dict[str, str]]) -> None:
    req_id = f"tmpl-{len(messages)}"
    reply = await chat.ask({"req_id": req_id, "messages": messages, "params": {"max_tokens": 1}})
    assert "error" not in reply, reply
    expected = rendered(smollm2_path, messages)
    assert chat.row(req_id)["formatted_input"] == expected
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.model
async def test_answer_stops_at_the_end_of_turn_token(chat: Chat) -> None:
    reply = await chat.ask({"req_id": "eot-1", "input": "What is the capital of France?",
                            "params": {"max_tokens": 200, "temperature": 0.2, "repeat_penalty": 1.1, "seed": 1}})
    assert reply["finish_reason"] == "stop", reply
    assert reply["tokens_out"] < 200
    assert END_OF_TURN not in reply["text"] and "<|im_start|>" not in reply["text"]
    assert chat.row("eot-1")["finish_reason"] == "stop"


@pytest.mark.model
async def test_a_request_without_sampling_parameters_gets_the_env_file_defaults_and_ends(chat: Chat) -> None:
    reply = await chat.ask({"req_id": "defaults-1", "input": "Name three fruits.", "params": {"seed": 7}})
    assert reply["finish_reason"] == "stop" and END_OF_TURN not in reply["text"], reply
    used = json.loads(chat.row("defaults-1")["params_json"])
    assert (used["temperature"], used["top_p"], used["repeat_penalty"]) == (0.2, 0.9, 1.1)


@pytest.mark.model
async def test_streamed_answer_stops_at_the_end_of_turn_token(chat: Chat) -> None:
    nc = await nats.connect(chat.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = {"req_id": "eot-stream", "input": "Say hello.", "stream": True,
                "params": {"max_tokens": 100, "temperature": 0.2, "repeat_penalty": 1.1, "seed": 2}}
        await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
        deltas: list[str] = []
        while True:
            msg = json.loads((await sub.next_msg(timeout=60)).data)
            if msg.get("done"):
                break
            deltas.append(msg["delta"])
    finally:
        await nc.close()
    assert msg["finish_reason"] == "stop", msg
    assert "".join(deltas) == msg["text"] and END_OF_TURN not in msg["text"]


# --- the format on its own (no model) ---------------------------------------------------------------------------

GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize(("add_bos", "starts_with_bos"), [("true", False), ("false", True)])
def test_a_bos_the_tokenizer_adds_itself_is_not_written_twice(add_bos: str, starts_with_bos: bool) -> None:
    meta = {"tokenizer.chat_template": GEMMA_LIKE, "tokenizer.ggml.add_bos_token": add_bos}
    fmt = formats.build("chat", Settings(model_name="chat-unit"), formats.ModelText(meta, bos="<bos>", eos="<eos>"))
    prompt = fmt.render([ChatMessage(role="user", content="Hi")])
    assert prompt.startswith("<bos>") is starts_with_bos
    assert prompt.removeprefix("<bos>") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert fmt.stop == ("<eos>",)


def test_a_template_that_refuses_the_roles_is_a_bad_request() -> None:
    meta = {"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"}
    fmt = formats.build("chat", Settings(model_name="chat-unit"), formats.ModelText(meta, bos="", eos="</s>"))
    with pytest.raises(BadRequest, match="roles must alternate"):
        fmt.render([ChatMessage(role="user", content="Hi")])
