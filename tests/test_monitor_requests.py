"""What workers publish for users to watch (issue 15): window stats, host, slots and expected wait per instance and
per model, and the Requests view fed by `events.request.*`, through a real nats-server and a real
`python -m monitor` (REST, SSE, `tui --once`) and headless Chromium (the dashboard).

Bodies are published by hand in the contract's shapes (workers/protocol.py), as the other monitor tests publish
heartbeats; the end-to-end run with a real worker is the lead's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.registry import Registry, decode_health
from workers import protocol as p
from workers.config import ROOT

from .monitor_support import (
    SSEReader,
    fetch,
    get_json,
    heartbeat_body,
    page_fixture,  # noqa: F401 - the page fixture
    start_monitor_fixture,  # noqa: F401 - the start_monitor fixture
    until,
)

GEN = "gemma3-270m"


def window(rate: float, requests: int, errors: int, p50: float, p95: float, tps: float) -> dict[str, Any]:
    return p.WindowStats(window_s=60.0, requests=requests, rate_per_s=rate, errors=errors,
                         error_rate=errors / requests, latency_p50_ms=p50, latency_p95_ms=p95, ttft_p50_ms=p50 / 4,
                         queue_wait_p50_ms=5.0, tokens_out=int(tps * 60), tokens_per_s=tps).model_dump(
                             exclude_none=True)


HOST = p.HostStats(cpu_percent=42.0, memory_percent=61.5, memory_used_mb=9800.0, memory_total_mb=16000.0,
                   process_rss_mb=350.0, load_1m=1.2).model_dump(exclude_none=True)


def busy_heartbeat(worker_id: str, stats: dict[str, Any] | None, wait: float | None, *, pending: int = 10,
                   capacity: int = 1000, started_at: float | None = None, uptime: float = 100.0,
                   model: str = GEN) -> dict[str, Any]:
    slots: dict[str, Any] = {"slots": 2, "busy": 1, "waiting": 1, "requests": [
        {"req_id": f"{worker_id}-run", "state": "decode", "slot": 0, "tokens_in": 12, "tokens_out": 30,
         "elapsed_ms": 1500.0},
        {"req_id": f"{worker_id}-wait", "state": "waiting", "tokens_in": 0, "tokens_out": 0, "elapsed_ms": 20.0}]}
    bp: dict[str, Any] = {"level": "healthy", "utilization": pending / capacity}
    if wait is not None:
        bp["expected_wait_s"] = wait
    body = heartbeat_body(model, worker_id, backpressure_status=bp, instance=f"tok-{worker_id}",
                          started_at=started_at or time.time() - uptime, uptime_s=uptime,
                          queue_metrics={"pending_messages": pending, "active_processing": 1,
                                         "queue_capacity": capacity, "total_processed": 40, "total_failed": 2,
                                         "slots": slots})
    if stats is not None:
        body.update(stats=stats, host=HOST)
    return body


def request_event(req_id: str, *, model: str = GEN, worker: str = "gen-a", status: str = "ok",
                  **fields: Any) -> bytes:
    ev = p.RequestEvent(ts=time.time(), model_name=model, worker_id=worker, kind="inference", req_id=req_id,
                        status=status, latency_ms=250.0, queue_ms=3.0, tokens_in=12, tokens_out=34,
                        instance=f"tok-{worker}", **fields)
    return p.dumps(ev)


async def publish(nc: Any, subject: str, body: dict[str, Any] | bytes) -> None:
    await nc.publish(subject, body if isinstance(body, bytes) else json.dumps(body).encode())
    await nc.flush()


async def test_window_stats_host_slots_and_wait_show_per_instance_and_per_model(start_monitor, nc):
    m = await start_monitor()
    events = SSEReader(m.url)
    try:
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-a", window(0.5, 30, 3, 800, 2000, 15), 4.0))
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-b", window(0.25, 15, 0, 400, 3000, 9), 7.5))
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-c", window(0.1, 5, 0, 1200, 1500, 2), 1.0))
        await publish(nc, p.heartbeat_subject("older"), heartbeat_body("older", "older-w"))  # no new fields

        async def both() -> Any:
            got = {s["model_name"]: s for s in await get_json(f"{m.url}/api/services")}
            return got if len(got.get(GEN, {}).get("instances", [])) == 3 and "older" in got else None

        services = await until(both, timeout=5, what="both models")
        gen, old = services[GEN], services["older"]
        st = gen["stats"]
        assert st["instances"] == 3 and st["requests"] == 50 and st["errors"] == 3 and st["error_rate"] == 0.06
        assert st["rate_per_s"] == 0.85 and st["tokens_per_s"] == 26.0 and st["tokens_out"] == 1560
        assert st["latency_p95_ms"] == 3000.0 and st["latency_p50_ms"] == 800.0  # max of p95, median of p50
        assert gen["backpressure_status"]["expected_wait_s"] == 7.5  # the model's: the largest
        a = next(i for i in gen["instances"] if i["worker_id"] == "gen-a")
        assert a["stats"]["latency_p50_ms"] == 800.0 and a["stats"]["instances"] == 1
        assert a["host"]["cpu_percent"] == 42.0 and a["backpressure_status"]["expected_wait_s"] == 4.0
        assert [(r["req_id"], r["state"], r["slot"]) for r in a["slot_requests"]] == [
            ("gen-a-run", "decode", 0), ("gen-a-wait", "waiting", None)]
        assert old["stats"] is None and old["backpressure_status"]["expected_wait_s"] is None
        assert old["instances"][0]["stats"] is None and old["instances"][0]["host"] is None
        assert old["instances"][0]["slot_requests"] == []

        # a report carries the expected wait between heartbeats, and the push goes out within a second
        sent = time.monotonic()
        report = p.BackpressureReport(model_name=GEN, worker_id="gen-b", pending_messages=40, active_processing=1,
                                      queue_capacity=1000, utilization=0.04, status="warning", worker_count=3,
                                      timestamp=time.time(), instance="tok-gen-b", expected_wait_s=33.0)
        await publish(nc, p.monitoring_subject("inference", GEN), p.dumps(report))
        pushed = await until(lambda: [(t, d) for t, d in events.named("service")
                                      if d["backpressure_status"]["expected_wait_s"] == 33.0], timeout=3,
                             what="a service event with the reported wait")
        assert pushed[0][0] - sent < 1.0, f"pushed {pushed[0][0] - sent:.2f} s after the report"
    finally:
        events.close()


async def test_request_events_are_listed_filtered_streamed_and_forgeries_dropped(start_monitor, nc):
    m = await start_monitor(MONITOR_REQUESTS_MAX=5)
    events = SSEReader(m.url)
    try:
        await publish(nc, p.request_event_subject(GEN), request_event("r1"))
        await publish(nc, p.request_event_subject(GEN), request_event(
            "r2", status="failed", error_code="context_overflow", error="failed context_overflow: too long"))
        await publish(nc, p.request_event_subject("nomic-embed-v1.5"), request_event("r3", model="nomic-embed-v1.5"))
        await publish(nc, p.request_event_subject(GEN), b'{"ts": "yesterday", "model_name": "x"}')  # invalid
        await publish(nc, p.request_event_subject(GEN), b"not json")
        huge = request_event("r4", error="x" * 50_000, worker="w" * 5000)  # forged: sizes are bounded on the way in
        await publish(nc, p.request_event_subject(GEN), huge)
        await publish(nc, p.request_event_subject(GEN), request_event("r5", output="y" * 20_000))

        got = await until(lambda: [d for _, d in events.named("request")] if len(events.named("request")) >= 5
                          else None, timeout=5, what="five request events")
        assert [d["req_id"] for d in got] == ["r1", "r2", "r3", "r4", "r5"]
        forged = got[3]
        assert len(forged["error"]) == 1024 and len(forged["worker_id"]) == 256 and len(got[4]["output"]) == 2000
        newest = await get_json(f"{m.url}/api/requests")
        assert [r["req_id"] for r in newest] == ["r5", "r4", "r3", "r2", "r1"]
        assert set(newest[0]) == {"ts", "model_name", "worker_id", "kind", "req_id", "source", "status",
                                  "finish_reason", "error_code", "error", "latency_ms", "queue_ms", "ttft_ms",
                                  "tokens_in", "tokens_out", "trace_id", "input", "output"}
        assert [r["req_id"] for r in await get_json(f"{m.url}/api/requests?model=nomic-embed-v1_5")] == ["r3"]
        failed = await get_json(f"{m.url}/api/requests?status=failed&model={GEN}")
        assert [(r["req_id"], r["error_code"]) for r in failed] == [("r2", "context_overflow")]
        assert [r["req_id"] for r in await get_json(f"{m.url}/api/requests?limit=2")] == ["r5", "r4"]
        health = await get_json(f"{m.url}/healthz")
        assert health["request_events"] == 5 and health["invalid"] == 2, health

        await publish(nc, p.request_event_subject(GEN), request_event("r6"))  # MONITOR_REQUESTS_MAX=5: r1 goes
        await until(lambda: len(events.named("request")) >= 6, timeout=5, what="the sixth event")
        assert [r["req_id"] for r in await get_json(f"{m.url}/api/requests")] == ["r6", "r5", "r4", "r3", "r2"]
        status, _, body = await asyncio.to_thread(fetch, f"{m.url}/api/requests?limit=0")
        assert status == 400 and b"MONITOR_REQUESTS_MAX" in body
    finally:
        events.close()


async def test_history_samples_throughput_latency_and_depth(start_monitor, nc):
    m = await start_monitor()  # MONITOR_HISTORY_INTERVAL=0.5 (monitor_support.FAST)
    for _ in range(6):
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-a", window(0.5, 30, 0, 800, 2000, 15), 1.0))
        await asyncio.sleep(0.3)
    hist = (await get_json(f"{m.url}/api/history"))[GEN]
    assert len(hist["t"]) >= 3 and all(len(hist[k]) == len(hist["t"]) for k in hist)
    assert hist["queue_depth"][-1] == 10 and hist["tokens_per_s"][-1] == 15.0
    assert hist["latency_p50_ms"][-1] == 800.0 and hist["latency_p95_ms"][-1] == 2000.0


def test_uptime_never_goes_backwards_between_and_across_heartbeats():
    reg = Registry(load_settings())

    def beat(uptime: float, now: float, started_at: float = 1_000.0) -> None:
        body = heartbeat_body(GEN, "w", uptime_s=uptime, started_at=started_at, instance="t")
        reg.observe_health(decode_health(json.dumps(body).encode()), now=now)

    def uptime(now: float) -> float:
        entry = reg.service(GEN, now=now)
        assert entry is not None
        return entry.instances[0].uptime

    beat(100.0, now=0.0)
    seen = [uptime(0.0), uptime(5.0)]
    reg.observe_report(p.BackpressureReport(model_name=GEN, worker_id="w", pending_messages=1, active_processing=1,
                                            queue_capacity=8, utilization=0.1, status="healthy", worker_count=1,
                                            timestamp=0.0, instance="t"), now=5.0)
    seen.append(uptime(5.0))  # a report between heartbeats used to pull it back to 100
    beat(103.0, now=6.0)  # a heartbeat sent at 3 s that arrived late
    seen.append(uptime(6.0))
    beat(110.0, now=10.0)
    seen.append(uptime(10.0))
    assert seen == sorted(seen) and seen[-1] == 110.0, seen
    beat(1.0, now=11.0, started_at=2_000.0)  # a new process under the same id starts again from its own uptime
    assert uptime(11.0) == 1.0


async def test_tui_once_shows_window_columns_instances_and_requests(nats_server, nc):
    env = {**os.environ, "NATS_URL": nats_server.url}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "monitor", "tui", "--once", env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    n = 0
    while proc.returncode is None:  # heartbeats and events keep coming while it subscribes and sweeps
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-a", window(0.5, 30, 3, 820, 2400, 15), 12.5))
        await publish(nc, p.heartbeat_subject("older"), heartbeat_body("older", "older-w"))
        await publish(nc, p.request_event_subject(GEN), request_event(
            f"tui-{n}", status="failed", error_code="context_overflow"))
        n += 1
        try:
            await asyncio.wait_for(proc.wait(), 0.05)
        except TimeoutError:
            pass
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert all(col in header for col in ("req/s", "p50/p95", "tok/s", "wait", "err", "up")), header
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert "820ms/2.4s" in rows[GEN] and "15.0" in rows[GEN] and "12.5s" in rows[GEN] and "10%" in rows[GEN], text
    assert "└ gen-a" in text
    words = rows["older"].split()
    assert words[words.index("healthy") + 2:words.index("healthy") + 7] == ["–"] * 5, text  # slots…err: dashes
    assert "requests" in text and "context_overflow" in text and "tui-" in text, text


@pytest.mark.browser
async def test_dashboard_requests_view_stats_queue_bar_charts_at_400px(start_monitor, nc, page, tmp_path: Path):
    m = await start_monitor()
    await page.set_viewport_size({"width": 400, "height": 900})
    await page.goto(m.url + "/")
    await page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=5000)
    for _ in range(4):  # a few history samples (every 0.5 s here) for the charts
        await publish(nc, p.heartbeat_subject(GEN), busy_heartbeat("gen-a", window(0.5, 30, 3, 800, 2000, 15), 4.0,
                                                                   pending=10, capacity=1000))
        await publish(nc, p.heartbeat_subject("older"), heartbeat_body("older", "older-w"))
        await asyncio.sleep(0.6)
    card = page.locator(f'section.card[data-model="{GEN}"]')
    await card.wait_for(timeout=5000)

    # the queue bar: 10 of 1000 is visibly filled, scaled to the recent peak and saying so
    bar = card.locator(".queue .bar")
    await page.wait_for_function(
        f"document.querySelector('section.card[data-model=\"{GEN}\"] .queue .fill').getBoundingClientRect().width"
        " >= 20", timeout=5000)
    assert await bar.get_attribute("data-scale") == "20"
    assert "largest depth" in (await bar.get_attribute("title") or "")

    # window stats per model and per instance; an older worker shows dashes
    stats = card.locator(".model-stats")
    assert "800 ms" in await stats.locator('[data-stat="p50"]').inner_text()
    assert "15" in await stats.locator('[data-stat="tok/s"]').inner_text()
    assert "4 s" in await stats.locator('[data-stat="wait"]').inner_text()
    assert "10%" in await stats.locator('[data-stat="err"]').inner_text()
    assert "cpu 42%" in await card.locator(".inst .host").inner_text()
    assert await card.locator(".slot-req").count() == 2
    assert "decode" in await card.locator('.slot-req[data-req="gen-a-run"]').inner_text()
    older = page.locator('section.card[data-model="older"] .model-stats')
    assert all(t.endswith("–") for t in (await older.locator(".stat").all_inner_texts()))

    # charts have data after a few samples
    for name in ("throughput req/s", "latency ms", "queue depth"):
        chart = card.locator(f'figure.chart[data-chart="{name}"]')
        assert int(await chart.get_attribute("data-points") or 0) >= 2, name
        assert await chart.locator("polyline").count() >= 1, name

    # the Requests view lists a request within a second of its event (timed in the page)
    await page.evaluate("""() => { window.__seen = {}; new MutationObserver(() => {
        for (const tr of document.querySelectorAll('#req-rows tr'))
          if (!(tr.dataset.req in window.__seen)) window.__seen[tr.dataset.req] = Date.now();
      }).observe(document.getElementById('req-rows'), { childList: true }); }""")
    sent = time.time()
    await publish(nc, p.request_event_subject(GEN), request_event("live-1"))
    await page.wait_for_function("window.__seen['live-1'] !== undefined", timeout=3000)
    delay = (await page.evaluate("window.__seen['live-1']")) / 1000 - sent
    print(f"request listed {delay * 1000:.0f} ms after its event")
    assert delay < 1.0, delay
    await publish(nc, p.request_event_subject(GEN), request_event("bad-1", status="failed",
                                                                  error_code="context_overflow"))
    await publish(nc, p.request_event_subject("older"), request_event("emb-1", model="older", worker="older-w"))
    await page.wait_for_function("document.querySelectorAll('#req-rows tr').length === 3", timeout=3000)
    row = page.locator('#req-rows tr[data-req="bad-1"]')
    assert "context_overflow" in await row.inner_text() and "12 / 34" in await row.inner_text()
    await page.select_option("#f-status", "failed")
    assert await page.locator("#req-rows tr").evaluate_all("rs => rs.map(r => r.dataset.req)") == ["bad-1"]
    await page.select_option("#f-status", "")
    await page.select_option("#f-model", "older")
    assert await page.locator("#req-rows tr").evaluate_all("rs => rs.map(r => r.dataset.req)") == ["emb-1"]
    await page.select_option("#f-model", "")
    assert await page.locator("#req-rows tr").evaluate_all("rs => rs.map(r => r.dataset.req)") == [
        "emb-1", "bad-1", "live-1"]

    width = await page.evaluate("document.scrollingElement.scrollWidth")
    await page.screenshot(path=str(tmp_path / "dashboard-400.png"), full_page=True)
    assert width <= 400, width
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.screenshot(path=str(tmp_path / "dashboard-1280.png"), full_page=True)
    assert page.errors == []
