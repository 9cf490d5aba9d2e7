"""What users watch: the heartbeat's sliding window of requests, the host, the expected wait and the slot view.

The first tests feed `workers.window` real `Finished` requests on a synthetic clock; the `model` ones run a real
gemma3-270m worker and hold its heartbeats against its own SQLite rows."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import statistics
import time
from dataclasses import replace
from typing import Any

import nats
import psutil
import pytest

from workers import protocol as p
from workers.outcome import Finished, Intake, RunFacts
from workers.window import Host, Window, parse_gpus, percentile

SUBJECT = "inference.request.gemma3-270m"
HEARTBEATS = "models.gemma3-270m.heartbeat"
ERRORS = ("failed", "rejected", "expired", "dead_letter")


def done(ts: float, dur_ms: float, ttft_ms: float | None = 10.0, tokens_out: int = 5, queue_ms: float = 1.0,
         req_id: str = "r") -> Finished:
    intake = Intake(req_id=req_id, worker_id="w", queue_ms=queue_ms)
    return Finished(intake, "ok", RunFacts(tokens_out=tokens_out, ttft_ms=ttft_ms, dur_ms=dur_ms), "stop",
                    dur_ms=dur_ms, ts=ts)


# --- the window, on a synthetic clock ------------------------------------------------------------------------


def test_percentiles_are_of_ok_requests_and_errors_count_but_cancels_do_not():
    w = Window(60.0, started_at=0.0)
    for i, dur in enumerate([100.0, 200.0, 300.0, 400.0]):
        w.record(done(1000.0 + i, dur, ttft_ms=dur / 4, tokens_out=10, queue_ms=float(i)))
    intake = Intake(req_id="bad", worker_id="w")
    w.record(replace(Finished.refused(intake, p.BadRequest("empty_input", "no text"), dur_ms=0.5), ts=1004.0))
    w.record(Finished(intake, "cancelled", RunFacts(tokens_out=3, finish_reason="cancelled", dur_ms=50.0),
                      "cancelled", dur_ms=50.0, ts=1005.0))
    s = w.stats(now=1010.0)
    assert (s.requests, s.errors, s.error_rate) == (6, 1, round(1 / 6, 4))
    assert s.latency_p50_ms == 250.0 and s.latency_p95_ms == pytest.approx(385.0)
    assert s.ttft_p50_ms == s.prefill_p50_ms == 62.5
    assert s.decode_p50_ms == 187.5  # dur - ttft: 75, 150, 225, 300
    assert s.queue_wait_p50_ms == 1.5
    assert s.tokens_out == 43 and s.mean_service_ms == 250.0
    assert s.decode_tokens_per_s == pytest.approx(statistics.median([10 / 0.075, 10 / 0.15, 10 / 0.225, 10 / 0.3]),
                                                  abs=0.01)
    assert s.rate_per_s == round(6 / 60, 4) and s.tokens_per_s == round(43 / 60, 3)


def test_rates_divide_by_the_time_since_start_until_the_window_is_full():
    w = Window(60.0, started_at=1000.0)
    for i in range(10):
        w.record(done(1001.0 + i, 50.0, tokens_out=4))
    young = w.stats(now=1020.0)
    assert young.rate_per_s == 0.5 and young.tokens_per_s == 2.0  # 10 requests, 40 tokens in 20 s


def test_requests_leave_the_window_when_they_are_older_than_it():
    w = Window(10.0, started_at=0.0)
    w.record(done(100.0, 1000.0))
    w.record(done(105.0, 10.0))
    assert w.stats(now=109.0).requests == 2
    later = w.stats(now=112.0)
    assert later.requests == 1 and later.latency_p50_ms == 10.0
    empty = w.stats(now=200.0)
    assert empty.requests == 0 and empty.latency_p50_ms is None and empty.mean_service_ms is None
    assert empty.error_rate == 0.0 and empty.decode_tokens_per_s is None


def test_embeddings_have_latency_but_no_ttft_or_decode():
    w = Window(60.0, started_at=0.0)
    w.record(done(10.0, 30.0, ttft_ms=None, tokens_out=0))
    s = w.stats(now=20.0)
    assert s.latency_p50_ms == 30.0 and s.ttft_p50_ms is None and s.decode_p50_ms is None and s.tokens_out == 0


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 101)], 95) == pytest.approx(95.05)


def test_the_expected_wait_counts_only_requests_that_must_end_before_a_new_one_starts():
    assert p.expected_wait(1, None, 2) == 0.0  # a slot is free: no wait, with or without a service time
    assert p.expected_wait(0, None, 0) == 0.0
    assert p.expected_wait(2, None, 2) is None  # a wait, but nothing served to measure it by
    assert p.expected_wait(2, 3.0, 2) == 1.5  # one of the two running must end: 1 × 3 s ÷ 2 slots
    assert p.expected_wait(5, 2.0, 1) == 10.0  # one slot: all five ahead


def test_host_sample_is_plausible_and_gpus_parse_from_nvidia_smi_csv():
    h = Host().sample()
    mem = psutil.virtual_memory()
    assert 0.0 <= h.cpu_percent <= 100.0 and 0.0 < h.memory_percent < 100.0
    assert h.memory_total_mb == pytest.approx(mem.total / 2**20, rel=0.01)
    assert 0 < h.memory_used_mb < h.memory_total_mb and 0 < h.process_rss_mb < h.memory_total_mb
    assert h.load_1m is not None and h.load_1m >= 0
    assert h.gpus == [] or shutil.which("nvidia-smi")
    csv = "NVIDIA GeForce RTX 4090, 37, 1024, 24564\nTesla T4, [N/A], 15, 15360\n"
    assert parse_gpus(csv) == [
        {"name": "NVIDIA GeForce RTX 4090", "utilization_percent": 37.0, "memory_used_mb": 1024.0,
         "memory_total_mb": 24564.0},
        {"name": "Tesla T4", "utilization_percent": None, "memory_used_mb": 15.0, "memory_total_mb": 15360.0}]


# --- a real worker ---------------------------------------------------------------------------------------------


async def next_heartbeat(nc: nats.NATS, after: float, timeout: float = 10) -> dict[str, Any]:
    """The first online heartbeat published after `after` (epoch seconds)."""
    sub = await nc.subscribe(HEARTBEATS)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = json.loads((await sub.next_msg(timeout=timeout)).data)
            if beat["status"] == "online" and beat["started_at"] + beat["uptime_s"] > after:
                return beat
        raise AssertionError("no heartbeat")
    finally:
        await sub.unsubscribe()


def rows(db: Any, n: int, timeout: float = 5) -> list[sqlite3.Row]:
    """The worker's request rows, once there are `n` (its log writer is a step behind the replies)."""
    deadline = time.monotonic() + timeout
    while True:
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        got = con.execute("SELECT * FROM requests ORDER BY id").fetchall()
        con.close()
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.mark.model
async def test_heartbeat_stats_match_the_sqlite_rows_of_the_same_window(start_worker, nc):
    w = await start_worker(HEARTBEAT_INTERVAL=0.5, WORKER_CONCURRENCY=2)
    prompts = ["Count: 1, 2, 3,", "The sea is", "Name a colour:", "One plus one is", "Hello"]
    answers = await asyncio.gather(*(nc.request(SUBJECT, json.dumps(
        {"input": t, "raw": True, "params": {"max_tokens": 4 + 3 * i, "temperature": 0}}).encode(), timeout=60)
        for i, t in enumerate(prompts)))
    bad = json.loads((await nc.request(SUBJECT, b'{"input": "   "}', timeout=10)).data)
    assert bad["error"]["type"] == "empty_input"
    assert all("error" not in json.loads(a.data) for a in answers)
    beat = await next_heartbeat(nc, time.time())
    got = rows(w.db, 6)
    s = beat["stats"]
    window_start = beat["started_at"] + beat["uptime_s"] - s["window_s"]
    recent = [r for r in got if r["ts"] >= window_start]
    ok = [r for r in recent if r["status"] == "ok"]
    assert s["window_s"] == 60.0 and len(recent) == 6 and len(ok) == 5
    assert s["requests"] == 6 and s["errors"] == sum(r["status"] in ERRORS for r in recent) == 1
    assert s["error_rate"] == round(1 / 6, 4)
    assert s["tokens_out"] == sum(r["tokens_out"] for r in recent) > 0
    assert s["latency_p50_ms"] == pytest.approx(statistics.median(r["dur_ms"] for r in ok), abs=0.01)
    assert s["ttft_p50_ms"] == pytest.approx(statistics.median(r["ttft_ms"] for r in ok), abs=0.01)
    assert s["queue_wait_p50_ms"] == pytest.approx(statistics.median(r["queue_ms"] for r in ok), abs=0.01)
    assert s["decode_p50_ms"] == pytest.approx(statistics.median(r["dur_ms"] - r["ttft_ms"] for r in ok), abs=0.01)
    assert s["mean_service_ms"] == pytest.approx(statistics.mean(r["dur_ms"] for r in ok), abs=0.01)
    assert s["latency_p50_ms"] <= s["latency_p95_ms"] <= max(r["dur_ms"] for r in ok) + 0.01
    assert s["rate_per_s"] > 0 and s["tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
    host = beat["host"]
    assert 0 <= host["cpu_percent"] <= 100 and 0 < host["memory_percent"] < 100
    assert host["memory_total_mb"] == pytest.approx(psutil.virtual_memory().total / 2**20, rel=0.01)
    # the worker process: the model's weights are mapped in, so well above an idle Python, and it is that process
    assert 100 < host["process_rss_mb"] < host["memory_total_mb"]
    assert host["process_rss_mb"] == pytest.approx(psutil.Process(w.proc.pid).memory_info().rss / 2**20, rel=0.25)
    assert host["gpus"] == [] or shutil.which("nvidia-smi")


@pytest.mark.model
async def test_queued_requests_behind_one_busy_slot_raise_the_expected_wait_and_its_level(start_worker, nc):
    await start_worker(WORKER_CONCURRENCY=1, HEARTBEAT_INTERVAL=0.5, BACKPRESSURE_WAIT_WARNING_S=0.5,
                       BACKPRESSURE_WAIT_CRITICAL_S=2)
    await nc.request(SUBJECT, json.dumps({"input": "Hi", "params": {"max_tokens": 8, "temperature": 0}}).encode(),
                     timeout=60)  # a served request: the mean service time the estimate goes by
    reports, _ = await collect(nc, "monitoring.inference.gemma3-270m")
    beats, _ = await collect(nc, HEARTBEATS)
    for i in range(6):
        body = {"req_id": f"wait-{i}", "input": f"Tell me fact {i} about the sea.",
                "params": {"max_tokens": 8, "temperature": 0}}
        await nc.publish(SUBJECT, json.dumps(body).encode(), reply=nc.new_inbox())
    await nc.flush()

    def queued(got: list[dict[str, Any]], pending: Any) -> dict[str, Any] | None:
        return next((m for m in got if pending(m) >= 3), None)

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            queued(beats, lambda b: b["queue_metrics"]["pending_messages"] if b["status"] == "online" else 0)
            and queued(reports, lambda r: r["pending_messages"])):
        await asyncio.sleep(0.1)
    beat = queued(beats, lambda b: b["queue_metrics"]["pending_messages"] if b["status"] == "online" else 0)
    report = queued(reports, lambda r: r["pending_messages"])
    assert beat is not None and report is not None
    bp, qm, stats = beat["backpressure_status"], beat["queue_metrics"], beat["stats"]
    assert qm["slots"]["slots"] == 1  # this instance's slot, and no peers
    want = p.expected_wait(qm["pending_messages"], stats["mean_service_ms"] / 1000, 1)
    assert want is not None and want > 0 and bp["expected_wait_s"] == want
    assert bp["level"] == p.wait_level(want, bp["utilization"], 0.5, 2.0)
    # a few requests in a cap of 1000: by capacity it would read healthy, by the wait it does not
    assert bp["utilization"] < 0.05 and p.backpressure_level(bp["utilization"]) == "healthy"
    assert bp["level"] in ("warning", "critical")
    assert report["expected_wait_s"] > 0
    assert report["status"] == p.wait_level(report["expected_wait_s"], report["utilization"], 0.5, 2.0) != "healthy"
    deadline = time.monotonic() + 120  # a loaded 2-core machine serves them slowly
    idle = None
    while idle is None and time.monotonic() < deadline:
        idle = next((r for r in reports if r["pending_messages"] == 0 and r["active_processing"] == 0
                     and r["timestamp"] > report["timestamp"]), None)
        await asyncio.sleep(0.2)
    assert idle is not None, reports[-3:]
    assert idle["expected_wait_s"] == 0.0 and idle["status"] == "healthy"


