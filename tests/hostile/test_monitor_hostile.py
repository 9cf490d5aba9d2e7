"""The monitor against a hostile bus: forged heartbeats, escape-laden strings, floods and token guessing.

Real nats-server and a real `python -m monitor`; the forgers are real NATS clients (nats-py) publishing what any
client on the bus could, and the flood test keeps a real worker process in the fleet.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from rich.console import Console

from monitor import tui
from monitor.config import load_settings
from monitor.registry import Registry, decode_health
from workers import protocol as p
from workers.config import ROOT

from ..monitor_support import (
    SSEReader,
    fetch,
    fetch_from,
    get_json,
    heartbeat_body,
    page_fixture,  # noqa: F401 - the page fixture
    start_monitor_fixture,  # noqa: F401 - the start_monitor fixture
    until,
)

# An OSC title change (BEL-terminated), a screen clear, a C1 CSI, a bidi override, a NUL and a tab.
EVIL = "evil\x1b]0;pwned\x07-model\x1b[2J\x9b31m\u202e\x00\tx"
CLEAN = "evil-model x"
ALERT = {"ts": 0.0, "kind": "stream.recreated", "level": "warning",
         "message": "the request stream was deleted\x1b[2J; recreated it with the configured settings"}


def controls(obj: Any) -> list[str]:
    """Every string in `obj` (keys too) holding a control character, escape or bidi override."""
    bad: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if any(ord(c) < 32 or 127 <= ord(c) < 160 or 0x202A <= ord(c) <= 0x202E for c in x):
                bad.append(x)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)

    walk(obj)
    return bad


def evil_body(**fields: Any) -> dict[str, Any]:
    return heartbeat_body(EVIL, f"w-{EVIL}", capabilities=["text-generation", f"tool{EVIL}"],
                          endpoint=f"http://{EVIL}", version=f"0{EVIL}", instance=f"i{EVIL}",
                          model_info={"architecture": EVIL, f"k{EVIL}": [EVIL]},
                          alerts=[{**ALERT, "ts": time.time()}], **fields)


class Impostor:
    """A real NATS client that poses as a worker: it answers `$SRV.PING` (naming model `token`) and that model's
    health requests with `body`, as any client on the bus can."""

    def __init__(self, nc: Any, token: str, body: dict[str, Any]) -> None:
        self.nc, self.token, self.body = nc, token, body

    async def start(self) -> None:
        async def ping(msg: Any) -> None:
            await msg.respond(json.dumps({"name": "fleet-worker", "id": uuid.uuid4().hex, "metadata": {
                "model": self.token, "worker_id": "impostor"}}).encode())

        async def health(msg: Any) -> None:
            await msg.respond(json.dumps(self.body).encode())

        await self.nc.subscribe("$SRV.PING", cb=ping)
        await self.nc.subscribe(f"models.{self.token}.health", cb=health)
        await self.nc.flush()


async def test_escapes_in_heartbeats_reach_rest_and_sse_clean(start_monitor, nc):
    m = await start_monitor()
    sse = await asyncio.to_thread(SSEReader, m.url)
    try:
        await until(lambda: sse.named("snapshot"), timeout=5, what="the snapshot")
        # a lone surrogate once made every later /api/services a 500 (UTF-8 cannot encode it): dropped instead
        await nc.publish("models.x.heartbeat", b'{"model_name": "a\\ud800", "worker_id": "s"}')
        await nc.publish("models.evil.heartbeat", json.dumps(evil_body()).encode())
        await nc.publish("models.long.heartbeat", json.dumps(heartbeat_body("long", "w" * 10_000)).encode())
        await nc.flush()

        async def listed() -> list[dict] | None:
            got = await get_json(f"{m.url}/api/services")
            return got if len(got) == 2 else None

        services = {s["model_name"]: s for s in await until(listed, timeout=5, what="two models")}
        assert set(services) == {CLEAN, "long"}, list(services)
        evil = services[CLEAN]
        assert controls(services) == [], controls(services)
        inst = evil["instances"][0]
        assert inst["worker_id"] == f"w-{CLEAN}" and evil["endpoint"] == f"http://{CLEAN}"
        assert evil["capabilities"] == ["text-generation", f"tool{CLEAN}"]
        assert evil["model_info"] == {"architecture": CLEAN, f"k{CLEAN}": [CLEAN]}
        assert inst["alerts"][0]["message"] == ALERT["message"].replace("\x1b[2J", "")
        assert len(services["long"]["instances"][0]["worker_id"]) == 256  # names are capped
        health = await get_json(f"{m.url}/healthz")
        assert health["invalid"] == 1 and health["heartbeats"] == 2, health

        event = await until(lambda: [d for _, d in sse.named("service") if d["model_name"] == CLEAN], timeout=5,
                            what="the service event")
        assert controls(event) == [] and event[-1]["instances"][0]["worker_id"] == f"w-{CLEAN}"
    finally:
        sse.close()


async def test_escapes_never_reach_the_terminal(nats_server, nc):
    """The TUI is fed by a health reply from an impostor whose strings hold terminal escapes."""
    await Impostor(nc, "evil", evil_body()).start()
    settings = load_settings(nats_url=nats_server.url)
    registry = await tui.snapshot(settings)
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="truecolor", width=220).print(
        tui.screen(registry, settings, sort="m", reverse=False))
    text = out.getvalue()
    assert CLEAN in text and "stream.recreated" in text and "recreated it with the configured settings" in text
    for bad in ("\x1b]", "\x1b[2J", "\x07", "\x9b", "\u202e", "\x00", "pwned"):
        assert bad not in text, repr(bad)
    assert [s.model_name for s in registry.services()] == [CLEAN]

    env = {**os.environ, "NATS_URL": nats_server.url}
    once = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "monitor", "tui", "--once"], env=env,
                                   cwd=ROOT, capture_output=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert CLEAN.encode() in once.stdout and b"stream.recreated" in once.stdout
    assert b"\x1b" not in once.stdout and b"\x07" not in once.stdout and b"pwned" not in once.stdout


async def test_forged_stopping_from_another_instance_leaves_the_worker_online(start_monitor, nc):
    """The genuine worker here is a NATS client sending a worker's heartbeats with its instance token."""
    m = await start_monitor()
    real = heartbeat_body("m", "w1", instance="genuine-token")

    async def beat(body: dict[str, Any], marker: int) -> None:
        await nc.publish("models.m.heartbeat", json.dumps(body).encode())
        # the monitor takes one connection's messages in order: once the marker shows, the body was handled
        await nc.publish("models.marker.heartbeat", json.dumps(heartbeat_body("marker", f"mk{marker}")).encode())
        await nc.flush()
        await until(lambda: _instances(m.url, "marker", marker), timeout=5, what=f"marker {marker}")

    await beat(real, 1)
    await beat({**real, "status": "stopping", "instance": "forged-token"}, 2)
    await beat({k: v for k, v in real.items() if k != "instance"} | {"status": "stopping"}, 3)  # no token at all
    entry = await get_json(f"{m.url}/api/services/m")
    assert entry["status"] == "online" and entry["instances"][0]["worker_status"] == "online", entry
    health = await get_json(f"{m.url}/healthz")
    assert health["foreign"] == 2, health
    assert m.output().count("from another instance") == 1, m.output()  # logged once

    await beat({**real, "status": "stopping"}, 4)  # the holder itself stops: offline at once
    assert (await get_json(f"{m.url}/api/services/m"))["status"] == "offline"
    await beat({**real, "instance": "restarted-token", "status": "starting"}, 5)  # a restart under the same id
    entry = await get_json(f"{m.url}/api/services/m")
    assert entry["status"] == "starting" and entry["instance_count"] == 1


