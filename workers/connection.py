"""The one NATS connection every process opens: workers, the monitor, the CLIs and the benchmarks.

Once connected it reconnects forever (`max_reconnect_attempts=-1`, 0.5 s apart) and stays quiet about the
refused attempts in between; the first connect, though, gives up after `timeout` with one `NatsUnavailable`
line that names the URL and the fix. With `max_reconnect_attempts=-1`, nats-py's own connect would otherwise
wait for a server forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.errors import NoServersError, StaleConnectionError

__all__ = ["NATS", "EventSink", "NatsUnavailable", "connect"]

log = logging.getLogger(__name__)


class NatsUnavailable(Exception):
    """No NATS server answered in time; the message names the URL, the wait and the fix."""


class EventSink(Protocol):
    """Where connection changes are recorded (`workers.store.Store` is one)."""

    def event(self, code: str, msg: str = "", level: str = "info", **meta: Any) -> None: ...


async def _quiet(e: Exception) -> None:
    # nats-py reports every failed (re)connect attempt here: the refused ones are expected, the rest get one line.
    if not isinstance(e, (ConnectionRefusedError, OSError, StaleConnectionError)):
        log.warning("nats: %s: %s", type(e).__name__, e)


async def connect(url: str, *, name: str, timeout: float | None = None, events: EventSink | None = None,
                  on_disconnected: Callable[[], Awaitable[None]] | None = None,
                  on_reconnected: Callable[[], Awaitable[None]] | None = None,
                  reconnect: bool = True) -> NATS:
    """Connect to `url` (comma-separated for a cluster) as client `name`.

    `timeout` bounds the first connect (None: wait for a server however long it takes); `events` records
    `nats.connected` / `nats.disconnected` / `nats.reconnected`; `reconnect=False` tries each server once and
    never reconnects (the CLIs). Raises `NatsUnavailable` when no server answered.
    """
    nc = NATS()

    async def disconnected() -> None:
        if events is not None:
            events.event("nats.disconnected", f"lost connection to {url}", level="warning")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected() -> None:
        if events is not None:
            where = nc.connected_url.netloc if nc.connected_url else url
            events.event("nats.reconnected", f"reconnected to {where}")
        if on_reconnected is not None:
            await on_reconnected()

    # A dict: nats-py annotates the two waits as int, but takes (and we want) fractions of a second.
    options: dict[str, Any] = {
        "servers": url.split(","),
        "name": name,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "ping_interval": 20,
        "max_outstanding_pings": 3,
        "connect_timeout": min(2.0, timeout) if timeout else 2.0,
        "error_cb": _quiet,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
    }
    try:
        await asyncio.wait_for(nc.connect(**options), timeout)
    except (TimeoutError, OSError, NoServersError) as e:
        await _close(nc)
        within = f" within {timeout:g} s" if timeout is not None else ""
        raise NatsUnavailable(f"no NATS server answered at {url}{within} ({type(e).__name__}); "
                              "start one with `make nats` or set NATS_URL") from None
    except asyncio.CancelledError:
        await _close(nc)
        raise
    if events is not None:
        events.event("nats.connected", f"connected to {url}", max_payload=nc.max_payload)
    return nc


async def _close(nc: NATS) -> None:
    with contextlib.suppress(Exception):
        await nc.close()
