"""What feeds the registry from NATS: heartbeats, backpressure reports and discovery sweeps.

A sweep asks `$SRV.PING` who is there (every worker is a `nats.micro` service whose metadata names its model)
and sends one `models.<model>.health` request per model it learns of; every instance answers that (no queue
group), so a running fleet is in the registry well within a second of the monitor starting. It repeats every
MONITOR_SWEEP_INTERVAL and after each reconnect; between sweeps, heartbeats and reports keep the picture fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from workers import protocol as p

from .config import MonitorSettings
from .registry import Registry, decode_health

HEARTBEATS = "models.*.heartbeat"
REPORTS = "monitoring.*.*"
# The names a worker accepts as MODEL_NAME; anything else in $SRV metadata is not asked for its health.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class NatsUnavailable(Exception):
    """No NATS server answered within NATS_CONNECT_TIMEOUT."""


class Feed:
    def __init__(self, registry: Registry, settings: MonitorSettings) -> None:
        self.registry, self.settings = registry, settings
        self.nc = NATS()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> None:
        """Connect (reconnecting forever afterwards); with a timeout, give up on the first connect after it."""
        url = self.settings.nats_url

        async def on_error(e: Exception) -> None:
            if not isinstance(e, (ConnectionRefusedError, OSError, nats.errors.StaleConnectionError)):
                print(f"monitor: nats: {type(e).__name__}: {e}", file=sys.stderr)

        async def on_disconnected() -> None:
            self.registry.nats_connected = False

        async def on_reconnected() -> None:
            self.registry.nats_connected = True
            asyncio.ensure_future(self.sweep())  # catch up on whatever changed while we were away

        connecting = asyncio.ensure_future(self.nc.connect(
            servers=url.split(","), name="fleet-monitor", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            ping_interval=20, max_outstanding_pings=3, connect_timeout=2, allow_reconnect=True,
            error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
        ))
        try:
            await asyncio.wait_for(connecting, timeout)
        except (TimeoutError, OSError, nats.errors.NoServersError) as e:
            with contextlib.suppress(Exception):
                await self.nc.close()
            raise NatsUnavailable(f"no NATS server answered at {url} within {timeout:g} s ({type(e).__name__}); "
                                  "start one with `make nats` or set NATS_URL") from None
        self.registry.nats_connected = True

    async def start(self) -> None:
        """Subscribe, sweep once, then keep sweeping and ticking in the background."""
        await self.nc.subscribe(HEARTBEATS, cb=self._on_heartbeat)
        await self.nc.subscribe(REPORTS, cb=self._on_report)
        await self.nc.flush()
        await self.sweep()
        self.registry.tick()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="sweep"),
                       asyncio.create_task(self._tick_loop(), name="tick")]

    async def run(self) -> None:
        """Connect (however long it takes) and start: the web server runs this in the background."""
        await self.connect()
        await self.start()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.registry.nats_connected = False

    # --- discovery -----------------------------------------------------------------------------

    async def sweep(self) -> None:
        """$SRV.PING plus one health request per model; replies are gathered for MONITOR_SWEEP_WAIT."""
        nc = self.nc
        if not nc.is_connected:
            return
        inbox = nc.new_inbox()
        asked: set[str] = set()

        async def ask(model: str) -> None:
            if model in asked or not _MODEL_NAME.match(model):
                return
            asked.add(model)
            with contextlib.suppress(Exception):
                await nc.publish(p.health_subject(model), b"", reply=f"{inbox}.health")

        async def on_reply(msg: Msg) -> None:
            if not msg.data:
                return  # a no-responders status
            if msg.subject.endswith(".ping"):
                try:
                    meta = json.loads(msg.data).get("metadata") or {}
                except (ValueError, AttributeError):
                    return
                if isinstance(meta.get("model"), str) and meta.get("worker_id"):
                    await ask(meta["model"])
            else:
                self._observe_health(msg.data, "health")

        sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
        try:
            await nc.publish("$SRV.PING", b"", reply=f"{inbox}.ping")
            for model in list(self.registry.models):  # also those whose $SRV registration we missed
                await ask(model)
            await asyncio.sleep(self.settings.monitor_sweep_wait)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_sweep_interval)
            with contextlib.suppress(Exception):
                await self.sweep()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_tick_interval)
            self.registry.tick()

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
        self.registry.observe_health(health)

    async def _on_heartbeat(self, msg: Msg) -> None:
        self._observe_health(msg.data, "heartbeat")

    async def _on_report(self, msg: Msg) -> None:
        if self._too_big(msg.data):
            return
        try:
            report = p.BackpressureReport.model_validate_json(msg.data)
        except ValidationError:
            self.registry.counters["invalid"] += 1
            return
        self.registry.counters["reports"] += 1
        self.registry.observe_report(report)

