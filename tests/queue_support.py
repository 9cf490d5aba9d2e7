"""What the queue tests share (tests/test_resilience.py, tests/test_queue_promises.py): sending, cancelling and
finding requests, and which worker holds one."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import nats

from workers import discovery
from workers import protocol as p

from .conftest import WorkerProc

MODEL = "gemma3-270m"
SUBJECT = p.request_subject("inference", MODEL)
NO_EOS = {"1": -100, "106": -100}  # Gemma 3's <eos> and <end_of_turn> banned: it generates up to max_tokens
# One llama.cpp thread per worker: several workers sharing two busy cores with two threads each spin in
# llama.cpp's thread barriers (seen: 96 tokens in 118 s); the queue's behaviour does not depend on it.
ONE_THREAD = {"MODEL_THREADS": 1}


async def answers(subs, timeout: float) -> list[dict]:
    out = [json.loads((await s.next_msg(timeout=timeout)).data) for s in subs]
    await asyncio.sleep(1.0)
    for s in subs:
        assert s.pending_msgs == 0, "a caller got more than one answer"
    return out


async def publish(nc: nats.NATS, *bodies: dict[str, Any],
                  headers: list[dict[str, str]] | None = None) -> list[nats.aio.subscription.Subscription]:
    """Send each body as a request with its own inbox subscription (so a second answer would be seen)."""
    subs = []
    for i, body in enumerate(bodies):
        inbox = nc.new_inbox()
        subs.append(await nc.subscribe(inbox))
        await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox, headers=headers[i] if headers else None)
    await nc.flush()
    return subs


async def running_on(nc: nats.NATS, req_id: str, timeout: float = 90) -> str:
    """The worker_id of the instance decoding `req_id` (each instance's health lists what its slots run)."""
    ends = time.monotonic() + timeout
    while True:
        for health in await discovery.health(nc, MODEL):
            slots = health["queue_metrics"].get("slots") or {}
            if any(r["req_id"] == req_id and r["state"] == "decode" for r in slots.get("requests", [])):
                return str(health["worker_id"])
        assert time.monotonic() < ends, f"no instance of {MODEL} was generating {req_id} within {timeout} s"
        await asyncio.sleep(0.1)


async def cancel(nc: nats.NATS, req_id: str) -> dict[str, Any]:
    """Cancel on the model's cancel subject, which every instance hears: the first answer ({} if none came)."""
    try:
        msg = await nc.request(p.cancel_subject("inference", MODEL), json.dumps({"req_id": req_id}).encode(),
                               timeout=10)
    except nats.errors.TimeoutError:
        return {}
    return dict(json.loads(msg.data))


async def request_rows(db: Path, req_id: str, count: int, timeout: float = 30) -> list[sqlite3.Row]:
    """The log rows of `req_id`, oldest first, once there are `count` (plus any that come within 1 s more)."""
    ends = time.monotonic() + timeout

    def read() -> list[sqlite3.Row]:
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute("SELECT * FROM requests WHERE req_id = ? ORDER BY id", (req_id,)).fetchall()

    while len(read()) < count:
        assert time.monotonic() < ends, f"{req_id}: {len(read())} log rows after {timeout} s, expected {count}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    return read()


async def queued(nc: nats.NATS) -> int:
    """Messages left in the request stream."""
    return int((await nc.jetstream().stream_info(p.STREAM_NAME)).state.messages)


def worker_id(w: WorkerProc) -> str:
    return f"{MODEL}-{socket.gethostname()}-{w.proc.pid}"
