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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from workers import discovery
from workers.connection import NATS, connect
from workers.ops import broker
from workers.settings import NatsSettings

ROOT = Path(__file__).resolve().parent.parent


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)


@dataclass
class LocalWorker:
    nc: NATS  # a client of the private nats-server
    url: str  # that server
    pid: int  # the worker process
    ready_s: float  # from spawn to its first online health reply


@asynccontextmanager
async def local_worker(name: str, **env: str) -> AsyncIterator[LocalWorker]:
    """Start nats-server (temp store, free port) and worker `name`; yield it once it is online."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory() as tmp:
        port = broker.free_port()
        url = f"nats://127.0.0.1:{port}"
        server = broker.start(port, Path(tmp) / "js")
        worker: subprocess.Popen[bytes] | None = None
        nc: NATS | None = None
        log = Path(tmp) / "worker.log"
        try:
            t0 = time.perf_counter()
            with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall a chatty worker
                child = worker = subprocess.Popen(
                    [sys.executable, "-m", "workers", name], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out,
                    env=dict(os.environ, NATS_URL=url, DATA_DIR=str(Path(tmp) / "data"), HTTP_ADDR="", **env),
                )
            # the worker inherits NATS_USER, NATS_CREDS, NATS_TLS_* … from this environment; so does this client
            nc = await connect(url, name="bench", auth=NatsSettings(nats_url=url).nats_auth())
            if not await discovery.wait_online(nc, name, pid=child.pid, timeout=300, interval=0.05,
                                               alive=lambda: child.poll() is None):
                raise SystemExit(f"worker {name} did not come online: {log.read_text()[-2000:]}")
            yield LocalWorker(nc, url, child.pid, time.perf_counter() - t0)
        finally:
            if nc is not None:
                await nc.close()
            for proc in (worker, server):
                broker.stop(proc, grace=60)
