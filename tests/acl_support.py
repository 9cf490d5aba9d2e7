"""The least-privilege example (deploy/nats/) on real nats-server processes: credentials generated once into a temp
dir by scripts/nats_credentials.py, a server per test started from the shipped server.conf, and connections that
collect the permission violations nats-py reports only through `error_cb`."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import nats
from nats.aio.client import Client as NATS

from workers.config import ROOT
from workers.ops import broker

DEPLOY = ROOT / "deploy" / "nats"
SCRIPT = ROOT / "scripts" / "nats_credentials.py"
Started = list[tuple[subprocess.Popen[bytes], Path]]  # processes a test started, with their logs


@functools.cache
def credentials_module() -> ModuleType:
    """scripts/nats_credentials.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nats_credentials", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nats_credentials"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def generate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the script as an operator would, with the shipped server configs copied beside its output."""
    out.mkdir(parents=True, exist_ok=True)
    for conf in ("server.conf", "cluster.conf"):
        shutil.copy(DEPLOY / conf, out / conf)
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@dataclass
class Conn:
    """A connection as one identity; `errors` collects what the server refused (asynchronously)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]

    async def refused(self, fragment: str, timeout: float = 3.0) -> str:
        """Wait for the violation whose text contains `fragment` (the subject, usually)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.nc.flush()
            for e in self.violations():
                if fragment.lower() in e.lower():  # nats-py reports the server's line in lower case
                    return e
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permission violation for {fragment!r}; errors seen: {self.errors}")

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


@dataclass
class AclServer:
    """nats-server started from the example's server.conf (port overridden, store under `cwd`)."""

    conf_dir: Path
    cwd: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    conns: list[Conn] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    conf: str = "server.conf"
    env: dict[str, str] = field(default_factory=dict)  # cluster.conf reads its node's settings from here

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.cwd / "nats.log", "ab")  # noqa: SIM115 - handed to the child
        args = [broker.binary(), "-c", str(self.conf_dir / self.conf)]
        if not self.env:
            args += ["-p", str(self.port)]
        self.proc = subprocess.Popen(args, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **self.env})
        deadline = time.monotonic() + 10
        while not broker.answers(self.url, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nats-server did not start:\n{(self.cwd / 'nats.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        broker.stop(self.proc)

    def seed(self, identity: str) -> Path:
        """The seed file of `identity`, named as its file without .nk: `client.alice`, `worker.inference.x`."""
        return self.conf_dir / "creds" / f"{identity}.nk"

    def inbox(self, identity: str) -> str:
        return str(credentials_module().from_file(self.seed(identity)).inbox)

    async def connect(self, identity: str | None, inbox: str | None = None) -> Conn:
        """Connect as `identity` with its own inbox prefix (or `inbox`); None: anonymously."""
        errors: list[str] = []

        async def error_cb(e: Exception) -> None:
            errors.append(str(e))

        options: dict[str, object] = {"servers": [self.url], "error_cb": error_cb, "allow_reconnect": False,
                                      "connect_timeout": 2}
        if identity is not None:
            options.update(nkeys_seed=str(self.seed(identity)), inbox_prefix=inbox or self.inbox(identity))
        conn = Conn(await nats.connect(**options), errors)  # type: ignore[arg-type]
        self.conns.append(conn)
        return conn

    async def close_all(self) -> None:
        for conn in self.conns:
            await conn.close()


def cluster(conf_dir: Path, root: Path, size: int = 3) -> list[AclServer]:
    """Nodes n1..n<size> started from the example's cluster.conf on free ports, routed to each other."""
    ports = [(broker.free_port(), broker.free_port()) for _ in range(size)]
    routes = {f"ROUTE_{i}": f"nats-route://127.0.0.1:{route}" for i, (_, route) in enumerate(ports, start=1)}
    nodes = [AclServer(conf_dir, root / f"n{i}", port, conf="cluster.conf",
                       env={"NODE": f"n{i}", "PORT": str(port), "ROUTE_PORT": str(route), "STORE": "store", **routes})
             for i, (port, route) in enumerate(ports, start=1)]
    try:
        for node in nodes:
            node.start()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def auth_ready() -> str | None:
    """Why the worker and monitor processes cannot log in as their own identity yet, or None."""
    from workers.settings import NatsSettings

    missing = [k.upper() for k in ("nats_nkey_seed_file", "nats_inbox_prefix") if k not in NatsSettings.model_fields]
    if missing:
        return (f"workers/settings.py has no {' or '.join(missing)} yet (helper-auth's part of issue 12): a worker "
                "and the monitor cannot log in with their own nkey and inbox prefix")
    unwired = [f for f in ("workers/worker.py", "monitor/feed.py") if "nats_auth(" not in (ROOT / f).read_text()]
    if unwired:
        return (f"{', '.join(unwired)}: connect() is not given `settings.nats_auth()` yet (issue 12, part 1), so "
                "the process would log in anonymously")
    return None


def identity_env(acl: AclServer, identity: str) -> dict[str, str]:
    return {"NATS_URL": acl.url, "NATS_NKEY_SEED_FILE": str(acl.seed(identity)),
            "NATS_INBOX_PREFIX": acl.inbox(identity), "NATS_CONNECT_TIMEOUT": "10"}


def spawn(started: Started, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python <args>` from the repository with `env` instead of the test's own NATS/worker/monitor settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "MODEL_", "WORKER_", "MONITOR_"))}
    proc = subprocess.Popen([sys.executable, *args], env={**clean, **env}, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    started.append((proc, log))
    return proc


def no_violations(started: Started) -> None:
    """Every process still runs and none logged a refused login or a refused publish/subscribe."""
    for proc, log in started:
        text = log.read_text(errors="replace")
        assert "permissions violation" not in text.lower() and "authorization" not in text.lower(), text[-3000:]
        assert proc.poll() is None, text[-3000:]