async def _instances(url: str, model: str, n: int) -> bool:
    status, _, body = await asyncio.to_thread(fetch, f"{url}/api/services/{model}")
    return status == 200 and json.loads(body)["instance_count"] >= n


@pytest.mark.model
async def test_a_flood_of_forged_models_does_not_evict_a_worker_that_answers_health(start_worker, start_monitor,
                                                                                      nc):
    m = await start_monitor(MONITOR_CONFIRM_INTERVAL=0.5)
    await start_worker()  # after the monitor: its heartbeat brings a sweep forward, whose health reply confirms it

    async def confirmed() -> bool:
        status, _, body = await asyncio.to_thread(fetch, f"{m.url}/api/services/gemma3-270m")
        return status == 200 and json.loads(body)["instances"][0]["confirmed"]

    await until(confirmed, timeout=10, what="the worker confirmed by a health reply")
    first_seen = (await get_json(f"{m.url}/api/services/gemma3-270m"))["instances"][0]["first_seen"]
    before = (await get_json(f"{m.url}/healthz"))["heartbeats"]
    for i in range(2000):
        await nc.publish(f"models.forged-{i}.heartbeat", json.dumps(heartbeat_body(f"forged-{i}", f"f{i}")).encode())
    await nc.flush()

    async def taken_in() -> dict | None:
        health = await get_json(f"{m.url}/healthz")
        return health if health["heartbeats"] - before >= 2000 else None

    health = await until(taken_in, timeout=30, what="the flood taken in")
    assert health["instances"] == 1000 and health["evicted"] >= 1000, health
    entry = await get_json(f"{m.url}/api/services/gemma3-270m")
    assert entry["status"] == "online" and entry["instances"][0]["confirmed"] is True
    assert entry["instances"][0]["first_seen"] == first_seen  # never evicted (a later sweep would re-add it)
    assert (await get_json(f"{m.url}/api/services/forged-1999"))["instance_count"] == 1  # newest forged kept
    status, _, _ = await asyncio.to_thread(fetch, f"{m.url}/api/services/forged-0")
    assert status == 404  # oldest forged evicted


