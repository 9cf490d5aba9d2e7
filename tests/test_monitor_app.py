"""The monitor's web app in-process, over a registry fed by hand on a synthetic clock.

No NATS server, no model, no browser: `create_app(..., feed=False)` serves the registry as the test feeds it, and
requests go straight into the ASGI app. The same views against a real fleet are in test_monitor.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Message, Scope

from monitor.config import MonitorSettings, load_settings
from monitor.registry import Registry
from monitor.shapes import ServiceEntry
from monitor.web import create_app
from workers import protocol as p

GEN, EMB = "gemma3-270m", "nomic-embed-v1.5"
SERVICE_KEYS = ["model_name", "token", "kind", "status", "capabilities", "model_info", "endpoint", "nats_topic",
                "version", "queue_metrics", "backpressure_status", "slots", "requests_per_s", "stats", "first_seen",
                "last_seen", "uptime", "instance_count", "online_count", "instances", "alerts", "history"]
INSTANCE_KEYS = ["worker_id", "status", "worker_status", "endpoint", "version", "first_seen", "last_seen", "age_s",
                 "uptime", "started_at", "heartbeat_interval_s", "seq", "queue_metrics", "backpressure_status",
                 "slots", "requests_per_s", "stats", "host", "slot_requests", "confirmed", "alerts"]
MakeApp = Callable[..., tuple[Starlette, Registry]]
QUEUE_KEYS = ["pending_messages", "active_processing", "queue_capacity", "total_processed", "total_failed",
              "last_processed_at"]


class Clock:
    """The registry's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def health(worker_id: str, model: str = GEN, *, kind: p.Kind = "inference", status: p.WorkerStatus = "online",
           pending: int = 0, active: int = 0, capacity: int = 10, processed: int = 0, interval: float = 2.0,
           capabilities: tuple[str, ...] = ("text-generation",), endpoint: str | None = None) -> p.Health:
    utilization = pending / capacity
    return p.Health(
        model_name=model, worker_id=worker_id, kind=kind, status=status, capabilities=list(capabilities),
        endpoint=endpoint, nats_topic=p.request_subject(kind, model), version="0.1.0",
        model_info={"architecture": "gemma3", "quantization": "Q4_K_M"},
        queue_metrics=p.QueueMetrics(pending_messages=pending, active_processing=active, queue_capacity=capacity,
                                     total_processed=processed, total_failed=0),
        backpressure_status=p.Backpressure(level=p.backpressure_level(utilization), utilization=utilization),
        started_at=1_700_000_000.0, uptime_s=5.0, heartbeat_interval_s=interval, seq=1,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_app(clock: Clock) -> MakeApp:
    """`make_app(MONITOR_TOKEN=...)`: an app that connects to nothing, and the registry it serves."""

    def make(**overrides: Any) -> tuple[Starlette, Registry]:
        settings: MonitorSettings = load_settings(**{"monitor_token": "", **overrides})
        registry = Registry(settings, clock=clock)
        return create_app(settings, registry, feed=False), registry

    return make


async def get(app: Starlette, path: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
        return await client.get(path, headers=headers)


def fleet(registry: Registry, clock: Clock) -> None:
    """Two instances of a generator (one busy, one with an HTTP endpoint) and one embedder with a dotted name."""
    registry.observe_health(health("gen-b", pending=4, active=2, capabilities=("text-generation", "tool-calling")))
    registry.observe_health(health("gen-a", pending=3, active=1, endpoint="http://127.0.0.1:8001"))
    registry.observe_health(health(
        "emb-1", EMB, kind="embedding", capabilities=("embeddings",), capacity=4))
    clock.t += 0.5
    # the freshest numbers stand for the model: JetStream's depth is the same for every replica
    registry.observe_report(p.BackpressureReport(
        model_name=GEN, worker_id="gen-b", pending_messages=9, active_processing=3, queue_capacity=10,
        utilization=0.9, status="critical", worker_count=2, timestamp=0.0))


async def test_services_lists_one_entry_per_model_with_its_instances(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app()
    fleet(registry, clock)
    resp = await get(app, "/api/services")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    services = resp.json()
    assert [s["model_name"] for s in services] == [GEN, EMB]
    gen, emb = services
    assert list(gen) == SERVICE_KEYS and list(gen["queue_metrics"]) == QUEUE_KEYS
    assert gen["token"] == GEN and emb["token"] == "nomic-embed-v1_5" and emb["kind"] == "embedding"
    assert gen["status"] == "online" and gen["instance_count"] == gen["online_count"] == 2
    assert gen["capabilities"] == ["text-generation", "tool-calling"]
    assert gen["endpoint"] == "http://127.0.0.1:8001" and gen["nats_topic"] == "inference.request.gemma3-270m"
    assert gen["queue_metrics"] == {"pending_messages": 9, "active_processing": 4, "queue_capacity": 10,
                                    "total_processed": 0, "total_failed": 0, "last_processed_at": None}
    assert gen["backpressure_status"] == {"level": "critical", "utilization": 0.9, "expected_wait_s": None}

    a, b = gen["instances"]
    assert [a["worker_id"], b["worker_id"]] == ["gen-a", "gen-b"]
    assert list(a) == INSTANCE_KEYS and list(a["queue_metrics"]) == QUEUE_KEYS
    assert a["status"] == "online" and a["worker_status"] == "online" and a["age_s"] == 0.5
    assert a["queue_metrics"]["pending_messages"] == 3 and a["backpressure_status"] == {
        "level": "healthy", "utilization": 0.3, "expected_wait_s": None}
    assert b["queue_metrics"]["pending_messages"] == 9 and b["queue_metrics"]["active_processing"] == 3
    assert b["age_s"] == 0.0 and b["backpressure_status"]["level"] == "critical"
    assert emb["queue_metrics"]["queue_capacity"] == 4 and emb["instances"][0]["endpoint"] is None
    assert [ServiceEntry.model_validate(s).model_dump(mode="json") for s in services] == services  # as documented


async def test_one_model_by_name_or_token_and_404_names_the_known_ones(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app()
    fleet(registry, clock)
    for path in (EMB, "nomic-embed-v1_5"):
        resp = await get(app, f"/api/services/{path}")
        assert resp.status_code == 200 and resp.json()["model_name"] == EMB, path
    assert (await get(app, f"/api/services/{GEN}")).json() == (await get(app, "/api/services")).json()[0]
    missing = await get(app, "/api/services/no-such-model")
    assert missing.status_code == 404
    assert missing.json() == {"error": f"no model named 'no-such-model' is known; known: {GEN}, {EMB}"}


async def test_token_guards_the_api_and_leaves_healthz_open(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app(monitor_token="s3cret")
    registry.nats_connected = True
    fleet(registry, clock)
    for path in ("/api/services", f"/api/services/{GEN}", "/api/events", "/metrics"):
        resp = await get(app, path)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", path
    assert (await get(app, "/api/services", authorization="Bearer wrong")).status_code == 401
    ok = await get(app, "/api/services", authorization="Bearer s3cret")
    assert ok.status_code == 200 and len(ok.json()) == 2
    assert (await get(app, "/healthz")).status_code == 200


async def test_healthz_is_503_while_nats_is_not_connected(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app()
    fleet(registry, clock)
    down = await get(app, "/healthz")
    assert down.status_code == 503
    assert down.json() == {"status": "degraded", "nats_connected": False, "heartbeats": 0, "reports": 0,
                           "request_events": 0, "health_replies": 0, "invalid": 0, "oversized": 0, "foreign": 0,
                           "evicted": 0, "purged": 0,
                           "instances": 3, "models": 2, "sse_clients": 0}
    registry.nats_connected = True
    up = await get(app, "/healthz")
    assert up.status_code == 200 and up.json()["status"] == "ok"


async def test_instance_is_stale_after_its_interval_and_offline_after_two(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app()  # MONITOR_STALE_GRACE 0.2: stale after 2.4 s of silence at a 2 s interval
    registry.observe_health(health("gen-a", interval=2.0))
    registry.observe_health(health("gen-b", interval=60.0))

    async def instance() -> dict[str, Any]:
        registry.tick()
        entry = (await get(app, f"/api/services/{GEN}")).json()
        return next(i for i in entry["instances"] if i["worker_id"] == "gen-a")

    clock.t += 2.3
    assert (await instance())["status"] == "online"
    clock.t += 0.2
    assert (await instance())["status"] == "stale"
    clock.t += 1.4
    assert (await instance())["status"] == "stale"
    clock.t += 0.2
    gone = await instance()
    assert gone["status"] == "offline" and gone["age_s"] == 4.1
    entry = (await get(app, f"/api/services/{GEN}")).json()
    assert entry["status"] == "online" and entry["online_count"] == 1 and entry["instance_count"] == 2
    registry.observe_health(health("gen-a", interval=2.0))  # a heartbeat brings it back
    assert (await instance())["status"] == "online"


async def test_event_stream_opens_with_a_snapshot_and_forgets_the_client(make_app: MakeApp, clock: Clock) -> None:
    app, registry = make_app()
    registry.nats_connected = True
    fleet(registry, clock)
    status, first = await first_chunk(app, "/api/events")
    assert status == 200
    fields = dict(line.split(": ", 1) for line in first.decode().strip().splitlines())
    assert fields["event"] == "snapshot" and fields["retry"] == "2000"
    snapshot = json.loads(fields["data"])
    assert list(snapshot) == ["at", "nats_connected", "services", "requests"] and snapshot["nats_connected"] is True
    assert snapshot["services"] == (await get(app, "/api/services")).json()
    assert not registry.listeners


async def first_chunk(app: Starlette, path: str) -> tuple[int, bytes]:
    """GET a streaming response through the raw ASGI interface, take its first body chunk, then hang up.

    (httpx's ASGITransport and starlette's TestClient wait for the whole body, which an event stream never ends.)
    """
    disconnect = asyncio.Event()
    got_body = asyncio.Event()
    sent: list[Message] = []
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got_body.set()

    scope: Scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                    "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                    "headers": [], "client": ("127.0.0.1", 50000), "server": ("monitor", 80)}
    served = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(got_body.wait(), timeout=5)
    finally:
        disconnect.set()
        await asyncio.wait_for(served, timeout=5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = next(m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body"))
    return start["status"], body
