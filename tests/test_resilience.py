"""Nothing accepted is lost: SIGKILL, broker restarts, SIGTERM drains, ghosts and poison messages."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import nats
import pytest

from workers import protocol as p
from workers.config import Settings
from workers.queue import DeadLetters, ensure_consumer, ensure_stream
from workers.store import Store

from .conftest import ask, send_many
from .queue_support import (
    NO_EOS,
    ONE_THREAD,
    SUBJECT,
    answers,
    publish,
    request_rows,
    running_on,
    worker_id,
)


@pytest.mark.model
async def test_sigkill_mid_generation_loses_nothing(start_worker, nc):
    a = await start_worker(WORKER_CONCURRENCY=1, QUEUE_ACK_WAIT_S=3, **ONE_THREAD)
    subs = await send_many(nc, 5, 96, "kill")
    assert await running_on(nc, "kill-0") == worker_id(a)  # a holds the first request, the rest are queued
    a.kill()
    b = await start_worker(WORKER_CONCURRENCY=1, QUEUE_ACK_WAIT_S=3, **ONE_THREAD)
    replies = await answers(subs, timeout=120)
    assert sorted(r["req_id"] for r in replies) == [f"kill-{i}" for i in range(5)]
    assert all(r["finish_reason"] in ("stop", "length") and "error" not in r for r in replies)
    assert {r["worker_id"] for r in replies} == {worker_id(b)}
    (row,) = await request_rows(b.db, "kill-0", 1)  # a died holding it: only b's row, of a second delivery
    assert row["worker_id"] == worker_id(b) and row["status"] == "ok" and row["deliveries"] >= 2


@pytest.mark.model
async def test_broker_restart_with_queued_requests(start_worker, nc, nats_server):
    await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD)
    subs = await send_many(nc, 4, 48, "restart")
    await asyncio.sleep(0.5)
    nats_server.restart()  # same port, same JetStream store
    replies = await answers(subs, timeout=120)
    assert sorted(r["req_id"] for r in replies) == [f"restart-{i}" for i in range(4)]
    assert all("error" not in r for r in replies)


@pytest.mark.model
async def test_sigterm_finishes_in_flight_work_then_exits(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD)
    subs = await send_many(nc, 1, 64, "drain")
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(w.terminate, 60) == 0
    (reply,) = await answers(subs, timeout=10)
    assert reply["req_id"] == "drain-0" and "error" not in reply
    with sqlite3.connect(w.db) as db:
        codes = [r[0] for r in db.execute("SELECT code FROM events ORDER BY id")]
    assert codes.index("drain") < codes.index("shutdown")


@pytest.mark.model
async def test_an_idle_worker_stops_promptly_after_a_cancel(start_worker, nc):
    """A stray message left in the pull subscription must not hold the shutdown for nats-py's 30 s drain."""
    w = await start_worker(WORKER_CONCURRENCY=2, **ONE_THREAD)
    long = {"input": "Write a very long story.", "params": {"max_tokens": 200, "temperature": 0}}
    first = asyncio.create_task(nc.request("inference.request.gemma3-270m",
                                           json.dumps({**long, "req_id": "x1"}).encode(), timeout=120))
    second = asyncio.create_task(nc.request("inference.request.gemma3-270m",
                                            json.dumps({**long, "req_id": "x2"}).encode(), timeout=120))
    await asyncio.sleep(1.5)
    await nc.request("inference.cancel.gemma3-270m", b'{"req_id":"x1"}', timeout=5)
    await asyncio.gather(first, second)
    await asyncio.sleep(6)  # past a fetch wait, so a late delivery could sit in the subscription
    t0 = time.monotonic()
    assert await asyncio.to_thread(w.terminate, 60) == 0
    assert time.monotonic() - t0 < 10


