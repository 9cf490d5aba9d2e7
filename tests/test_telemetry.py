"""Health, heartbeats, backpressure reports, the NATS service API and /metrics, all with true numbers."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from workers.ops import broker

from .conftest import ask, send_many

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

SUBJECT = "inference.request.gemma3-270m"
LONG = {"input": "Write a long story about a dragon and a knight.", "params": {"max_tokens": 200, "temperature": 0}}


async def listen(nc: nats.NATS, subject: str) -> tuple[list[tuple[float, dict]], object]:
    got: list[tuple[float, dict]] = []

    async def cb(msg):
        got.append((time.monotonic(), json.loads(msg.data)))

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got, sub


async def test_health_answers_while_every_slot_generates(start_worker, nc):
    """Health is not stuck behind generation: five replies, each saying both slots are busy, all before either
    generation ends. (How fast it answers is `make bench`'s business, not a bound here.)"""
    await start_worker(WORKER_CONCURRENCY=2)
    busy = [asyncio.create_task(nc.request(SUBJECT, json.dumps(LONG | {"req_id": f"busy-{i}"}).encode(), timeout=300))
            for i in range(2)]
    bodies: list[dict] = []
    deadline = time.monotonic() + 60
    while len(bodies) < 5:
        assert time.monotonic() < deadline and not any(t.done() for t in busy), bodies
        body = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=30)).data)
        if body["queue_metrics"]["active_processing"] == 2 or bodies:  # from when both slots are running
            bodies.append(body)
        await asyncio.sleep(0.1)
    assert not any(t.done() for t in busy), "a generation ended before the five health replies"
    assert all(b["queue_metrics"]["active_processing"] == 2 for b in bodies), bodies
    assert bodies[0]["status"] == "online" and bodies[0]["model_info"]["quantization"] == "Q4_K_M"
    for i, t in enumerate(busy):
        await nc.publish("inference.cancel.gemma3-270m", json.dumps({"req_id": f"busy-{i}"}).encode())
        assert json.loads((await t).data)["finish_reason"] == "cancelled"


async def test_heartbeats_start_at_once_count_up_and_say_stopping(start_worker, nc):
    got, _ = await listen(nc, "models.gemma3-270m.heartbeat")
    t0 = time.monotonic()
    w = await start_worker(wait=False, HEARTBEAT_INTERVAL=0.5)
    while not any(b["status"] == "online" for _, b in got) and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.05)
    assert got, "no heartbeat within 60 s of start"
    # at once: the worker's very first beat goes out before the model is loaded (no slots yet), an order, not a time
    first = got[0][1]
    assert (first["seq"], first["status"], first["queue_metrics"].get("slots")) == (1, "starting", None), first
    await asyncio.sleep(1.5)  # three beats online
    assert await asyncio.to_thread(w.terminate, 30) == 0
    await asyncio.sleep(0.3)
    bodies = [b for _, b in got]
    seqs = [b["seq"] for b in bodies]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and len(seqs) >= 4
    assert "online" in [b["status"] for b in bodies] and bodies[-1]["status"] == "stopping"
    online = next(b for b in bodies if b["status"] == "online")
    assert online["queue_metrics"].get("slots") is not None  # loaded
    assert online["heartbeat_interval_s"] == 0.5 and online["uptime_s"] > 0 and online["worker_id"].endswith(
        f"-{w.proc.pid}")
    assert online["capabilities"] == ["text-generation", "grammar-constrained"]
    assert online["model_info"]["architecture"] == "gemma3"


