"""What the README promises of the queue, shown with real workers on a real nats-server.

A generation may run far longer than QUEUE_ACK_WAIT_S (in_progress keeps the message); a request that fails on
every try is answered `dead_letter` after QUEUE_MAX_DELIVER tries; the `Fleet-Timeout-Ms` header is the caller's
deadline in the queue; a cancel on the model's subject reaches the request on whichever instance runs it; a
request of a higher priority overtakes the queued requests below it.

Generations are made long by banning Gemma's end-of-generation tokens, and ended by a cancel once they have run
long enough, so no test depends on how fast this machine generates.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from workers import protocol as p

from .queue_support import (
    MODEL,
    NO_EOS,
    ONE_THREAD,
    answers,
    cancel,
    publish,
    queued,
    request_rows,
    running_on,
    worker_id,
)

pytestmark = pytest.mark.model  # real gemma3-270m workers

LONG = 1500  # max_tokens of a generation meant to be cut short by a cancel (within CTX_SIZE 2048)


def story(req_id: str, max_tokens: int = LONG) -> dict:
    return {"req_id": req_id, "input": "Write a very long story about the sea.",
            "params": {"max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_EOS}}


async def test_a_generation_longer_than_ack_wait_is_kept_and_answered_once(start_worker, nc):
    """in_progress() every ack_wait/3 keeps the message: with a free slot pulling beside it, JetStream would
    otherwise hand the same request out again after 2 s."""
    ack_wait = 2
    w = await start_worker(WORKER_CONCURRENCY=2, QUEUE_ACK_WAIT_S=ack_wait, **ONE_THREAD)
    (sub,) = await publish(nc, story("long-1"))
    assert await running_on(nc, "long-1") == worker_id(w)
    await asyncio.sleep(3 * ack_wait + 0.5)  # three ack_waits while it generates, the second slot idle
    assert (await cancel(nc, "long-1")).get("state") == "running"
    (reply,) = await answers([sub], timeout=60)
    assert reply["req_id"] == "long-1" and reply["finish_reason"] == "cancelled" and "error" not in reply
    (row,) = await request_rows(w.db, "long-1", 1)
    assert (row["status"], row["deliveries"]) == ("cancelled", 1)
    assert row["dur_ms"] >= 3 * ack_wait * 1000 and 0 < row["tokens_out"] < LONG
    assert await queued(nc) == 0


async def test_a_request_that_fails_every_try_is_dead_lettered_after_max_deliver(start_worker, nc, tmp_path):
    """A stored grammar whose file is not UTF-8 (damaged on disk) makes every attempt raise in the worker:
    `request.failed`, nak after 1 s, again; after QUEUE_MAX_DELIVER tries the dead-letter handler answers."""
    grammars = tmp_path / "data" / "grammars"  # the workers' DATA_DIR (conftest.start_worker)
    grammars.mkdir(parents=True)
    (grammars / "damaged.gbnf").write_bytes(b'root ::= "\xff\xfe"\n')
    w = await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_DELIVER=3, **ONE_THREAD)
    (sub,) = await publish(nc, {"req_id": "doomed", "input": "Hi", "params": {"max_tokens": 8, "grammar": "damaged"}})
    (reply,) = await answers([sub], timeout=90)
    assert (reply["req_id"], reply.get("error", {}).get("code"), reply.get("error", {}).get("type")) == (
        "doomed", 500, "dead_letter")
    rows = await request_rows(w.db, "doomed", 4)
    assert [(r["status"], r["deliveries"]) for r in rows] == [("failed", 1), ("failed", 2), ("failed", 3),
                                                               ("dead_letter", 3)]
    assert all("UnicodeDecodeError" in r["error"] for r in rows[:3])
    assert await queued(nc) == 0  # removed from the stream, not kept for ever


async def test_fleet_timeout_ms_is_the_callers_deadline_in_the_queue(start_worker, nc):
    """Behind a busy slot, a request whose Fleet-Timeout-Ms is shorter than its wait is answered 504 `expired`
    and never generated; one with a long Fleet-Timeout-Ms waits and runs (the body names no timeout_ms)."""
    w = await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD)
    await publish(nc, story("busy"))
    await running_on(nc, "busy")
    short, patient = await publish(
        nc, {"req_id": "short", "input": "Hi", "params": {"max_tokens": 8}},
        {"req_id": "patient", "input": "Hi", "params": {"max_tokens": 8}},
        headers=[{p.H_TIMEOUT_MS: "1000"}, {p.H_TIMEOUT_MS: "120000"}])
    await asyncio.sleep(2.0)  # past the short one's deadline, still queued behind "busy"
    await cancel(nc, "busy")
    expired, ran = await answers([short, patient], timeout=60)
    assert (expired["req_id"], expired.get("error", {}).get("code"), expired.get("error", {}).get("type")) == (
        "short", 504, "expired")
    assert ran["req_id"] == "patient" and "error" not in ran and ran["tokens_out"] > 0
    (row,) = await request_rows(w.db, "short", 1)
    assert (row["status"], row["tokens_in"], row["tokens_out"], row["formatted_input"]) == ("expired", 0, 0, None)
    assert row["queue_ms"] >= 1000
    (row,) = await request_rows(w.db, "patient", 1)
    assert row["status"] == "ok" and row["queue_ms"] >= 1000


async def test_a_cancel_reaches_the_request_on_whichever_instance_runs_it(start_worker, nc):
    """Two instances of the model, one slot each, one long request on each: a cancel by req_id on the model's
    cancel subject is answered by the instance that runs it, and both generations stop early."""
    workers = [await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD) for _ in range(2)]
    subs = await publish(nc, story("spread-0"), story("spread-1"))
    holders = [await running_on(nc, "spread-0"), await running_on(nc, "spread-1")]
    assert sorted(holders) == sorted(worker_id(w) for w in workers)  # one on each instance
    for req_id, holder in zip(("spread-0", "spread-1"), holders, strict=True):
        reply = await cancel(nc, req_id)
        assert [reply.get(k) for k in ("cancelled", "state", "worker_id")] == [True, "running", holder]
    replies = await answers(subs, timeout=60)
    assert [(r["req_id"], r["finish_reason"], r["worker_id"]) for r in replies] == [
        ("spread-0", "cancelled", holders[0]), ("spread-1", "cancelled", holders[1])]
    for req_id, holder in zip(("spread-0", "spread-1"), holders, strict=True):
        (row,) = await request_rows(workers[0].db, req_id, 1)  # one log file: the workers share DATA_DIR
        assert (row["worker_id"], row["status"], row["deliveries"]) == (holder, "cancelled", 1)
        assert row["tokens_out"] < LONG



async def test_a_higher_priority_request_overtakes_the_queue_below_it(start_worker, nc):
    """One slot held busy; ten priority-1 requests queued, then one priority 2 (the body's `priority`) and one
    priority 3 (the Fleet-Priority header). When the slot frees, 3 runs first, then 2, then the ten in order."""
    w = await start_worker(WORKER_CONCURRENCY=1, **ONE_THREAD)
    await publish(nc, story("busy"))
    await running_on(nc, "busy")
    low = [{"req_id": f"low-{i}", "input": "Hi", "params": {"max_tokens": 4}} for i in range(10)]
    high = [{"req_id": "p2", "input": "Hi", "params": {"max_tokens": 4}, "priority": 2},
            {"req_id": "p3", "input": "Hi", "params": {"max_tokens": 4}}]
    subs = await publish(nc, *low, *high, headers=[{}] * 11 + [{p.H_PRIORITY: "3"}])
    js = nc.jetstream()

    async def waiting() -> dict[int, int]:
        return {pr: (await js.consumer_info(p.STREAM_NAME, p.consumer_name("inference", MODEL, pr))).num_pending
                for pr in p.PRIORITIES}

    for _ in range(100):  # the ingress queues them one by one
        if await waiting() == {3: 1, 2: 1, 1: 10}:
            break
        await asyncio.sleep(0.1)
    assert await waiting() == {3: 1, 2: 1, 1: 10}  # each priority in its own queue, all behind "busy"
    await cancel(nc, "busy")
    replies = await answers(subs, timeout=120)
    assert all("error" not in r for r in replies), [r for r in replies if "error" in r]
    with sqlite3.connect(w.db) as conn:
        order = [r for (r,) in conn.execute("SELECT req_id FROM requests WHERE status = 'ok' ORDER BY id")]
    assert order == ["p3", "p2", *(b["req_id"] for b in low)]
    bad = await publish(nc, {"req_id": "bad", "input": "Hi"}, headers=[{p.H_PRIORITY: "9"}])
    (refused,) = await answers(bad, timeout=30)
    assert refused["error"]["type"] == "invalid_priority" and "1, 2 or 3" in refused["error"]["message"]
