"""Bad input and a full queue get a quick error reply with a code; the worker keeps serving."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from workers import protocol as p

from .conftest import ask

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

SUBJECT = "inference.request.gemma3-270m"

BAD = [
    (b"{not json", 400, "invalid_json"),
    (b'["a list"]', 400, "invalid_request"),
    (b'{"input": 42}', 400, "invalid_request"),
    (b'{"input": "hi", "params": {"temperature": "hot"}}', 400, "invalid_request"),
    (b'{"input": "   "}', 400, "empty_input"),
    (b'{"input": "hi", "params": {"max_tokens": -5}}', 400, "invalid_request"),
    (json.dumps({"input": "x" * 2_000_000}).encode(), 413, "payload_too_large"),
]


@pytest.mark.parametrize("payload,code,type_", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
async def test_bad_request_gets_an_error_reply_within_a_second(start_worker, nc, payload, code, type_):
    w = await start_worker()
    t0 = time.monotonic()
    msg = await nc.request(SUBJECT, payload, timeout=5)
    assert time.monotonic() - t0 < 1.0
    body = json.loads(msg.data)
    assert body["finish_reason"] == "error"
    assert body["error"]["code"] == code and body["error"]["type"] == type_, body
    assert body["error"]["message"]
    assert msg.headers[p.H_ERROR_CODE] == str(code)
    # the worker is still serving
    ok = await ask(nc, SUBJECT, {"input": "Hi", "params": {"max_tokens": 4}})
    assert ok["tokens_out"] >= 1
    assert w.proc.poll() is None


async def test_rejected_requests_are_logged_once_and_never_queued(start_worker, nc, nats_server):
    w = await start_worker()
    for i in range(3):
        await nc.request(SUBJECT, json.dumps({"req_id": f"bad-{i}", "input": ""}).encode(), timeout=5)
    js = nc.jetstream()
    info = await js.stream_info(p.STREAM_NAME)
    assert info.state.messages == 0
    await asyncio.sleep(1.0)  # the log writer batches
    with sqlite3.connect(w.db) as db:
        rows = db.execute("SELECT req_id, status FROM requests WHERE req_id LIKE 'bad-%' ORDER BY req_id").fetchall()
    assert rows == [("bad-0", "rejected"), ("bad-1", "rejected"), ("bad-2", "rejected")]


async def test_full_queue_answers_503_at_once(start_worker, nc):
    await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_PER_MODEL=2)
    long = {"input": "Write a long story about a dragon.", "params": {"max_tokens": 200, "temperature": 0}}
    held = asyncio.create_task(nc.request(SUBJECT, json.dumps(long).encode(), timeout=120))
    queued = asyncio.create_task(nc.request(SUBJECT, json.dumps(long).encode(), timeout=120))
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    over = json.loads((await nc.request(SUBJECT, json.dumps(long).encode(), timeout=5)).data)
    assert time.monotonic() - t0 < 1.0
    assert over["error"]["code"] == 503 and over["error"]["type"] == "queue_full"
    for task in (held, queued):
        assert json.loads((await task).data)["tokens_out"] > 0
