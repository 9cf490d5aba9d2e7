"""Token streaming and cancel over NATS."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import nats
import pytest

from workers.ops import broker

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

SUBJECT = "inference.request.gemma3-270m"
CANCEL = "inference.cancel.gemma3-270m"


async def test_stream_chunks_arrive_first_and_join_to_the_final_text(start_worker, nc):
    await start_worker()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"req_id": "s1", "input": "Tell me about the moon.", "stream": True,
            "params": {"max_tokens": 40, "temperature": 0}}
    await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
    chunks = []
    while True:
        msg = json.loads((await sub.next_msg(timeout=60)).data)
        if msg.get("done"):
            final = msg
            break
        chunks.append(msg)
    assert len(chunks) > 3 and [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["req_id"] == "s1" for c in chunks)
    assert "".join(c["delta"] for c in chunks) == final["text"] and final["tokens_out"] == 40
    again = {**body, "req_id": "s2", "stream": False}  # a new req_id: the same one again would be one job (409)
    plain = json.loads((await nc.request(SUBJECT, json.dumps(again).encode(), timeout=60)).data)
    assert plain["text"] == final["text"] and "done" not in plain  # a plain request still gets one message


async def test_cancel_stops_a_long_generation(start_worker, nc):
    w = await start_worker()
    body = {"req_id": "c1", "input": "Write a very long story.", "params": {"max_tokens": 256, "temperature": 0}}
    answer = asyncio.create_task(nc.request(SUBJECT, json.dumps(body).encode(), timeout=120))
    await asyncio.sleep(1.5)
    ack = json.loads((await nc.request(CANCEL, b'{"req_id":"c1"}', timeout=5)).data)
    assert ack["cancelled"] is True
    out = json.loads((await answer).data)
    assert out["finish_reason"] == "cancelled" and 0 < out["tokens_out"] < 256
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        assert db.execute("SELECT status, finish_reason FROM requests WHERE req_id='c1'").fetchone() == (
            "cancelled", "cancelled")
    js = nc.jetstream()
    assert (await js.stream_info("FLEET_REQUESTS")).state.messages == 0  # acked, not redelivered


async def test_a_queued_request_cancelled_by_its_caller_is_skipped(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1)
    long = {"input": "Write a long poem.", "params": {"max_tokens": 120}}
    busy = asyncio.create_task(nc.request(SUBJECT, json.dumps(long).encode(), timeout=120))
    await asyncio.sleep(0.5)
    queued = asyncio.create_task(nc.request(SUBJECT, b'{"req_id":"q1","input":"Hi"}', timeout=120))
    await asyncio.sleep(0.3)
    await nc.publish(CANCEL, b'{"req_id":"q1"}')
    out = json.loads((await queued).data)
    assert out["finish_reason"] == "cancelled" and out["error"]["type"] == "cancelled" and out["tokens_out"] == 0
    await busy
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        assert db.execute("SELECT status FROM requests WHERE req_id='q1'").fetchone() == ("cancelled",)


async def test_http_delete_cancels_a_nats_request(start_worker, nc):
    import httpx

    port = broker.free_port()
    await start_worker(HTTP_ADDR=f"127.0.0.1:{port}")
    body = {"req_id": "h1", "input": "Write a very long story.", "params": {"max_tokens": 256}}
    answer = asyncio.create_task(nc.request(SUBJECT, json.dumps(body).encode(), timeout=120))
    await asyncio.sleep(1.5)
    async with httpx.AsyncClient() as http:
        r = await http.delete(f"http://127.0.0.1:{port}/v1/requests/h1")
    assert r.status_code == 200 and r.json()["cancelled"] is True
    assert json.loads((await answer).data)["finish_reason"] == "cancelled"


async def test_an_owner_cancel_stops_only_that_owners_request(start_worker, nc):
    await start_worker()
    inbox = "_INBOX.alice.r1"
    sub = await nc.subscribe(inbox)
    body = {"req_id": "own-1", "input": "Write a very long story.", "params": {"max_tokens": 160, "temperature": 0}}
    await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
    await asyncio.sleep(1.5)
    refused = await nc.subscribe(nc.new_inbox())
    await nc.publish("inference.cancel.mallory.gemma3-270m", b'{"req_id":"own-1"}', reply=refused.subject)
    with pytest.raises(nats.errors.TimeoutError):  # not mallory's: no "cancelled" answer, the generation goes on
        await refused.next_msg(timeout=1.0)
    ack = json.loads((await nc.request("inference.cancel.alice.gemma3-270m", b'{"req_id":"own-1"}', timeout=5)).data)
    assert ack["cancelled"] is True
    out = json.loads((await sub.next_msg(timeout=60)).data)
    assert out["finish_reason"] == "cancelled" and 0 < out["tokens_out"] < 160


async def test_cancel_of_a_queued_request_removes_it_and_tells_its_caller_at_once(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1)
    long = {"req_id": "busy-1", "input": "Write a long poem.", "params": {"max_tokens": 200}}
    busy = asyncio.create_task(nc.request(SUBJECT, json.dumps(long).encode(), timeout=120))
    await asyncio.sleep(0.5)
    queued = asyncio.create_task(nc.request(SUBJECT, b'{"req_id":"q2","input":"Hi"}', timeout=120))
    await asyncio.sleep(0.3)
    t0 = asyncio.get_running_loop().time()
    ack = json.loads((await nc.request(CANCEL, b'{"req_id":"q2"}', timeout=5)).data)
    assert ack["cancelled"] is True and ack["state"] == "queued"
    out = json.loads((await asyncio.wait_for(queued, 5)).data)
    waited = asyncio.get_running_loop().time() - t0
    assert out["error"]["type"] == "cancelled" and out["finish_reason"] == "cancelled", out
    assert not busy.done() and waited < 2.0  # answered while the slot was still busy: removed, not skipped later
    assert json.loads((await busy).data)["tokens_out"] > 0
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        assert db.execute("SELECT status, tokens_out FROM requests WHERE req_id='q2'").fetchall() == [
            ("cancelled", 0)]  # one row: it never ran
    assert (await nc.jetstream().stream_info("FLEET_REQUESTS")).state.messages == 0


async def test_cancel_of_an_unknown_request_answers_not_found_at_once(start_worker, nc):
    import httpx

    port = broker.free_port()
    await start_worker(HTTP_ADDR=f"127.0.0.1:{port}")
    t0 = asyncio.get_running_loop().time()
    reply = await nc.request(CANCEL, b'{"req_id":"never-sent"}', timeout=5)
    assert asyncio.get_running_loop().time() - t0 < 1.5
    body = json.loads(reply.data)
    assert body["cancelled"] is False and body["error"]["type"] == "not_found"
    assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "404"
    async with httpx.AsyncClient() as http:
        r = await http.delete(f"http://127.0.0.1:{port}/v1/requests/never-sent")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
