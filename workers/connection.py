"""The worker's NATS connection (DESIGN §4.6): reconnect forever, stay quiet, log every change."""

from __future__ import annotations

import asyncio
import sys

import nats
from nats.aio.client import Client as NATS

from .config import Settings
from .store import Store


class NatsUnavailable(Exception):
    """No NATS server answered within NATS_CONNECT_TIMEOUT."""


async def connect(settings: Settings, store: Store, name: str | None = None) -> NATS:
    """Connect with unbounded reconnects; give up on the *first* connect after NATS_CONNECT_TIMEOUT."""
    url = settings.nats_url

    async def on_error(e: Exception) -> None:
        # nats-py reports every failed reconnect attempt here; one line, no traceback.
        if not isinstance(e, (ConnectionRefusedError, OSError, nats.errors.StaleConnectionError)):
            print(f"nats: {type(e).__name__}: {e}", file=sys.stderr)

    async def on_disconnected() -> None:
        store.event("nats.disconnected", f"lost connection to {url}", level="warning")

    async def on_reconnected() -> None:
        store.event("nats.reconnected", f"reconnected to {nc.connected_url.netloc if nc.connected_url else url}")

    nc = NATS()
    connected = asyncio.ensure_future(nc.connect(
        servers=url.split(","),
        name=name or settings.worker_id,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=20,
        max_outstanding_pings=3,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    ))
    try:
        await asyncio.wait_for(connected, settings.nats_connect_timeout)
    except (TimeoutError, OSError, nats.errors.NoServersError) as e:
        await nc.close()
        raise NatsUnavailable(
            f"no NATS server answered at {url} within {settings.nats_connect_timeout:g} s ({type(e).__name__}); "
            "start one with `make nats` or set NATS_URL"
        ) from None
    store.event("nats.connected", f"connected to {url}", max_payload=nc.max_payload)
    return nc
