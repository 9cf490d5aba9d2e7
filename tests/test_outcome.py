"""A finished request: one constructor per terminal state, one row shape, one set of totals."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workers import protocol as p
from workers.metrics import Metrics
from workers.outcome import Finished, Intake, Ledger, RunFacts
from workers.store import REQUEST_COLUMNS, Store

INTAKE = Intake(req_id="r", worker_id="w", raw_input='{"input":"x"}', queue_ms=4.0)


def test_every_terminal_state_writes_only_known_columns():
    every = [
        Finished.ok(INTAKE, RunFacts(tokens_out=3, dur_ms=9.0)),
        Finished.ok(INTAKE, RunFacts(finish_reason="cancelled")),
        Finished.refused(INTAKE, p.BadRequest("expired", "late", 504)),
        Finished.refused(INTAKE, p.BadRequest("cancelled", "gone", 499)),
        Finished.refused(INTAKE, p.BadRequest("invalid_json", "bad")),
        Finished.failed(INTAKE, RuntimeError("boom"), 3.0),
        Finished.handed_back(INTAKE),
        Finished.dead_letter(INTAKE, "gave up"),
    ]
    assert [f.status for f in every] == ["ok", "cancelled", "expired", "cancelled", "rejected", "failed",
                                         "handed_back", "dead_letter"]
    for f in every:
        assert set(f.columns()) <= set(REQUEST_COLUMNS)
    assert every[2].columns()["error"] == "504 expired: late" and every[3].finish_reason == "cancelled"


async def test_the_ledger_writes_the_row_and_the_metrics_and_counts_ok_as_processed(tmp_path: Path):
    store, metrics = Store(tmp_path / "log.sqlite"), Metrics("m")
    await store.open()
    ledger = Ledger(store, metrics)
    ledger.record(Finished.ok(INTAKE, RunFacts(tokens_in=5, tokens_out=3, dur_ms=20.0)))
    ledger.record(Finished.handed_back(INTAKE))
    ledger.record(Finished.refused(INTAKE, p.BadRequest("invalid_json", "bad")))
    await store.close()
    assert (ledger.total_processed, ledger.total_failed) == (1, 1)
    with sqlite3.connect(tmp_path / "log.sqlite") as db:
        rows = db.execute("SELECT status, queue_ms, tokens_out, dur_ms FROM requests ORDER BY id").fetchall()
    assert rows == [("ok", 4.0, 3, 20.0), ("handed_back", 4.0, 0, None), ("rejected", 4.0, 0, 0.0)]
    sample = metrics.registry.get_sample_value
    assert sample("llm_requests_total", {"model": "m", "status": "ok", "finish_reason": "stop"}) == 1
    assert sample("llm_requests_total", {"model": "m", "status": "rejected", "finish_reason": "error"}) == 1
    assert sample("llm_generation_tokens_total", {"model": "m"}) == 3
