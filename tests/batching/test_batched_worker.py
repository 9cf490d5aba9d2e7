"""A worker with ENGINE=batched over real NATS: one llama.cpp context decodes the model's requests together, and
the request path (queue, streaming, cancel, deadline, the log) is the same as with one context per request."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest

from tests.conftest import ask, send_many
from workers.ops import broker

pytestmark = pytest.mark.model
GEMMA = "inference.request.gemma3-270m"
# Prompts whose greedy continuation has no near-ties (tests/batching/test_scheduler.py says why that matters).
PROMPTS = ["Count: 1, 2, 3, 4, 5,", "The alphabet: a, b, c, d, e,", "Days: Monday, Tuesday, Wednesday,",
           "Count: 10, 20, 30, 40,"]


def body(prompt: str, **params: object) -> dict[str, object]:
    return {"input": prompt, "raw": True, "params": {"max_tokens": 24, "temperature": 0, **params}}


async def test_concurrent_requests_share_one_context_and_match_answers_given_alone(start_worker, nc):
    w = await start_worker(ENGINE="batched", WORKER_CONCURRENCY=4)
    alone = [await ask(nc, GEMMA, body(p)) for p in PROMPTS]
    together = await asyncio.gather(*(ask(nc, GEMMA, body(p)) for p in PROMPTS))
    assert [a["text"] for a in together] == [a["text"] for a in alone]
    assert all(a["tokens_out"] == 24 and a["finish_reason"] == "length" for a in together)
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    assert health["status"] == "online"
    w.terminate()
    assert "1 context batching 4 sequences" in w.output()
    rows = sqlite3.connect(w.db).execute("SELECT count(*) FROM requests WHERE status = 'ok'").fetchone()
    assert rows[0] == 8


async def test_streaming_cancel_and_deadline_work_per_sequence(start_worker, nc):
    await start_worker(ENGINE="batched", WORKER_CONCURRENCY=4)
    inbox = nc.new_inbox()
    chunks = await nc.subscribe(inbox)
    streamed = {**body(PROMPTS[0], max_tokens=200), "req_id": "b-stream", "stream": True}
    await nc.publish(GEMMA, json.dumps(streamed).encode(), reply=inbox)
    others = [asyncio.create_task(ask(nc, GEMMA, {**body(p, max_tokens=48), "req_id": f"b-{i}"}))
              for i, p in enumerate(PROMPTS[1:])]
    first = json.loads((await chunks.next_msg(timeout=60)).data)
    assert first["req_id"] == "b-stream" and "delta" in first
    ack = json.loads((await nc.request("inference.cancel.gemma3-270m", b'{"req_id": "b-stream"}', timeout=5)).data)
    assert ack["cancelled"] is True
    while "delta" in (last := json.loads((await chunks.next_msg(timeout=60)).data)):
        pass
    assert last["finish_reason"] == "cancelled" and last["tokens_out"] < 200
    done = await asyncio.gather(*others)
    assert all(d["tokens_out"] == 48 for d in done)  # the cancel ended only its own sequence
    late = await ask(nc, GEMMA, {**body(PROMPTS[0], max_tokens=2000), "timeout_ms": 1500}, timeout=30)
    assert late["error"]["code"] == 504 and late["error"]["type"] == "expired"


SYSTEM = "Reference list. " + " ".join(f"Entry {i}: the number {i} squared is {i * i}." for i in range(1, 25)) + "\n"


async def test_a_shared_system_prompt_is_reused_and_the_slots_are_reported(start_worker, nc):
    """Two requests with the same ~230-token system prompt: the second reports the prefix as cached tokens (the
    reply, OpenAI's usage and the SQLite row) and answers as without reuse; health and the backpressure report
    show the slots and the KV cache while a request runs."""
    w = await start_worker(ENGINE="batched", WORKER_CONCURRENCY=2, KV_CACHE_TOKENS=1536,
                           HTTP_ADDR=f"127.0.0.1:{broker.free_port()}")
    reports = await nc.subscribe("monitoring.inference.gemma3-270m")
    first = await ask(nc, GEMMA, {**body(SYSTEM + PROMPTS[0]), "req_id": "p-1"})
    second = await ask(nc, GEMMA, {**body(SYSTEM + PROMPTS[1]), "req_id": "p-2"})
    assert first["cached_tokens"] == 0 and second["cached_tokens"] >= 200
    endpoint = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)["endpoint"]
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as http:
        r = await http.post("/v1/completions", json={"prompt": SYSTEM + PROMPTS[1], "max_tokens": 24,
                                                     "temperature": 0})
    assert r.json()["choices"][0]["text"] == second["text"]
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 200
    long = asyncio.create_task(ask(nc, GEMMA, body(PROMPTS[2], max_tokens=200), timeout=180))
    while True:
        health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
        slots = health["queue_metrics"]["slots"]
        if slots["busy"]:
            break
        await asyncio.sleep(0.05)
    assert slots["slots"] == 2 and slots["kv_tokens"] == 1536 and slots["kv_reserved"] > 200
    while (report := json.loads((await reports.next_msg(timeout=15)).data))["slots"]["busy"] == 0:
        pass
    assert report["slots"]["kv_tokens"] == 1536
    await long
    w.terminate()
    rows = dict(sqlite3.connect(w.db).execute("SELECT req_id, cached_tokens FROM requests WHERE req_id LIKE 'p-%'"))
    assert rows["p-1"] == 0 and rows["p-2"] == second["cached_tokens"]


async def test_sigkill_during_a_batched_step_loses_nothing_and_answers_once(start_worker, nc):
    """Six requests decoding together and four queued when the worker is killed: after a restart all ten are
    answered, each exactly once, by the new worker."""
    a = await start_worker(ENGINE="batched", WORKER_CONCURRENCY=6, QUEUE_ACK_WAIT_S=3)
    subs = await send_many(nc, 10, 96, "bkill")
    while True:  # until all six sequences are running in the one context
        health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
        if (health["queue_metrics"]["slots"] or {}).get("busy") == 6:
            break
        await asyncio.sleep(0.05)
    a.kill()
    b = await start_worker(ENGINE="batched", WORKER_CONCURRENCY=6, QUEUE_ACK_WAIT_S=3)
    replies = [json.loads((await s.next_msg(timeout=180)).data) for s in subs]
    await asyncio.sleep(1.0)
    assert all(s.pending_msgs == 0 for s in subs), "a caller got more than one answer"
    assert sorted(r["req_id"] for r in replies) == sorted(f"bkill-{i}" for i in range(10))
    assert all("error" not in r and r["finish_reason"] in ("stop", "length") for r in replies)
    assert {r["worker_id"] for r in replies} == {replies[0]["worker_id"]}  # the new worker answered them all
    assert replies[0]["worker_id"].endswith(f"-{b.proc.pid}")