@pytest.mark.model
async def test_unfinished_work_is_handed_back_on_drain_timeout(start_worker, nc):
    """DRAIN_TIMEOUT=0: SIGTERM gives the running request back at once (nak), so the other instance starts it
    within seconds; without the nak JetStream would wait out the 120 s ack_wait."""
    env = dict(WORKER_CONCURRENCY=1, DRAIN_TIMEOUT=0, QUEUE_ACK_WAIT_S=120, **ONE_THREAD)
    started = [await start_worker(**env), await start_worker(**env)]
    (sub,) = await publish(nc, {"req_id": "handback", "input": "Tell me about the sea.",
                                "params": {"max_tokens": 120, "temperature": 0, "logit_bias": NO_EOS}})
    first = await running_on(nc, "handback")
    assert first in {worker_id(w) for w in started}
    a, b = sorted(started, key=lambda w: worker_id(w) != first)  # a runs it, b waits with a free slot
    assert await asyncio.to_thread(a.terminate, 60) == 0
    assert await running_on(nc, "handback", timeout=10) == worker_id(b)
    (reply,) = await answers([sub], timeout=120)
    assert reply["worker_id"] == worker_id(b) and "error" not in reply
    rows = await request_rows(a.db, "handback", 2)  # one log file: the workers share DATA_DIR
    assert [(r["worker_id"], r["status"], r["deliveries"]) for r in rows] == [
        (worker_id(a), "handed_back", 1), (worker_id(b), "ok", 2)]


@pytest.mark.model
async def test_ghost_request_past_its_deadline_is_skipped(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD)
    busy = asyncio.create_task(ask(nc, SUBJECT, {"input": "Write a poem.", "params": {"max_tokens": 120}}))
    await asyncio.sleep(0.3)
    ghost = await ask(nc, SUBJECT, {"req_id": "ghost", "input": "Hi", "timeout_ms": 100}, timeout=120)
    assert ghost["error"]["code"] == 504 and ghost["error"]["type"] == "expired"
    await busy
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        row = db.execute("SELECT status, response_text FROM requests WHERE req_id='ghost'").fetchone()
    assert row == ("expired", None)


async def test_dead_letter_is_answered_logged_and_removed(nats_server, nc, tmp_path):
    """A message that exhausts max_deliver gets an error reply; JetStream would otherwise keep it forever."""
    settings = Settings(model_name="poison", nats_url=nats_server.url, data_dir=tmp_path, queue_max_deliver=2,
                        queue_ack_wait_s=1)
    js = nc.jetstream()
    await ensure_stream(js, settings)
    durable = await ensure_consumer(js, settings)
    store = Store(settings.log_path)
    await store.open()
    dead = DeadLetters(nc, js, settings, store, lambda finished: store.request(**finished.columns()))
    await dead.start()
    inbox = nc.new_inbox()
    caller = await nc.subscribe(inbox)
    await js.publish(p.queue_subject("inference", "poison"), b'{"input":"boom"}',
                     headers={p.H_REPLY_TO: inbox, p.H_REQ_ID: "poison-1"})
    psub = await js.pull_subscribe_bind(durable=durable, stream=p.STREAM_NAME)
    for _ in range(2):  # a worker that fails on it every time
        (msg,) = await psub.fetch(1, timeout=5)
        await msg.nak()
    # JetStream notices the exhausted message when it next tries to deliver, i.e. on a waiting pull.
    try:
        extra = await psub.fetch(1, timeout=2)
        raise AssertionError(f"delivered past max_deliver: {extra}")
    except nats.errors.TimeoutError:
        pass
    reply = json.loads((await caller.next_msg(timeout=10)).data)
    assert reply["req_id"] == "poison-1" and reply["error"]["type"] == "dead_letter"
    deadline = time.monotonic() + 5
    while (await js.stream_info(p.STREAM_NAME)).state.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await js.stream_info(p.STREAM_NAME)).state.messages == 0
    await dead.stop()
    await store.close()
    with sqlite3.connect(settings.log_path) as db:
        assert db.execute("SELECT status FROM requests WHERE req_id='poison-1'").fetchone() == ("dead_letter",)
        assert db.execute("SELECT count(*) FROM events WHERE code='request.dead_letter'").fetchone() == (1,)