async def test_wrong_tokens_are_answered_ever_slower_and_the_right_one_at_once(start_monitor):
    m = await start_monitor(MONITOR_TOKEN="s3cret", MONITOR_LOGIN_DELAY=0.2)
    guess = "127.0.0.2"  # the guesser's address; 127.0.0.1 is everyone else

    async def login(source: str, token: str) -> tuple[int, dict[str, str], float]:
        status, headers, _, took = await asyncio.to_thread(fetch_from, source, f"{m.url}/login", "POST",
                                                           f"token={token}".encode())
        return status, headers, took

    delays = []
    for i in range(3):
        status, _, took = await login(guess, f"wrong{i}")
        assert status == 401
        delays.append(took)
    # the fourth wrong guess is held 1.6 s; meanwhile others get in at once and the guesser is refused unchecked
    fourth = asyncio.create_task(login(guess, "wrong3"))
    await asyncio.sleep(0.3)
    status, headers, took = await login("127.0.0.1", "s3cret")
    assert status == 303 and took < 0.15, took
    status, _, _, took = await asyncio.to_thread(fetch_from, "127.0.0.1", f"{m.url}/api/services", "GET", None,
                                                 {"Authorization": "Bearer s3cret"})
    assert status == 200 and took < 0.15, took
    status, headers, took = await login(guess, "s3cret")
    assert status == 429 and int(headers["retry-after"]) >= 1 and took < 0.15
    status, _, _, _ = await asyncio.to_thread(fetch_from, guess, f"{m.url}/api/services", "GET", None,
                                              {"Authorization": "Bearer s3cret"})
    assert status == 429
    status, _, took = await fourth
    assert status == 401
    delays.append(took)
    print("wrong-token delays:", [round(d, 2) for d in delays])
    assert delays[0] >= 0.2 and all(b >= 1.7 * a for a, b in zip(delays, delays[1:], strict=False)), delays

    status, _, _ = await login(guess, "s3cret")  # the wait is over: the right token resets the address
    assert status == 303
    status, _, took = await login(guess, "wrong-again")
    assert status == 401 and 0.2 <= took < 0.35, took
    status, _, _ = await login("127.0.0.3", "x" * 100_000)  # the form is read no further than a token needs
    assert status == 413


