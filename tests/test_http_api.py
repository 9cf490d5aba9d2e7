"""The worker's HTTP API: OpenAI compatibility, grammars, saturation, logs."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import openai
import pytest
import pytest_asyncio

from workers import discovery
from workers.ops import broker

from .conftest import EMBED_ENV

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model


@pytest_asyncio.fixture
async def http_worker(start_worker):
    port = broker.free_port()
    w = await start_worker(HTTP_ADDR=f"127.0.0.1:{port}")
    w.base = f"http://127.0.0.1:{port}"
    return w


async def test_openai_client_chat_streamed_chat_and_models(http_worker):
    client = openai.AsyncOpenAI(base_url=f"{http_worker.base}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = await client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=24,
                                                temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    stream = await client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=24,
                                                  temperature=0, stream=True)
    deltas, finish = [], None
    async for event in stream:
        deltas.append(event.choices[0].delta.content or "")
        finish = event.choices[0].finish_reason or finish
    assert "".join(deltas) == text and finish == chat.choices[0].finish_reason
    assert len([d for d in deltas if d]) > 1, "the answer should arrive in pieces"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["gemma3-270m"]
    await client.close()


async def test_openai_client_embeddings(start_worker):
    port = broker.free_port()
    await start_worker(EMBED_ENV, HTTP_ADDR=f"127.0.0.1:{port}")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    out = await client.embeddings.create(model="gemma3-270m-embed", input=["hello", "world"])
    assert [len(d.embedding) for d in out.data] == [640, 640] and out.usage.prompt_tokens > 0
    plain = await client.embeddings.create(model="gemma3-270m-embed", input="hello", encoding_format="float")
    # base64 and float agree (a batch of two may differ from a single text in the last float bits)
    assert max(abs(a - b) for a, b in zip(plain.data[0].embedding, out.data[0].embedding, strict=True)) < 1e-3
    await client.close()


async def test_completions_in_both_shapes_and_the_json_grammar(http_worker):
    async with httpx.AsyncClient(base_url=http_worker.base, timeout=120) as http:
        seed = await http.post("/v1/completions", json={"input": "Hi", "params": {"max_tokens": 4}})
        assert seed.status_code == 200 and seed.json()["tokens_out"] >= 1 and "worker_id" in seed.json()
        oai = await http.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0})
        body = oai.json()
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
        # the 270M base model rambles inside strings when merely asked; a few-shot prompt keeps it short
        prompt = 'Person records as JSON, one per line:\n{"name": "Alice", "age": 30}\n{"name": "Bob", "age": 25}\n'
        grammar = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 200, "temperature": 0,
                                                           "grammar": "json"})
        assert grammar.status_code == 200, grammar.text
        choice = grammar.json()["choices"][0]
        assert isinstance(json.loads(choice["text"]), dict) and choice["finish_reason"] == "stop"
        yes_no = await http.post("/v1/completions", json={"prompt": "Is water wet? Answer:", "max_tokens": 4,
                                                          "grammar": "yes_no", "temperature": 0})
        assert yes_no.json()["choices"][0]["text"] in ("yes", "no")


async def test_grammar_crud_and_invalid_grammars(http_worker):
    async with httpx.AsyncClient(base_url=http_worker.base, timeout=60) as http:
        names = {g["name"] for g in (await http.get("/grammars")).json()["grammars"]}
        assert {"json", "yes_no"} <= names
        bad = await http.post("/grammars", json={"name": "broken", "gbnf": "root ::= undefined_rule"})
        assert bad.status_code == 400 and "undefined_rule" in bad.json()["error"]["message"]
        ok = await http.post("/grammars", json={"name": "abc", "gbnf": 'root ::= "a" "b" "c"'})
        assert ok.status_code == 201
        assert (await http.get("/grammars/abc")).json()["gbnf"] == 'root ::= "a" "b" "c"'
        used = await http.post("/v1/completions", json={"prompt": "Letters:", "max_tokens": 8, "grammar": "abc"})
        assert used.json()["choices"][0]["text"] == "abc"
        inline_bad = await http.post("/v1/completions", json={"prompt": "x", "grammar": 'root ::= "a'})
        assert inline_bad.status_code == 400 and inline_bad.json()["error"]["type"] == "invalid_grammar"
        assert (await http.put("/grammars/abc", content='root ::= "x"')).status_code == 200
        assert (await http.get("/grammars/abc")).json() == {"name": "abc", "gbnf": 'root ::= "x"'}
        assert {g["name"]: g["source"] for g in (await http.get("/grammars")).json()["grammars"]}["abc"] == "stored"
        assert (await http.delete("/grammars/abc")).status_code == 204
        assert (await http.get("/grammars/abc")).status_code == 404
        assert (await http.delete("/grammars/json")).status_code == 403


async def refusal_within(http: httpx.AsyncClient, body: dict, seconds: float) -> tuple[int | str, str, bool]:
    """A 429 comes at once: (status, error type, says "(limit 2)"), or what happened instead within `seconds`."""
    try:
        r = await http.post("/v1/completions", json=body, timeout=seconds)
    except httpx.TimeoutException:
        return f"no answer within {seconds} s: admitted, not refused", "", False
    error = r.json().get("error", {}) if r.status_code != 200 else {}
    return r.status_code, error.get("type", ""), "(limit 2)" in error.get("message", "")


async def test_saturation_gets_429_never_a_hang(start_worker, nc):
    """Gate capacity = WORKER_CONCURRENCY + HTTP_QUEUE_LIMIT = 2: of 6 requests, exactly 2 answered and 4 refused.
    The 4 are sent once the worker's health counts the first 2 in progress, so the count is not a race."""
    port = broker.free_port()
    w = await start_worker(HTTP_ADDR=f"127.0.0.1:{port}", WORKER_CONCURRENCY=1, HTTP_QUEUE_LIMIT=1)
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 128, "temperature": 0}  # counts on, to max_tokens
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        held = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
        for _ in range(300):
            if [h["queue_metrics"]["active_processing"] for h in await discovery.health(nc, "gemma3-270m")] == [2]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the worker's health never counted the first 2 requests in progress")
        refused = await asyncio.gather(*(refusal_within(http, body, 30) for _ in range(4)))
        early = [h.done() for h in held]  # one of the first 2 done before the 4 came: a free slot, no proof
        answered = await asyncio.gather(*held)
    assert refused == [(429, "rate_limited", True)] * 4, (early, refused)
    assert [r.status_code for r in answered] == [200, 200] and early == [False, False], [r.text for r in answered]
    assert [r.json()["choices"][0]["finish_reason"] for r in answered] == ["length", "length"]
    assert w.proc.poll() is None


