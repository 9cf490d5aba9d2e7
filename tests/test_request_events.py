"""Each finished request is published as a RequestEvent on events.request.<model> (the monitor's Requests view),
with what its SQLite row says, and with prompt and answer only when the worker's LOG_PROMPTS allows it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import nats
import pytest

from workers import protocol as p

pytestmark = pytest.mark.model

SUBJECT = "inference.request.gemma3-270m"
EVENTS = p.request_event_subject("gemma3-270m")


async def run_requests(nc: nats.NATS) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Two answered requests and one refused (empty input); the events seen for them, by req_id."""
    events: dict[str, dict[str, Any]] = {}

    async def cb(msg: Any) -> None:
        body = json.loads(msg.data)
        events[body["req_id"]] = body

    await nc.subscribe(p.REQUEST_EVENTS, cb=cb)
    await nc.flush()
    answers = {}
    for req_id, text in (("ev-1", "The sea is"), ("ev-2", "Count: 1, 2, 3,")):
        body = {"req_id": req_id, "input": text, "raw": True, "params": {"max_tokens": 6, "temperature": 0}}
        answers[req_id] = json.loads((await nc.request(SUBJECT, json.dumps(body).encode(), timeout=60)).data)
    bad = json.loads((await nc.request(SUBJECT, b'{"req_id": "ev-bad", "input": " "}', timeout=10)).data)
    assert bad["error"]["type"] == "empty_input"
    deadline = time.monotonic() + 5
    while len(events) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return events, answers


def logged(db: Any) -> dict[str, sqlite3.Row]:
    deadline = time.monotonic() + 5
    while True:
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        rows = {r["req_id"]: r for r in con.execute("SELECT * FROM requests")}
        con.close()
        if len(rows) >= 3 or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


async def test_every_finished_request_is_published_as_its_row_says_without_prompt_text(start_worker, nc):
    w = await start_worker()
    events, answers = await run_requests(nc)
    rows = logged(w.db)
    assert set(events) == set(rows) == {"ev-1", "ev-2", "ev-bad"}
    for req_id, ev in events.items():
        row = rows[req_id]
        assert (ev["status"], ev["tokens_in"], ev["tokens_out"]) == (row["status"], row["tokens_in"],
                                                                      row["tokens_out"])
        assert ev["model_name"] == "gemma3-270m" and ev["worker_id"] == row["worker_id"] and ev["kind"] == "inference"
        assert ev["ts"] == pytest.approx(row["ts"]) and ev.get("latency_ms") == pytest.approx(row["dur_ms"], abs=1e-3)
        assert "input" not in ev and "output" not in ev  # LOG_PROMPTS is off
    for req_id in ("ev-1", "ev-2"):
        assert events[req_id]["tokens_out"] == answers[req_id]["tokens_out"] > 0
        assert events[req_id]["finish_reason"] == answers[req_id]["finish_reason"]
        assert "error_code" not in events[req_id]
    bad = events["ev-bad"]
    assert bad["status"] == "rejected" and bad["error_code"] == "empty_input"
    assert bad["error"] == rows["ev-bad"]["error"]
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    assert {ev["instance"] for ev in events.values()} == {health["instance"]}


async def test_with_log_prompts_the_events_carry_prompt_and_answer(start_worker, nc):
    await start_worker(LOG_PROMPTS="1")
    events, answers = await run_requests(nc)
    assert set(events) == {"ev-1", "ev-2", "ev-bad"}
    assert "The sea is" in events["ev-1"]["input"] and events["ev-1"]["output"] == answers["ev-1"]["text"]
    assert '" "' in events["ev-bad"]["input"] and "output" not in events["ev-bad"]
