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
HEALTH = "models.gemma3-270m.health"

BAD = [
    (b"{not json", 400, "invalid_json"),
    (b'["a list"]', 400, "invalid_request"),
    (b'{"input": 42}', 400, "invalid_request"),
    (b'{"input": "hi", "params": {"temperature": "hot"}}', 400, "invalid_request"),
    (b'{"input": "   "}', 400, "empty_input"),
    (b'{"input": "hi", "params": {"max_tokens": -5}}', 400, "invalid_request"),
    (json.dumps({"input": "x" * 2_000_000}).encode(), 413, "payload_too_large"),
]


async def hold_the_only_slot(nc, req_id: str) -> asyncio.Task:
    """A long generation in the worker's one slot, running (health says so) when this returns."""
    long = {"req_id": req_id, "input": "Write a long story about a dragon.", "params": {"max_tokens": 400}}
    task = asyncio.create_task(nc.request(SUBJECT, json.dumps(long).encode(), timeout=300))
    deadline = time.monotonic() + 60
    while (await ask(nc, HEALTH, b"", timeout=30))["queue_metrics"]["active_processing"] < 1:
        assert time.monotonic() < deadline and not task.done(), "the long request never started"
        await asyncio.sleep(0.1)
    return task


async def cancel(nc, req_id: str, task: asyncio.Task) -> dict:
    await nc.publish(p.cancel_subject("inference", "gemma3-270m"), p.dumps(p.CancelRequest(req_id=req_id)))
    return json.loads((await task).data)


@pytest.mark.parametrize("payload,code,type_", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
async def test_bad_request_gets_an_error_reply_while_the_only_slot_is_busy(start_worker, nc, payload, code, type_):
    """The error reply does not wait for a slot: it comes while the only one is still generating (an ordering, not
    a speed bound; how fast is `make bench`'s business)."""
    w = await start_worker(WORKER_CONCURRENCY=1)
    busy = await hold_the_only_slot(nc, "busy")
    msg = await nc.request(SUBJECT, payload, timeout=30)
    assert not busy.done(), "the error reply waited for the running generation"
    body = json.loads(msg.data)
    assert body["finish_reason"] == "error"
    assert body["error"]["code"] == code and body["error"]["type"] == type_, body
    assert body["error"]["message"]
    assert msg.headers[p.H_ERROR_CODE] == str(code)
    assert (await cancel(nc, "busy", busy))["finish_reason"] == "cancelled"
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
    # last_seq: not even queued and acked at once (that leaves messages == 0 too)
    assert (info.state.messages, info.state.last_seq) == (0, 0), info.state
    await asyncio.sleep(1.0)  # the log writer batches
    with sqlite3.connect(w.db) as db:
        rows = db.execute("SELECT req_id, status FROM requests WHERE req_id LIKE 'bad-%' ORDER BY req_id").fetchall()
    assert rows == [("bad-0", "rejected"), ("bad-1", "rejected"), ("bad-2", "rejected")]


async def test_full_queue_answers_503_at_once(start_worker, nc):
    """`At once`: while the queue it reports full is still full (the running request not done, the waiting one not
    started), and both are served afterwards."""
    await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_PER_MODEL=2)
    held = await hold_the_only_slot(nc, "held")
    short = {"req_id": "queued", "input": "Say hi.", "params": {"max_tokens": 8, "temperature": 0}}
    queued = asyncio.create_task(nc.request(SUBJECT, json.dumps(short).encode(), timeout=300))
    deadline = time.monotonic() + 30
    while (await ask(nc, HEALTH, b"", timeout=30))["queue_metrics"]["pending_messages"] < 2:
        assert time.monotonic() < deadline, "the second request never showed in the queue"
        await asyncio.sleep(0.1)
    over = json.loads((await nc.request(SUBJECT, json.dumps(short | {"req_id": "over"}).encode(), timeout=30)).data)
    assert over["error"]["code"] == 503 and over["error"]["type"] == "queue_full"
    assert not held.done() and not queued.done(), "the 503 came only after the queue had moved"
    stopped = await cancel(nc, "held", held)
    assert stopped["finish_reason"] == "cancelled" and stopped["tokens_out"] > 0
    assert json.loads((await queued).data)["tokens_out"] > 0
