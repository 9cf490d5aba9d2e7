"""The monitor against a real nats-server, real workers and a real `python -m monitor` process."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from .monitor_support import (
    SSEReader,
    fetch,
    get_json,
    start_monitor_fixture,  # noqa: F401 - the start_monitor fixture
    until,
)


def by_name(services: list[dict]) -> dict[str, dict]:
    return {s["model_name"]: s for s in services}


@pytest.mark.model
async def test_running_fleet_is_listed_within_two_seconds_of_start(start_worker, start_monitor):
    # a long heartbeat interval: the monitor must find them by its sweep, not by waiting for a beat
    a = await start_worker(HEARTBEAT_INTERVAL=60)
    b = await start_worker(MODEL_NAME="gemma3-embed-v1.5", MODEL_KIND="embedding", HEARTBEAT_INTERVAL=60)
    m = await start_monitor(wait=False)

    async def both() -> dict[str, dict] | None:
        try:
            got = by_name(await get_json(f"{m.url}/api/services"))
        except (OSError, AssertionError):
            return None
        return got if {"gemma3-270m", "gemma3-embed-v1.5"} <= got.keys() else None

    services = await until(both, timeout=10, what="both models in /api/services")
    elapsed = time.monotonic() - m.spawned_at
    print(f"fleet listed {elapsed:.2f} s after the monitor process was spawned")
    assert elapsed < 2.0, f"the fleet took {elapsed:.2f} s to show (process start included)"
    gen, emb = services["gemma3-270m"], services["gemma3-embed-v1.5"]
    assert gen["status"] == emb["status"] == "online"
    assert gen["instances"][0]["worker_id"].endswith(f"-{a.proc.pid}")
    assert emb["instances"][0]["worker_id"].endswith(f"-{b.proc.pid}")
    assert "text-generation" in gen["capabilities"] and emb["capabilities"] == ["embeddings"]
    assert gen["model_info"]["quantization"] == "Q4_K_M" and emb["nats_topic"] == "embedding.request.gemma3-embed-v1.5"
    assert set(gen) >= {"model_name", "status", "capabilities", "model_info", "queue_metrics", "backpressure_status",
                        "first_seen", "uptime", "instances"}
    health = await get_json(f"{m.url}/healthz")
    assert health["heartbeats"] == 0 and health["health_replies"] >= 2, health
    # the dotted name answers as written and as its subject token; unknown models are a 404
    for name in ("gemma3-embed-v1.5", "gemma3-embed-v1_5"):
        assert (await get_json(f"{m.url}/api/services/{name}"))["model_name"] == "gemma3-embed-v1.5"
    status, _, body = await asyncio.to_thread(fetch, f"{m.url}/api/services/no-such-model")
    assert status == 404 and b"no-such-model" in body


@pytest.mark.model
async def test_two_instances_of_one_model_are_one_model_with_two_instances(start_worker, start_monitor):
    a = await start_worker(WORKER_CONCURRENCY=1)
    b = await start_worker(WORKER_CONCURRENCY=1)
    m = await start_monitor()
    entry = await until(lambda: _instances(m.url, "gemma3-270m", 2), timeout=5, what="two instances")
    services = await get_json(f"{m.url}/api/services")
    assert [s["model_name"] for s in services] == ["gemma3-270m"]
    assert entry["instance_count"] == entry["online_count"] == 2
    pids = sorted(int(i["worker_id"].rsplit("-", 1)[1]) for i in entry["instances"])
    assert pids == sorted([a.proc.pid, b.proc.pid])


async def _instances(url: str, model: str, n: int) -> dict | None:
    status, _, body = await asyncio.to_thread(fetch, f"{url}/api/services/{model}")
    entry = json.loads(body) if status == 200 else None
    return entry if entry and entry["instance_count"] == n else None


@pytest.mark.model
async def test_killed_worker_goes_stale_after_1x_and_offline_after_2x_its_interval_and_the_stream_says_so(
        start_worker, start_monitor, nc):
    """Timed on the worker's and the monitor's own clocks (the heartbeat's started_at + uptime_s, the report's
    timestamp, the status event's `at`), not on when this test got round to reading them: no sooner than the
    rule says, and online -> stale -> offline in that order. How late a busy machine makes it is not asserted."""
    made: list[float] = []  # epoch seconds each heartbeat or report was made, by the worker's clock

    async def heard(msg) -> None:
        body = json.loads(msg.data)
        made.append(body["timestamp"] if "timestamp" in body else body["started_at"] + body["uptime_s"])

    await nc.subscribe("models.gemma3-270m.heartbeat", cb=heard)
    await nc.subscribe("monitoring.inference.gemma3-270m", cb=heard)
    w = await start_worker(HEARTBEAT_INTERVAL=1)
    m = await start_monitor()
    sse = await asyncio.to_thread(SSEReader, m.url)
    try:
        await until(lambda: sse.named("snapshot"), timeout=5, what="the snapshot event")
        await until(lambda: _instances(m.url, "gemma3-270m", 1), timeout=5, what="the worker")
        await asyncio.sleep(1.2)  # a beat or so in steady state
        w.kill()
        t_kill = time.monotonic()
        stale = await until(lambda: _event(sse, "stale", t_kill), timeout=15, what="a stale status event")
        offline = await until(lambda: _event(sse, "offline", t_kill), timeout=15, what="an offline status event")
        last = max(made)  # the dead worker's last word (delivered long before the offline event)
        # stale after 1x the interval + MONITOR_STALE_GRACE (0.2), offline after 2x; 0.01 s for uptime_s's rounding
        assert stale["from"] == "online" and stale["at"] - last >= 1.2 - 0.01, (stale, last)
        assert offline["from"] == "stale" and offline["at"] - last >= 2.0 - 0.01, (offline, last)
        assert offline["at"] > stale["at"]

        def latest_offline() -> bool:  # the model's entry follows its status event in the same tick
            updates = [d for _, d in sse.named("service") if d["model_name"] == "gemma3-270m"]
            return bool(updates) and updates[-1]["status"] == "offline" and \
                updates[-1]["instances"][0]["status"] == "offline"

        await until(latest_offline, timeout=5, what="an offline service entry after the status event")
    finally:
        sse.close()


def _event(sse: SSEReader, to: str, after: float) -> dict | None:
    """The first status event of the model to `to` that this test read after `after` (monotonic)."""
    return next((d for t, d in sse.named("status") if t > after and d["model_name"] == "gemma3-270m" and d["to"] == to),
                None)


def _change(sse: SSEReader, to: str, after: float = 0.0) -> float | None:
    return next((t for t, d in sse.named("status")
                 if t > after and d["model_name"] == "gemma3-270m" and d["to"] == to), None)


@pytest.mark.model
async def test_a_worker_that_stops_cleanly_is_offline_at_once(start_worker, start_monitor):
    w = await start_worker()  # heartbeat interval 10 s: waiting for 2x would take 20 s
    m = await start_monitor()
    sse = await asyncio.to_thread(SSEReader, m.url)
    try:
        await until(lambda: _instances(m.url, "gemma3-270m", 1), timeout=5, what="the worker")
        w.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        offline = await until(lambda: _change(sse, "offline"), timeout=10, what="an offline status event")
        assert offline - t0 < 5.0
        assert not any(d["to"] == "stale" for _, d in sse.named("status"))
        entry = await get_json(f"{m.url}/api/services/gemma3-270m")
        assert entry["status"] == "offline" and entry["instances"][0]["worker_status"] == "stopping"
    finally:
        sse.close()


async def test_event_stream_starts_with_a_snapshot_pings_and_forgets_closed_clients(start_monitor):
    m = await start_monitor(MONITOR_SSE_PING=0.3)
    sse = await asyncio.to_thread(SSEReader, m.url)
    await until(lambda: sse.events and sse.comments, timeout=5, what="a snapshot and a keep-alive")
    assert sse.events[0][1] == "snapshot" and sse.events[0][2]["nats_connected"] is True
    assert (await get_json(f"{m.url}/healthz"))["sse_clients"] == 1
    await asyncio.to_thread(sse.close)

    async def gone() -> bool:
        return (await get_json(f"{m.url}/healthz"))["sse_clients"] == 0

    await until(gone, timeout=5, what="the listener to be removed")


async def test_token_guards_dashboard_api_and_metrics(start_monitor):
    m = await start_monitor(MONITOR_TOKEN="s3cret")
    for path in ("/api/services", "/api/services/x", "/api/events", "/metrics"):
        status, headers, _ = await asyncio.to_thread(fetch, m.url + path)
        assert status == 401 and headers.get("www-authenticate") == "Bearer", path
    status, _, body = await asyncio.to_thread(fetch, m.url + "/")
    assert status == 401 and b'name="token"' in body and b"Fleet monitor" in body
    ok = await get_json(f"{m.url}/api/services", headers={"Authorization": "Bearer s3cret"})
    assert ok == []
    status, _, _ = await asyncio.to_thread(fetch, m.url + "/login", "POST", b"token=wrong")
    assert status == 401
    status, headers, _ = await asyncio.to_thread(fetch, m.url + "/login", "POST", b"token=s3cret")
    assert status == 303 and "httponly" in headers["set-cookie"].lower()
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, body = await asyncio.to_thread(fetch, m.url + "/", headers={"Cookie": cookie})
    assert status == 200 and b"/static/app.js" in body
    status, _, _ = await asyncio.to_thread(fetch, m.url + "/healthz")
    assert status == 200


@pytest.mark.model
async def test_a_real_request_is_listed_within_a_second_of_its_reply_with_its_worker_stats(
        start_worker, start_monitor, nc):
    """End to end: a real worker's request event reaches the monitor's Requests view within 1 s of the reply, and
    its next heartbeat's window stats (rate, latency, tokens/s) reach /api/services."""
    w = await start_worker(HEARTBEAT_INTERVAL=1)
    m = await start_monitor()
    await until(lambda: _listed(m.url, "gemma3-270m"), timeout=10, what="the worker in /api/services")
    body = {"req_id": "e2e-1", "input": "Say hello.", "params": {"max_tokens": 8, "temperature": 0}}
    reply = json.loads((await nc.request("inference.request.gemma3-270m", json.dumps(body).encode(), timeout=60)).data)
    answered = time.monotonic()
    assert reply["tokens_out"] > 0, reply

    async def listed() -> dict | None:
        rows = await get_json(f"{m.url}/api/requests?model=gemma3-270m")
        return next((r for r in rows if r["req_id"] == "e2e-1"), None)

    row = await until(listed, timeout=5, interval=0.02, what="e2e-1 in /api/requests")
    took = time.monotonic() - answered
    assert took < 1.0, f"listed {took:.2f} s after the reply"
    assert row["status"] == "ok" and row["worker_id"] == reply["worker_id"] and row["tokens_out"] == reply["tokens_out"]
    assert row.get("input") is None  # no prompt text without LOG_PROMPTS

    async def stats() -> dict | None:
        inst = (await get_json(f"{m.url}/api/services/gemma3-270m"))["instances"][0]
        s = inst.get("stats") or {}
        return inst if s.get("requests", 0) >= 1 and s.get("latency_p50_ms") else None

    inst = await until(stats, timeout=10, what="window stats in the instance")
    assert inst["stats"]["tokens_out"] == reply["tokens_out"] and inst["stats"]["errors"] == 0
    assert inst["host"]["memory_total_mb"] > 0 and w.proc.poll() is None


async def _listed(url: str, model: str) -> bool:
    try:
        return any(s["model_name"] == model for s in await get_json(f"{url}/api/services"))
    except (OSError, AssertionError):
        return False
