"""A worker that cannot start says why in one line and exits non-zero within seconds, and `fleet up` reports only
the workers that sent their ready heartbeat.

Real processes throughout: `python -m workers` and `python -m workers.ops.fleet` against a real nats-server (one for
the module), with smollm2-135m (the smallest model, quick to load) where a worker must come up."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.config import ROOT
from workers.ops import broker

from .conftest import SMOLLM2_ENV, NatsServer, serve_nats

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    yield from serve_nats(tmp_path_factory.mktemp("nats"))


def clean_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The test's environment without worker settings, with its own DATA_DIR."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_", "NATS_", "HTTP_"))}
    out.update({"DATA_DIR": str(tmp_path / "data"), "NATS_CONNECT_TIMEOUT": "5", **env})
    return out


def run_worker(tmp_path: Path, timeout: float = 30, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "workers", "--env", str(SMOLLM2_ENV)], env=clean_env(tmp_path, **env),
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def the_line(stderr: str) -> str:
    """The one error line: the last line of stderr, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


def test_http_port_in_use_exits_within_seconds_naming_the_port(server: NatsServer, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r, took = run_worker(tmp_path, NATS_URL=server.url, HTTP_ADDR=f"127.0.0.1:{port}")
    assert r.returncode != 0 and took < 10, (r.returncode, took, r.stderr)
    line = the_line(r.stderr)
    assert "HTTP_ADDR" in line and str(port) in line and "in use" in line


def test_a_file_that_is_not_a_gguf_exits_naming_model_path(server: NatsServer, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("<html>404 Not Found</html>\n")  # what a failed download leaves behind
    r, took = run_worker(tmp_path, NATS_URL=server.url, HTTP_ADDR="", MODEL_PATH=str(bad))
    assert r.returncode != 0 and took < 20, (r.returncode, took, r.stderr)
    line = the_line(r.stderr)
    assert "MODEL_PATH" in line and str(bad) in line and "not a GGUF file" in line


def test_no_nats_server_listening_exits_naming_nats_url(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{broker.free_port()}"
    r, took = run_worker(tmp_path, NATS_URL=url, HTTP_ADDR="", NATS_CONNECT_TIMEOUT="2")
    assert r.returncode != 0 and took < 15, (r.returncode, took, r.stderr)
    line = the_line(r.stderr)
    assert "NATS_URL" in line and url in line


def test_nats_refusing_the_login_exits_at_once_naming_the_credentials(tmp_path: Path) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text("authorization { user: alice, password: right }\n")
    port = broker.free_port()
    proc = broker.start(port, tmp_path / "js", extra_args=["-c", str(conf)])
    try:
        r, took = run_worker(tmp_path, NATS_URL=f"nats://127.0.0.1:{port}", HTTP_ADDR="", NATS_USER="alice",
                             NATS_PASSWORD="wrong", NATS_CONNECT_TIMEOUT="30")
    finally:
        broker.stop(proc)
    assert r.returncode != 0 and took < 10, (r.returncode, took, r.stderr)  # refused: no waiting out the timeout
    line = the_line(r.stderr)
    assert "refused" in line and "NATS_USER/NATS_PASSWORD" in line and "wrong" not in line


def test_a_nats_server_without_jetstream_exits_saying_so(tmp_path: Path) -> None:
    port = broker.free_port()
    plain = subprocess.Popen([broker.binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # no -js
    try:
        url = f"nats://127.0.0.1:{port}"
        ends = time.monotonic() + 10
        while not broker.answers(url):
            assert time.monotonic() < ends, "nats-server did not start"
            time.sleep(0.05)
        r, took = run_worker(tmp_path, NATS_URL=url, HTTP_ADDR="")
    finally:
        plain.terminate()
        plain.wait(10)
    assert r.returncode != 0 and took < 10, (r.returncode, took, r.stderr)
    line = the_line(r.stderr)
    assert "no JetStream" in line and "NATS_URL" in line and url in line


# --- fleet up ----------------------------------------------------------------------------------------------------

def fleet(tmp_path: Path, server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.ops.fleet", *args], env=clean_env(tmp_path,
                          NATS_URL=server.url), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_fleet_up_marks_only_workers_that_came_online(server: NatsServer, tmp_path: Path) -> None:
    good = tmp_path / "worker.chat.env"
    good.write_text(SMOLLM2_ENV.read_text().replace("HTTP_ADDR=127.0.0.1:5773", "HTTP_ADDR="))
    bad_file = tmp_path / "broken.gguf"
    bad_file.write_bytes(b"not a model")
    broken = tmp_path / "worker.broken.env"
    broken.write_text(f"MODEL_NAME=broken-chat\nMODEL_KIND=inference\nMODEL_PATH={bad_file}\nMODEL_FORMAT=chat\n")
    run = tmp_path / "data" / "run"
    try:
        first = fleet(tmp_path, server, "up", "--no-monitor", "--timeout", "90", str(good), str(broken))
        out = first.stdout
        assert first.returncode == 1, out + first.stderr
        ok = re.search(r"✓ smollm2-135m: online on inference\.request\.smollm2-135m \(pid (\d+)\)", out)
        assert ok, out
        failed = next(line for line in out.splitlines() if "broken-chat" in line)
        assert failed.startswith("✗ broken-chat: exited with code 1"), out
        assert failed.endswith(f"MODEL_PATH {bad_file} is not a GGUF file (it starts with b'not ', not b'GGUF'); "
                               "point MODEL_PATH at a GGUF model file"), out  # the last line of its log
        assert "✓ broken-chat" not in out
        assert not list(run.glob("broken-chat.*.pid"))  # nothing left to stop

        # a second `up` starts nothing: the worker that runs is said to run, not to have started
        second = fleet(tmp_path, server, "up", "--no-monitor", "--timeout", "30", str(good))
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"smollm2-135m: already running (pid {ok[1]})" in second.stdout
        assert "✓ smollm2-135m: online" not in second.stdout
        assert [f.name for f in run.glob("smollm2-135m.*.pid")] == [f"smollm2-135m.{ok[1]}.pid"]
    finally:
        stopped = fleet(tmp_path, server, "stop")
    assert "stopping smollm2-135m" in stopped.stdout, stopped.stdout + stopped.stderr
