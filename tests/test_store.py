"""The SQLite log: one row per request with the exact prompt, lifecycle events, bounded retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from workers.store import Store

from .conftest import ask


@pytest.mark.model
async def test_a_request_row_and_the_lifecycle_events(start_worker, nc):
    w = await start_worker()
    out = await ask(nc, "inference.request.gemma3-270m",
                    {"req_id": "row-1", "input": "Hi", "params": {"max_tokens": 6, "temperature": 0, "seed": 3}})
    assert await asyncio.to_thread(w.terminate, 60) == 0
    db = sqlite3.connect(w.db)
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT * FROM requests WHERE req_id='row-1'").fetchone()
    assert row["status"] == "ok" and row["source"] == "nats" and row["worker_id"] == out["worker_id"]
    assert json.loads(row["raw_input"])["input"] == "Hi"
    assert row["formatted_input"].endswith("<start_of_turn>model\n")
    assert json.loads(row["params_json"]) == {"max_tokens": 6, "temperature": 0.0, "seed": 3}
    assert row["response_text"] == out["text"] and row["tokens_out"] == out["tokens_out"]
    assert row["tokens_in"] == out["tokens_in"] and row["deliveries"] == 1
    assert row["ttft_ms"] > 0 and row["dur_ms"] >= row["ttft_ms"] and row["queue_ms"] >= 0
    assert row["finish_reason"] == out["finish_reason"]
    codes = [r[0] for r in db.execute("SELECT code FROM events ORDER BY id")]
    expected = ["startup", "nats.connected", "model.loading", "model.loaded", "server.ready", "drain", "shutdown"]
    assert [c for c in codes if c in expected] == expected
    modes = {r[0] for r in db.execute("PRAGMA journal_mode")}
    assert modes == {"wal"}


async def test_retention_drops_old_rows_and_caps_the_count(tmp_path):
    store = Store(tmp_path / "x.sqlite", retention_days=1, max_rows=100)
    await store.open()
    for i in range(150):
        store.request(ts=time.time(), req_id=f"r{i}", status="ok")
    store.request(ts=time.time() - 3 * 86400, req_id="old", status="ok")
    store.event("startup", "hello")
    await store.flush()
    await store.prune()
    await store.close()
    with sqlite3.connect(tmp_path / "x.sqlite") as db:
        ids = [r[0] for r in db.execute("SELECT req_id FROM requests ORDER BY id")]
        assert "old" not in ids and len(ids) == 100 and ids[-1] == "r149"
        assert db.execute("SELECT code FROM events").fetchall() == [("startup",)]


async def test_a_log_written_by_an_older_worker_gets_the_new_columns(tmp_path):
    """A worker upgraded in place opens the SQLite file its older version wrote: the columns added since
    (cached_tokens, batch_id) are added, the old rows kept, and new rows carry them."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, req_id TEXT, "
                "trace_id TEXT, worker_id TEXT, source TEXT, raw_input TEXT, formatted_input TEXT, params_json TEXT, "
                "grammar TEXT, response_text TEXT, tokens_in INTEGER, tokens_out INTEGER, queue_ms REAL, "
                "ttft_ms REAL, dur_ms REAL, finish_reason TEXT, deliveries INTEGER, status TEXT, error TEXT)")
    old.execute("INSERT INTO requests (ts, req_id, status) VALUES (?, 'before', 'ok')", (time.time(),))
    old.commit()
    old.close()
    store = Store(path)
    await store.open()
    store.request(ts=time.time(), req_id="after", status="ok", cached_tokens=12, batch_id=3)
    await store.close()
    rows = sqlite3.connect(path).execute("SELECT req_id, cached_tokens, batch_id FROM requests ORDER BY id").fetchall()
    assert rows == [("before", None, None), ("after", 12, 3)]
