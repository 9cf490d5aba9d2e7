"""Helpers for the monitor tests: a real `python -m monitor` process, HTTP and SSE readers, Chromium."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from workers.config import ROOT
from workers.ops import broker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
# Short intervals so status changes and history show within a test's patience.
FAST = {"MONITOR_TICK_INTERVAL": "0.1", "MONITOR_HISTORY_INTERVAL": "0.5", "MONITOR_SSE_PING": "5"}


@dataclass
class MonitorProc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    spawned_at: float  # monotonic

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest_asyncio.fixture(name="start_monitor")
async def start_monitor_fixture(nats_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start a real monitor process on a free port: `await start_monitor(MONITOR_TOKEN=...)`."""
    started: list[MonitorProc] = []

    async def start(wait: bool = True, **overrides: Any) -> MonitorProc:
        port = broker.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MONITOR_", "PURGE_"))}
        env.update(FAST, NATS_URL=nats_server.url, MONITOR_ADDR=f"127.0.0.1:{port}")
        env.update({k: str(v) for k, v in overrides.items()})
        log = tmp_path / f"monitor-{len(started)}.log"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "monitor"], env=env, cwd=ROOT, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT)
        m = MonitorProc(proc, port, log, t0)
        started.append(m)
        if wait:
            await wait_http(m)
        return m

    yield start
    for m in started:
        broker.stop(m.proc)


async def wait_http(m: MonitorProc, timeout: float = 15) -> None:
    """Until the monitor serves and is connected to NATS (/healthz 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.proc.poll() is not None:
            raise AssertionError(f"monitor exited with {m.proc.returncode}:\n{m.output()}")
        try:
            status, _, _ = await asyncio.to_thread(fetch, f"{m.url}/healthz")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"monitor not up and connected after {timeout} s:\n{m.output()}")


def fetch(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request without following redirects: (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def fetch_from(source: str, url: str, method: str = "GET", data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, float]:
    """One request sent from the local address `source` (any 127.x.y.z reaches a loopback listener, and the
    monitor sees it as another client): (status, headers, body, seconds until the answer)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30, source_address=(source, 0))
    try:
        t0 = time.monotonic()
        conn.request(method, parts.path or "/", body=data, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic() - t0
    finally:
        conn.close()


def heartbeat_body(model: str, worker_id: str, **fields: Any) -> dict[str, Any]:
    """A heartbeat as a worker writes it (None fields left out), for publishing by hand; `fields` override."""
    body: dict[str, Any] = {
        "model_name": model, "worker_id": worker_id, "kind": "inference", "status": "online",
        "capabilities": ["text-generation"], "nats_topic": f"inference.request.{model}", "version": "0.1.0",
        "model_info": {"architecture": "gemma3", "quantization": "Q4_K_M"},
        "queue_metrics": {"pending_messages": 0, "active_processing": 0, "queue_capacity": 8, "total_processed": 0,
                          "total_failed": 0},
        "backpressure_status": {"level": "healthy", "utilization": 0.0},
        "started_at": time.time(), "uptime_s": 1.0, "heartbeat_interval_s": 30.0, "seq": 1,
    }
    body.update(fields)
    return body


async def get_json(url: str, **kwargs: Any) -> Any:
    status, _, body = await asyncio.to_thread(fetch, url, **kwargs)
    assert status == 200, (status, body[:300])
    return json.loads(body)


async def until(check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll an async or sync check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class SSEReader:
    """Reads /api/events in a thread: events as (monotonic time, name, data) plus the comment lines seen."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        host_port = self.url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock
        self.conn.request("GET", "/api/events", headers=self.headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.status
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data = "message", []
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                if text.startswith(":"):
                    self.comments.append(text)
                elif text.startswith("event:"):
                    name = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].strip())
                elif not text and data:
                    self.events.append((time.monotonic(), name, json.loads("\n".join(data))))
                    name, data = "message", []
        except Exception:  # close() pulls the socket from under readline; any error ends the reader
            return

    def named(self, name: str) -> list[tuple[float, Any]]:
        return [(t, d) for t, n, d in list(self.events) if n == name]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self.thread.join(5)


def chromium_available() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")


@pytest_asyncio.fixture(name="page")
async def page_fixture() -> AsyncIterator[Any]:
    """A page in headless Debian Chromium, driven by playwright (never a browser playwright downloads)."""
    chromium_available()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: the escaping in app.js must hold on its own, without the policy's second wall
            page = await browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            page.errors = []  # type: ignore[attr-defined]
            page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
            yield page
        finally:
            await browser.close()
