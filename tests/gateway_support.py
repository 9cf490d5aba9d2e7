"""Helpers for the gateway tests: a real `python -m gateway` process on a free port, and worker processes started
side by side for one module (one nats-server, each model loaded once)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from workers.config import ROOT
from workers.ops import broker

from .conftest import WorkerProc


@dataclass
class GatewayProc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        broker.stop(self.proc)


def start_gateway(nats_url: str, tmp: Path, **overrides: Any) -> GatewayProc:
    """`python -m gateway` on a free port, connected to `nats_url`; returns once /health answers 200."""
    port = broker.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "MONITOR_", "PURGE_"))}
    env.update(NATS_URL=nats_url, GATEWAY_ADDR=f"127.0.0.1:{port}", MONITOR_TICK_INTERVAL="0.1")
    env.update({k: str(v) for k, v in overrides.items()})
    log = tmp / f"gateway-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    gw = GatewayProc(proc, port, log)
    ends = time.monotonic() + 20
    while time.monotonic() < ends:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.output()}")
        try:
            if httpx.get(f"{gw.url}/health", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    gw.stop()
    raise AssertionError(f"gateway not healthy after 20 s:\n{gw.output()}")


def spawn_worker(env_file: Path, nats_url: str, data_dir: Path, tmp: Path, **overrides: Any) -> WorkerProc:
    """A worker process from `env_file` (not waited for: start several, then `conftest.wait_online` each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_", "DEFAULT_"))}
    env.update(NATS_URL=nats_url, DATA_DIR=str(data_dir), HTTP_ADDR="", NATS_CONNECT_TIMEOUT="10")
    env.update({k: str(v) for k, v in overrides.items()})
    name = overrides.get("MODEL_NAME") or next(line.split("=", 1)[1].strip() for line in env_file.read_text()
                                               .splitlines() if line.startswith("MODEL_NAME="))
    log = tmp / f"worker-{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(env_file)], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    return WorkerProc(proc, name, env, log, data_dir)


def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for `check()` (polled every 0.1 s); fail with `what` after `timeout` seconds."""
    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, what
        time.sleep(0.1)


def models(gw: GatewayProc) -> dict[str, dict[str, Any]]:
    """The gateway's `/v1/models`, by id."""
    return {m["id"]: m for m in httpx.get(f"{gw.url}/v1/models", timeout=5).json()["data"]}


def request_row(worker: WorkerProc, req_id: str, where: str = "1", timeout: float = 15) -> sqlite3.Row:
    """The worker's request row for `req_id` once it matches `where` (SQL over its columns)."""
    ends = time.monotonic() + timeout
    while True:
        if worker.db.exists():
            with sqlite3.connect(worker.db) as db:
                db.row_factory = sqlite3.Row
                row = db.execute(f"SELECT * FROM requests WHERE req_id = ? AND ({where})", (req_id,)).fetchone()
            if row is not None:
                return row
        assert time.monotonic() < ends, f"no request row for {req_id} with {where} in {worker.db}"
        time.sleep(0.1)