@pytest.mark.browser
async def test_a_worker_alert_shows_in_rest_and_on_the_dashboard(start_monitor, nc, page, tmp_path):
    m = await start_monitor()
    await page.goto(m.url + "/")
    await page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=5000)
    alert = {**ALERT, "ts": time.time() - 5}
    await nc.publish("models.m.heartbeat", json.dumps(heartbeat_body("gemma3-270m", "w1", alerts=[alert])).encode())
    await nc.flush()
    shown = page.locator('section.card[data-model="gemma3-270m"] .alert[data-kind="stream.recreated"]')
    await shown.wait_for(timeout=5000)
    text = await shown.inner_text()
    assert "stream.recreated" in text and "recreated it with the configured settings" in text and "w1" in text
    assert "1 alerts" in await page.locator("#summary").inner_text()
    await page.screenshot(path=str(tmp_path / "dashboard-alert.png"), full_page=True)
    entry = await get_json(f"{m.url}/api/services/gemma3-270m")
    assert entry["alerts"] == [{"ts": alert["ts"], "kind": "stream.recreated", "level": "warning",
                                "message": "the request stream was deleted; recreated it with the configured "
                                           "settings", "worker_id": "w1"}]
    assert entry["instances"][0]["alerts"][0]["kind"] == "stream.recreated"
    assert page.errors == []


# --- the registry's rules on its own clock ------------------------------------------------------------------------


def _health(worker_id: str, model: str = "m", **fields: Any):
    return decode_health(json.dumps(heartbeat_body(model, worker_id, heartbeat_interval_s=10.0, **fields)).encode())


def test_another_instance_takes_over_once_the_holder_has_gone_quiet():
    reg = Registry(load_settings())
    reg.observe_health(_health("w", instance="a"), now=0)
    reg.observe_health(_health("w", instance="b", status="stopping"), now=5)
    assert reg.instances["w"].status == "online" and reg.counters["foreign"] == 1
    reg.observe_health(_health("w", instance="b", status="starting"), now=12.5)  # a stale at 12 s
    assert reg.instances["w"].health.instance == "b" and reg.instances["w"].status == "starting"


def test_a_health_reply_takes_the_id_from_a_heartbeat_only_holder_but_not_from_a_confirmed_one():
    reg = Registry(load_settings())
    reg.observe_health(_health("w", instance="forger"), now=0)  # got in first, by heartbeat
    reg.observe_health(_health("w", instance="real"), now=1, confirmed=True)
    assert reg.instances["w"].health.instance == "real" and reg.instances["w"].confirmed
    reg.observe_health(_health("w", instance="forger"), now=2, confirmed=True)
    assert reg.instances["w"].health.instance == "real" and reg.counters["foreign"] == 1


def test_workers_without_a_token_are_taken_at_their_word_as_before():
    reg = Registry(load_settings())
    reg.observe_health(_health("w"), now=0)
    reg.observe_health(_health("w", status="stopping"), now=1)
    assert reg.instances["w"].status == "offline" and reg.counters["foreign"] == 0


def test_the_cap_evicts_unconfirmed_instances_before_confirmed_ones_even_offline():
    reg = Registry(load_settings(monitor_max_instances=3))
    reg.observe_health(_health("real", "r"), now=0, confirmed=True)
    reg.observe_health(_health("gone", "g", status="stopping"), now=0, confirmed=True)
    for i in range(10):
        reg.observe_health(_health(f"forged{i}", f"f{i}"), now=1 + i)
    assert set(reg.instances) == {"real", "gone", "forged9"} and reg.counters["evicted"] == 9


def test_a_report_from_another_instance_does_not_move_the_queue():
    reg = Registry(load_settings())
    reg.observe_health(_health("w", instance="real"), now=0)

    def report(instance: str | None, pending: int) -> p.BackpressureReport:
        return p.BackpressureReport(model_name="m", worker_id="w", pending_messages=pending, active_processing=0,
                                    queue_capacity=10, utilization=0.0, status="healthy", worker_count=1,
                                    timestamp=0.0, instance=instance)

    reg.observe_report(report("forger", 999), now=1)
    reg.observe_report(report(None, 999), now=1)
    assert reg.instances["w"].pending != 999 and reg.counters["foreign"] == 2
    reg.observe_report(report("real", 7), now=2)
    assert reg.instances["w"].pending == 7