async def test_backpressure_reports_the_jetstream_queue(start_worker, nc):
    await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_PER_MODEL=16)
    got, _ = await listen(nc, "monitoring.inference.gemma3-270m")
    health = json.loads((await nc.request("models.gemma3-270m.health", b"", timeout=5)).data)
    subs = await send_many(nc, 13, 24, "bp")
    deadline = time.monotonic() + 10
    while not any(r["pending_messages"] >= 10 for _, r in got) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    busy = next(r for _, r in got if r["pending_messages"] >= 10)
    assert busy["instance"] == health["instance"]  # the monitor drops reports from another instance
    assert busy["status"] in ("warning", "critical") and busy["queue_capacity"] == 16
    assert busy["utilization"] == round(busy["pending_messages"] / 16, 4) and busy["active_processing"] == 1
    await asyncio.sleep(3.5)
    busy_times = [t for t, r in got if r["pending_messages"] > 0]
    gaps = [b - a for a, b in zip(busy_times, busy_times[1:], strict=False)]
    assert len(gaps) >= 3 and max(gaps) < 2.0, f"busy reports should come about every second: {gaps}"
    for s in subs:
        await s.next_msg(timeout=120)
    mark = len(got)
    await asyncio.sleep(21)
    idle = got[mark:]
    assert idle and all(r["status"] == "healthy" and r["pending_messages"] == 0 for _, r in idle)
    idle_gaps = [b - a for (a, _), (b, _) in zip(idle, idle[1:], strict=False)]
    assert idle_gaps and all(g > 8 for g in idle_gaps), idle_gaps


async def test_two_instances_report_the_same_depth(start_worker, nc):
    a = await start_worker(WORKER_CONCURRENCY=1)
    b = await start_worker(WORKER_CONCURRENCY=1)
    for _ in range(8):
        await nc.publish(SUBJECT, json.dumps(LONG).encode(), reply=nc.new_inbox())
    await asyncio.sleep(2.5)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("models.gemma3-270m.health", b"", reply=inbox)
    replies = [json.loads((await sub.next_msg(timeout=2)).data) for _ in range(2)]
    assert {r["worker_id"] for r in replies} == {r_id(a), r_id(b)}
    depths = [r["queue_metrics"]["pending_messages"] for r in replies]
    assert depths[0] == depths[1] and depths[0] >= 6, depths


async def test_service_api_lists_each_instance_and_counts_requests(start_worker, nc):
    a = await start_worker()
    b = await start_worker()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING", b"", reply=inbox)
    pings = []
    while True:
        try:
            pings.append(json.loads((await sub.next_msg(timeout=0.5)).data))
        except nats.errors.TimeoutError:
            break
    assert len(pings) == 2
    assert {p["metadata"]["worker_id"] for p in pings} == {r_id(a), r_id(b)}
    assert all(p["metadata"]["model"] == "gemma3-270m" and p["metadata"]["kind"] == "inference" for p in pings)
    info = json.loads((await nc.request(f"$SRV.INFO.gemma3-270m.{pings[0]['id']}", b"", timeout=2)).data)
    assert info["endpoints"][0]["subject"] == SUBJECT
    await ask(nc, SUBJECT, {"input": "Hi", "params": {"max_tokens": 3}})
    total = 0
    for ping in pings:
        stats = json.loads((await nc.request(f"$SRV.STATS.gemma3-270m.{ping['id']}", b"", timeout=2)).data)
        ep = stats["endpoints"][0]
        total += ep["num_requests"]
        assert set(ep["data"]) >= {"queue_depth", "processed", "failed"}
    assert total == 1


async def test_metrics_parse_and_move(start_worker, nc):
    port = broker.free_port()
    await start_worker(HTTP_ADDR=f"127.0.0.1:{port}")

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = await asyncio.to_thread(scrape)
    assert before["llm_worker_ready[('model', 'gemma3-270m')]"] == 1.0
    assert before["llm_model_load_seconds[('model', 'gemma3-270m')]"] > 0
    out = await ask(nc, SUBJECT, {"input": "Hi", "params": {"max_tokens": 4, "temperature": 0}})
    await asyncio.sleep(0.2)
    after = await asyncio.to_thread(scrape)
    key = "[('model', 'gemma3-270m')]"
    assert after["llm_generation_tokens_total" + key] == out["tokens_out"]
    assert after["llm_prompt_tokens_total" + key] == out["tokens_in"]
    ok = f"llm_requests_total[('finish_reason', '{out['finish_reason']}'), ('model', 'gemma3-270m'), ('status', 'ok')]"
    assert after[ok] == 1.0
    assert after["llm_e2e_request_latency_seconds_count" + key] == 1.0
    assert after["llm_time_to_first_token_seconds_count" + key] == 1.0
    ready = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").status)
    assert ready == 200


def r_id(w) -> str:
    import socket

    return f"{w.model}-{socket.gethostname()}-{w.proc.pid}"
