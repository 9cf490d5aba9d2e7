"""What the benchmarks share: a private nats-server plus one worker process, always cleaned up.

nats-server runs in its own session (so a Ctrl+C in a terminal does not reach it first); that
also means it outlives a killed benchmark unless we stop it. The context manager stops both in
`finally`, and SIGTERM is turned into SystemExit so `timeout` or a CI kill runs that too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from workers import discovery
from workers.connection import NATS, connect
from workers.ops import broker
from workers.settings import NatsSettings

ROOT = Path(__file__).resolve().parent.parent


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)


@asynccontextmanager
async def local_worker(name: str, **env: str) -> AsyncIterator[tuple[NATS, str]]:
    """Start nats-server (temp store, free port) and worker `name`; yield (client, url) once it is online."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory() as tmp:
        port = broker.free_port()
        url = f"nats://127.0.0.1:{port}"
        server = broker.start(port, Path(tmp) / "js")
        worker: subprocess.Popen[bytes] | None = None
        nc: NATS | None = None
        try:
            child = worker = subprocess.Popen(
                [sys.executable, "-m", "workers", name], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=dict(os.environ, NATS_URL=url, DATA_DIR=str(Path(tmp) / "data"), HTTP_ADDR="", **env),
            )
            # the worker inherits NATS_USER, NATS_CREDS, NATS_TLS_* … from this environment; so does this client
            nc = await connect(url, name="bench", auth=NatsSettings(nats_url=url).nats_auth())
            if not await discovery.wait_online(nc, name, timeout=None, alive=lambda: child.poll() is None):
                _, stderr = child.communicate()
                raise SystemExit(f"worker exited: {stderr.decode()}")
            yield nc, url
        finally:
            if nc is not None:
                await nc.close()
            for proc in (worker, server):
                broker.stop(proc, grace=60)