async def test_bad_http_input_is_a_400_in_openai_shape(http_worker):
    async with httpx.AsyncClient(base_url=http_worker.base, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
        r = await http.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4})
        assert r.status_code == 400
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert r.status_code == 400
        assert (await http.post("/v1/embeddings", json={"input": "x"})).status_code == 404
        assert (await http.get("/readyz")).status_code == 200 and (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "LOG_PROMPTS_HTTP=1"])
async def test_logs_hide_prompts_unless_allowed(start_worker, allowed):
    port = broker.free_port()
    await start_worker(HTTP_ADDR=f"127.0.0.1:{port}", **({"LOG_PROMPTS_HTTP": "1"} if allowed else {}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        answer = (await http.post("/v1/completions", json={"prompt": "secret words", "max_tokens": 2})).json()
        for _ in range(50):  # the log's writer task is behind the answer
            logs = (await http.get("/logs?limit=5")).json()
            if logs["requests"]:
                break
            await asyncio.sleep(0.1)
    rows = logs["requests"]
    assert len(rows) == 1 and rows[0]["source"] == "http" and logs["prompts_included"] is allowed, logs
    if allowed:
        assert "secret words" in rows[0]["raw_input"] and rows[0]["response_text"] == answer["choices"][0]["text"]
    else:
        assert not {"raw_input", "formatted_input", "response_text"} & rows[0].keys()
        assert "secret" not in json.dumps(rows)


async def test_with_api_key_the_openai_client_needs_it_and_the_probes_do_not(start_worker):
    port, key = broker.free_port(), "model-test-key"
    await start_worker(HTTP_ADDR=f"127.0.0.1:{port}", API_KEY=key)
    base = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key)
    chat = await client.chat.completions.create(model="gemma3-270m", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    await client.close()
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await http.get("/healthz")).status_code == 200 and (await http.get("/readyz")).status_code == 200


async def test_on_all_interfaces_without_a_key_the_worker_serves_but_closes_mutating_routes(start_worker):
    port = broker.free_port()
    w = await start_worker(HTTP_ADDR=f"0.0.0.0:{port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        assert (await http.get("/grammars")).status_code == 200
        for r in [await http.put("/grammars/abc", content='root ::= "x"'), await http.get("/logs"),
                  await http.delete("/v1/requests/someone-elses")]:
            assert r.status_code == 403 and "API_KEY" in r.json()["error"]["message"], r.text
    w.terminate()
    said = [line for line in w.output().splitlines() if "grammar changes, cancels and /logs are off" in line]
    assert len(said) == 1 and f"0.0.0.0:{port}" in said[0], w.output()
    con = sqlite3.connect(w.db)
    try:
        assert [c for (c,) in con.execute("SELECT code FROM events WHERE code = 'http.closed'")] == ["http.closed"]
    finally:
        con.close()
