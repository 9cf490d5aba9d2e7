"""What feeds the registry from NATS: heartbeats, backpressure reports and discovery sweeps.

A sweep asks `$SRV.PING` who is there (every worker is a `nats.micro` service whose metadata names its model)
and sends one `models.<model>.health` request per model it learns of; every instance answers that (no queue
group), so a running fleet is in the registry well within a second of the monitor starting. It repeats every
MONITOR_SWEEP_INTERVAL and after each reconnect; between sweeps, heartbeats and reports keep the picture fresh.
A new instance first heard by heartbeat brings the next sweep forward (at most one per MONITOR_CONFIRM_INTERVAL),
so a worker that starts after the monitor is confirmed by its health reply within seconds.

What heartbeats and reports change goes to the SSE listeners right away (coalesced over PUSH_DELAY), not at the
next tick; each request event (`events.request.*`, the Requests view) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from workers import discovery
from workers import protocol as p
from workers.connection import NatsRefused, NatsUnavailable, connect

from .config import MonitorSettings
from .registry import Registry, decode_health, decode_report
from .request_log import decode_request_event

__all__ = ["Feed", "NatsRefused", "NatsUnavailable", "login_refused"]

log = logging.getLogger(__name__)
HEARTBEATS = "models.*.heartbeat"
REPORTS = "monitoring.*.*"
PUSH_DELAY = 0.05  # input that arrives together (a burst of reports) goes out as one push per model


class Feed:
    def __init__(self, registry: Registry, settings: MonitorSettings, requests: bool = True) -> None:
        self.registry, self.settings = registry, settings
        self.requests = requests  # False: no finished-request events (the gateway routes on heartbeats and reports)
        self.nc: NATS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._catch_up: asyncio.Task[None] | None = None
        self._swept_at = 0.0  # monotonic start of the last sweep
        self._push: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> None:
        """Connect (reconnecting forever afterwards); with a timeout, give up on the first connect after it."""

        async def on_disconnected() -> None:
            self.registry.nats_connected = False

        async def on_reconnected() -> None:
            self.registry.nats_connected = True
            if self._catch_up is None or self._catch_up.done():  # catch up on what changed while we were away
                self._catch_up = asyncio.create_task(self._sweep_quietly(), name="sweep-after-reconnect")

        self.nc = await connect(self.settings.nats_url, name="fleet-monitor", timeout=timeout,
                                on_disconnected=on_disconnected, on_reconnected=on_reconnected,
                                auth=self.settings.nats_auth())
        self.registry.nats_connected = True

    async def start(self) -> None:
        """Subscribe, sweep once, then keep sweeping and ticking in the background."""
        if self.nc is None:
            raise RuntimeError("Feed.start() before Feed.connect()")
        await self.nc.subscribe(HEARTBEATS, cb=self._on_heartbeat)
        await self.nc.subscribe(REPORTS, cb=self._on_report)
        if self.requests:
            await self.nc.subscribe(p.REQUEST_EVENTS, cb=self._on_request)
        await self.nc.flush()
        await self.sweep()
        self.registry.tick()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="sweep"),
                       asyncio.create_task(self._tick_loop(), name="tick")]

    async def run(self, retry_refused: float = 10.0) -> None:
        """Connect (however long it takes) and start: the web server runs this in the background. A refused login
        or TLS handshake is logged (one line) and tried again every `retry_refused` s: the page stays up and shows
        NATS as unreachable meanwhile."""
        while True:
            try:
                await self.connect()
                break
            except NatsRefused as e:
                log.error("%s", e)
                await asyncio.sleep(retry_refused)
        await self.start()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Feed the registry in a task while the body runs (an app's lifespan); then stop and disconnect."""
        task = asyncio.create_task(self.run(), name="feed")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await self.close()

    async def close(self) -> None:
        if self._push is not None:
            self._push.cancel()
        tasks = [*self._tasks, *([self._catch_up] if self._catch_up else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.registry.nats_connected = False

    # --- discovery -----------------------------------------------------------------------------

    async def sweep(self) -> None:
        """$SRV.PING plus one health request per model (the registry's too); replies gathered for
        MONITOR_SWEEP_WAIT."""
        if self.nc is None or not self.nc.is_connected:
            return
        self._swept_at = time.monotonic()
        await discovery.sweep(self.nc, self.settings.monitor_sweep_wait, known=list(self.registry.models),
                              on_health=lambda data: self._observe_health(data, "health"))

    async def _sweep_quietly(self) -> None:
        with contextlib.suppress(Exception):  # the connection may drop mid-sweep; the next one catches up
            await self.sweep()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_sweep_interval)
            await self._sweep_quietly()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_tick_interval)
            self.registry.tick()
            self._confirm_soon()

    def _confirm_soon(self) -> None:
        """Sweep early when instances arrived by heartbeat only, so real workers answer for themselves before a
        flood of forged ones fills MONITOR_MAX_INSTANCES."""
        reg = self.registry
        if not reg.unconfirmed_arrived or time.monotonic() - self._swept_at < self.settings.monitor_confirm_interval:
            return
        if self._catch_up is None or self._catch_up.done():
            reg.unconfirmed_arrived = False
            self._catch_up = asyncio.create_task(self._sweep_quietly(), name="sweep-to-confirm")

    # --- input ---------------------------------------------------------------------------------

    def _too_big(self, data: bytes) -> bool:
        if len(data) > self.settings.monitor_max_message_bytes:
            self.registry.counters["oversized"] += 1
            return True
        return False

    def _observe_health(self, data: bytes, source: str) -> None:
        if self._too_big(data):
            return
        try:
            health = decode_health(data)
        except (ValueError, ValidationError):
            self.registry.counters["invalid"] += 1
            return
        self.registry.counters["heartbeats" if source == "heartbeat" else "health_replies"] += 1
        self.registry.observe_health(health, confirmed=source == "health")
        self._push_soon()

    def _push_soon(self) -> None:
        if self._push is None:
            self._push = asyncio.get_running_loop().call_later(PUSH_DELAY, self._push_now)

    def _push_now(self) -> None:
        self._push = None
        self.registry.flush()

    async def _on_heartbeat(self, msg: Msg) -> None:
        self._observe_health(msg.data, "heartbeat")

    async def _on_report(self, msg: Msg) -> None:
        if self._too_big(msg.data):
            return
        try:
            report = decode_report(msg.data)
        except (ValueError, ValidationError):
            self.registry.counters["invalid"] += 1
            return
        self.registry.counters["reports"] += 1
        self.registry.observe_report(report)
        self._push_soon()

    async def _on_request(self, msg: Msg) -> None:
        if self._too_big(msg.data):
            return
        try:
            event = decode_request_event(msg.data)
        except (ValueError, ValidationError):
            self.registry.counters["invalid"] += 1
            return
        self.registry.counters["request_events"] += 1
        self.registry.observe_request(event)


async def login_refused(settings: MonitorSettings, timeout: float = 2.0) -> str | None:
    """Why the NATS server refuses the monitor (login or TLS) as one line, or None (accepted, or no server answered
    within `timeout`: the web monitor then starts and waits for one). `python -m monitor` exits on a refusal."""
    try:
        nc = await connect(settings.nats_url, name="fleet-monitor", timeout=timeout, auth=settings.nats_auth())
    except NatsRefused as e:
        return str(e)
    except NatsUnavailable:
        return None
    await nc.close()
    return None
