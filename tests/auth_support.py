"""What the credential and TLS tests share: nats-servers started from a config file the test writes, the CLIs as
a user runs them, and a client sink for connection events."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workers.connection import NATS
from workers.ops import broker

BIN = Path(sys.executable).parent
Serve = Callable[[str], int]


def servers(tmp_path: Path) -> Iterator[Serve]:
    """For a fixture: `port = serve(config_text)` starts a nats-server (JetStream, free port) with that config;
    all are stopped when the fixture ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(conf: str) -> int:
        port = broker.free_port()
        path = tmp_path / f"nats-{port}.conf"
        path.write_text(conf)
        procs.append(broker.start(port, tmp_path / f"js-{port}", extra_args=["-c", str(path)],
                                  log_file=tmp_path / f"nats-{port}.log"))
        return port

    yield start
    for proc in procs:
        broker.stop(proc)


class Events:
    """An EventSink that keeps what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, code: str, msg: str = "", level: str = "info", **meta: Any) -> None:
        self.seen.append((code, msg, meta))

    def codes(self) -> list[str]:
        return [code for code, _, _ in self.seen]


async def roundtrip(nc: NATS, subject: str = "auth.check") -> bytes:
    """Publish to ourselves and read it back: the login works for real traffic, not just CONNECT."""
    sub = await nc.subscribe(subject)
    await nc.publish(subject, b"ping")
    msg = await sub.next_msg(timeout=2)
    await sub.unsubscribe()
    return msg.data


def clean_env(**env: str) -> dict[str, str]:
    """The test process's environment without any NATS_* setting, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NATS_")}, **env}


def cli(tool: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    """Run nats-chat / nats-embed / python -m monitor as a user would; stdin closed."""
    argv = [str(BIN / tool), *args] if tool.startswith("nats-") else [sys.executable, "-m", tool, *args]
    return subprocess.run(argv, env=env or clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(text: str) -> str:
    """`text` stripped, asserting it is exactly one line and no traceback."""
    out = text.strip()
    assert out and "\n" not in out and "Traceback" not in out, text
    return out
