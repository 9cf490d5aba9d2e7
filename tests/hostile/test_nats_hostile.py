"""Hostile requests over NATS against real workers: every one gets a coded error quickly, nothing is published
anywhere but the caller's inbox, and the worker keeps serving (issue 13)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import nats
import pytest

from tests.conftest import EMBED_ENV, ask

from .payloads import EMBEDDING, INFERENCE, Hostile

pytestmark = pytest.mark.model
GEMMA = "inference.request.gemma3-270m"


def _recorder(seen: list[str]):
    async def record(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)
    return record


async def _expect(nc: nats.NATS, subject: str, case: Hostile) -> float:
    t0 = time.monotonic()
    msg = await nc.request(subject, case.body, timeout=10, headers=case.headers or None)
    took = time.monotonic() - t0
    assert msg.data, f"{case.name}: an empty reply, headers {msg.headers}"
    body = json.loads(msg.data)
    assert body.get("error"), f"{case.name}: no error in {body}"
    assert (body["error"]["code"], body["error"]["type"]) == (case.status, case.type), case.name
    assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == str(case.status), case.name
    assert body["error"]["message"].strip(), case.name
    return took


async def test_every_hostile_request_gets_its_coded_error_and_the_worker_serves_on(start_worker, nc, nats_server):
    w = await start_worker()
    spy = await nats.connect(nats_server.url)
    seen: list[str] = []
    await spy.subscribe(">", cb=_recorder(seen))
    await spy.flush()
    took = {case.name: await _expect(nc, GEMMA, case) for case in INFERENCE}
    slow = {name: round(t, 2) for name, t in took.items() if t > 1.0}
    assert not slow, f"over a second: {slow}"
    ok = await ask(nc, GEMMA, {"input": "Say hi.", "params": {"max_tokens": 4, "temperature": 0}})
    assert ok.get("text") is not None and not ok.get("error")
    assert w.proc.poll() is None
    await spy.flush()
    # The worker published nothing on a subject a caller named: no queue, request or $JS.API subject but ours.
    aimed = [s for s in seen if s.startswith(("queue.inference.other", "inference.request.other",
                                              "$JS.API.STREAM.DELETE", "_INBOX.>"))]
    assert aimed == []
    await spy.close()
    w.terminate()
    rows = sqlite3.connect(w.db).execute("SELECT status, error FROM requests WHERE status = 'rejected'").fetchall()
    assert len(rows) == len(INFERENCE)  # each refusal logged once


async def test_a_hostile_reply_subject_is_refused_and_never_published_to(start_worker, nc, nats_server):
    """The reply subject of the request itself (not the body's reply_to) is just as checked."""
    w = await start_worker()
    spy = await nats.connect(nats_server.url)
    seen: list[str] = []
    await spy.subscribe("queue.>", cb=_recorder(seen))
    await spy.subscribe("inference.request.other", cb=_recorder(seen))
    await spy.flush()
    for target in ("queue.inference.other", "inference.request.other"):
        await nc.publish(GEMMA, json.dumps({"input": "hi", "params": {"max_tokens": 2}}).encode(), reply=target)
    await nc.flush()
    ok = await ask(nc, GEMMA, {"input": "Say hi.", "params": {"max_tokens": 2, "temperature": 0}})
    assert not ok.get("error")
    await asyncio.sleep(0.3)
    assert [s for s in seen if s != "queue.inference.gemma3-270m"] == []
    await spy.close()
    w.terminate()
    errors = [r[0] for r in sqlite3.connect(w.db).execute("SELECT error FROM requests WHERE status = 'rejected'")]
    assert len(errors) == 2 and all("not an inbox" in e for e in errors)


async def test_hostile_embedding_requests(start_worker, nc):
    w = await start_worker(EMBED_ENV)
    for case in EMBEDDING:
        assert await _expect(nc, "embedding.request.gemma3-270m-embed", case) < 1.0, case.name
    ok = await ask(nc, "embedding.request.gemma3-270m-embed", {"input": "hello"})
    assert len(ok["data"][0]["embedding"]) > 0
    assert w.proc.poll() is None


async def test_trace_id_survives_the_queue_into_the_reply_and_the_log(start_worker, nc):
    w = await start_worker()
    body = json.dumps({"input": "Say hi.", "params": {"max_tokens": 2, "temperature": 0}}).encode()
    msg = await nc.request(GEMMA, body, timeout=60, headers={"Fleet-Trace-Id": "trace-abc.1"})
    assert msg.headers and msg.headers.get("Fleet-Trace-Id") == "trace-abc.1"
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    msg = await nc.request(GEMMA, body, timeout=60, headers={"traceparent": parent})
    assert msg.headers and msg.headers.get("Fleet-Trace-Id") == "0af7651916cd43dd8448eb211c80319c"
    w.terminate()
    traces = {r[0] for r in sqlite3.connect(w.db).execute("SELECT trace_id FROM requests WHERE status = 'ok'")}
    assert traces == {"trace-abc.1", "0af7651916cd43dd8448eb211c80319c"}


async def test_a_retry_of_the_same_req_id_is_one_job(start_worker, nc):
    w = await start_worker()
    body = json.dumps({"req_id": "same-1", "input": "Say hi.", "params": {"max_tokens": 2, "temperature": 0}})
    first = await ask(nc, GEMMA, body.encode())
    assert first["req_id"] == "same-1" and not first.get("error")
    again = await ask(nc, GEMMA, body.encode(), timeout=10)
    assert again["error"]["code"] == 409 and again["error"]["type"] == "duplicate_request"
    w.terminate()
    statuses = [r[0] for r in sqlite3.connect(w.db).execute("SELECT status FROM requests WHERE req_id = 'same-1'")]
    assert sorted(statuses) == ["ok", "rejected"]