async def collect(nc: nats.NATS, subject: str) -> tuple[list[dict[str, Any]], Any]:
    got: list[dict[str, Any]] = []

    async def cb(msg: Any) -> None:
        got.append(json.loads(msg.data))

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got, sub


async def slot_views(nc: nats.NATS, req_id: str, n: int = 3) -> list[dict[str, Any]]:
    """The first `n` views of request `req_id` in the worker's health that show a new token count while it
    decodes (polled every 0.2 s; a loaded machine may take longer than that per token)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while len(seen) < n and time.monotonic() < deadline:
        health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
        slots = health["queue_metrics"].get("slots") or {}
        mine = [r for r in slots.get("requests", []) if r["req_id"] == req_id]
        if mine and mine[0]["state"] == "decode" and (not seen or mine[0]["tokens_out"] != seen[-1]["tokens_out"]):
            seen.append(mine[0])
        await asyncio.sleep(0.2)
    return seen


@pytest.mark.model
@pytest.mark.parametrize("engine", ["batched", "contexts"])
async def test_health_shows_what_each_slot_is_doing(start_worker, nc, engine):
    await start_worker(ENGINE=engine, WORKER_CONCURRENCY=2)
    body = {"req_id": f"slot-{engine}", "input": "Write a long story about a dragon.", "raw": True,
            "params": {"max_tokens": 400, "temperature": 0}}
    answer = asyncio.create_task(nc.request(SUBJECT, json.dumps(body).encode(), timeout=120))
    views = await slot_views(nc, f"slot-{engine}")
    await nc.publish("inference.cancel.gemma3-270m", json.dumps({"req_id": f"slot-{engine}"}).encode())
    final = json.loads((await answer).data)
    assert len(views) == 3, views
    assert all(v["slot"] in (0, 1) and v["tokens_in"] > 5 for v in views)
    assert views[0]["tokens_out"] < views[1]["tokens_out"] < views[2]["tokens_out"] <= final["tokens_out"]
    assert views[0]["elapsed_ms"] < views[1]["elapsed_ms"] < views[2]["elapsed_ms"]
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    assert health["queue_metrics"]["slots"]["requests"] == []  # finished: the slot is free again
