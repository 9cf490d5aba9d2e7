"""The fleet verbs as a user runs them (`python -m workers.ops.fleet`, what `make up/stop/list-workers/logs` call):
an embedded nats-server only when nothing answers at NATS_URL, every started process recorded by PID, the monitor
and the gateway started beside the workers, a second `up` that starts nothing, and a `stop` that signals only the
recorded PIDs still running the recorded command line.

Isolation: every command runs with DATA_DIR in a temporary directory, so the PID records (DATA_DIR/run), the logs
and the embedded JetStream store stay out of the checkout's data/ (a developer's own records there are never read),
and NATS_URL, MONITOR_ADDR and GATEWAY_ADDR point at free ports. One worker, minilm-l6-v2 (its env file's model,
fast to load). The processes of this fleet are told apart from every other one by that DATA_DIR in their
environment, so "nothing unrecorded was started" is checked against the whole process table.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from workers.config import ROOT, load_settings
from workers.modelfile import resolve
from workers.ops import broker
from workers.ops.pids import alive_as

from .conftest import serve_nats

pytestmark = pytest.mark.model  # `up` starts a worker that loads minilm-l6-v2

WORKER = "minilm-l6-v2"
SUBJECT = f"embedding.request.{WORKER}"
STRIPPED = ("MODEL_", "WORKER_", "QUEUE_", "DEFAULT_", "GATEWAY_", "MONITOR_", "PURGE_", "HTTP_", "NATS_", "DATA_")


# --- helpers ---------------------------------------------------------------------------

def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def running_with(data: Path) -> set[int]:
    """Every live process whose environment has DATA_DIR=`data`: all that a fleet command with it started."""
    mark = f"DATA_DIR={data}".encode()
    out = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0") and not gone(int(environ.parent.name)):
                out.add(int(environ.parent.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return out


def free_addr() -> str:
    return f"127.0.0.1:{broker.free_port()}"


@dataclass
class Fleet:
    """The fleet CLI bound to one temporary DATA_DIR and one NATS_URL."""

    data: Path
    nats_url: str
    env: dict[str, str]

    @property
    def run(self) -> Path:
        return self.data / "run"

    def monitor_health(self) -> str:
        return f"http://{self.env['MONITOR_ADDR']}/healthz"

    def gateway_health(self) -> str:
        return f"http://{self.env['GATEWAY_ADDR']}/health"

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "workers.ops.fleet", *args], env={**self.env, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def up(self, *args: str) -> str:
        # HTTP_ADDR empty: the worker serves NATS only (its env file's port may be a developer's running worker)
        done = self.cli("up", WORKER, "--timeout", "120", *args, HTTP_ADDR="")
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()
        return done.stdout

    def stop(self) -> str:
        done = self.cli("stop")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def processes(self) -> set[int]:
        return running_with(self.data)

    def records(self) -> dict[str, tuple[int, list[str]]]:
        """data/run's PID records by file name: (pid, argv)."""
        out = {}
        for f in sorted(self.run.glob("*.pid")):
            info = json.loads(f.read_text())
            out[f.name] = (int(info["pid"]), list(info["argv"]))
        return out

    def pids(self, name: str) -> list[int]:
        return [pid for f, (pid, _) in self.records().items() if f.startswith(f"{name}.")]

    def logs(self) -> str:
        return "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in self.run.glob("*.log"))

    def kill_leftovers(self) -> None:
        """After a failed test: end what our records still name (all ours: this DATA_DIR is the test's)."""
        for _, (pid, argv) in self.records().items():
            if alive_as(pid, argv):
                os.kill(pid, signal.SIGKILL)


def fleet_at(tmp: Path, nats_url: str) -> Fleet:
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED)}
    env.update(DATA_DIR=str(tmp / "data"), NATS_URL=nats_url, NATS_CONNECT_TIMEOUT="10",
               MONITOR_ADDR=free_addr(), GATEWAY_ADDR=free_addr())
    return Fleet(tmp / "data", nats_url, env)


def answers_http(url: str) -> int:
    return httpx.get(url, timeout=5).status_code


async def embed(nats_url: str, req_id: str, text: str) -> dict[str, object]:
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(SUBJECT, json.dumps({"req_id": req_id, "input": text}).encode(), timeout=60)
    finally:
        await nc.close()
    reply: dict[str, object] = json.loads(msg.data)
    return reply


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> Path:
    """The env file's own MODEL_PATH, converted once if a fresh clone lacks it (the fleet's `up` then just loads
    it)."""
    return resolve(load_settings(WORKER))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Iterator[tuple[Fleet, str]]:
    """`up` once, with nothing answering at NATS_URL: (the fleet, what the first `up` printed)."""
    tmp = tmp_path_factory.mktemp("fleet")
    url = f"nats://127.0.0.1:{broker.free_port()}"
    assert not broker.answers(url)
    f = fleet_at(tmp, url)
    try:
        yield f, f.up()
    finally:
        f.kill_leftovers()


# --- up with nothing at NATS_URL -------------------------------------------------------

def test_up_starts_an_embedded_nats_when_none_answers(fleet: tuple[Fleet, str]) -> None:
    f, out = fleet
    [pid] = f.pids("nats")
    argv = f.records()[f"nats.{pid}.pid"][1]
    port = str(broker.host_port(f.nats_url)[1])
    assert Path(argv[0]).name == "nats-server" and "-js" in argv and argv[argv.index("-p") + 1] == port
    assert alive_as(pid, argv) and broker.answers(f.nats_url)
    assert f"NATS: nothing answered at {f.nats_url}; started embedded nats-server (pid {pid}," in out
    assert (f.data / "nats" / "jetstream").is_dir()  # its store under DATA_DIR, not the checkout


def test_up_brings_the_worker_online_and_records_its_pid(fleet: tuple[Fleet, str]) -> None:
    f, out = fleet
    [pid] = f.pids(WORKER)
    assert f"✓ {WORKER}: online on {SUBJECT} (pid {pid})" in out, out
    assert f.records()[f"{WORKER}.{pid}.pid"][1][1:] == ["-m", "workers", WORKER]
    reply = asyncio.run(embed(f.nats_url, "fleet-up-1", "The fleet is up."))
    assert len(reply["data"][0]["embedding"]) == 384, reply  # type: ignore[index]


def test_up_starts_the_monitor_and_the_gateway_beside_the_workers(fleet: tuple[Fleet, str]) -> None:
    f, out = fleet
    [monitor] = f.pids("monitor")
    [gateway] = f.pids("gateway")
    assert f.records()[f"monitor.{monitor}.pid"][1][1:] == ["-m", "monitor"]
    assert f.records()[f"gateway.{gateway}.pid"][1][1:] == ["-m", "gateway"]
    assert f"✓ monitor: dashboard on http://{f.env['MONITOR_ADDR']}/ (pid {monitor})" in out, out
    assert f"✓ gateway: OpenAI API on http://{f.env['GATEWAY_ADDR']}/v1 (pid {gateway})" in out, out
    assert answers_http(f.monitor_health()) == 200
    assert answers_http(f.gateway_health()) == 200
    [agent] = f.pids("agent")
    assert f.records()[f"agent.{agent}.pid"][1][1:] == ["-m", "workers.ops.agent"]
    assert f"✓ agent: loads and unloads workers of this machine for the gateway (pid {agent})" in out, out


def test_a_second_up_starts_nothing(fleet: tuple[Fleet, str]) -> None:
    f, _ = fleet
    before = f.records()
    assert f.processes() == {pid for pid, _ in before.values()}  # every process the first `up` left is recorded
    out = f.up()
    assert f.records() == before
    assert f.processes() == {pid for pid, _ in before.values()}
    assert f"NATS: using the server at {f.nats_url}" in out, out
    for name in (WORKER, "agent", "monitor", "gateway"):
        [pid] = f.pids(name)
        assert f"· {name}: already running (pid {pid})" in out, out
    assert "✓" not in out and "started embedded" not in out, out


# --- list-workers and logs -------------------------------------------------------------

def test_list_workers_shows_every_worker_envs_defines(fleet: tuple[Fleet, str]) -> None:
    f, _ = fleet
    done = f.cli("list-workers")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.count("│") >= 6]
    rows = {name: line for line in lines if (name := line.split("│")[1].strip())}  # not a wrapped cell's 2nd line
    names = sorted(p.name[len("worker."):-len(".env")] for p in (ROOT / "envs").glob("worker.*.env"))
    assert sorted(n.removesuffix(" ●") for n in rows) == names
    assert [n for n in rows if n.endswith("●")] == [f"{WORKER} ●"]  # the one running, from its PID record
    for name, line in rows.items():
        s = load_settings(name.removesuffix(" ●"))
        assert f"{s.model_kind}.request.{s.model_name}" in line and (s.http_addr or "-") in line, line


def test_logs_shows_the_workers_last_requests(fleet: tuple[Fleet, str]) -> None:
    f, _ = fleet
    reply = asyncio.run(embed(f.nats_url, "fleet-logs-7", "Shown by make logs."))
    assert "data" in reply, reply
    ends, out = time.monotonic() + 20, ""
    while "fleet-logs-7" not in out:  # the worker's log writer is asynchronous
        assert time.monotonic() < ends, out
        done = f.cli("logs", WORKER, "-n", "5")
        assert done.returncode == 0, done.stderr
        out = done.stdout
    row = next(line for line in out.splitlines() if "fleet-logs-7" in line)
    assert "ok" in row and "Shown by make logs." in row, out
    assert f"{WORKER}: last 5 events" in out


def test_logs_of_a_worker_never_started_says_how_to_start_it(fleet: tuple[Fleet, str]) -> None:
    f, _ = fleet
    done = f.cli("logs", "gemma3-270m")
    assert done.returncode == 1
    assert "no log yet at" in done.stderr and "make start WORKER=gemma3-270m" in done.stderr, done.stderr


# --- load and unload through the gateway and this machine's agent ------------------------

def test_the_gateway_unloads_and_loads_a_worker_through_the_host_agent(fleet: tuple[Fleet, str]) -> None:
    f, _ = fleet
    api = f"http://{f.env['GATEWAY_ADDR']}/v1/models"
    [old] = f.pids(WORKER)
    gone_ = httpx.post(f"{api}/{WORKER}/unload", timeout=60)
    assert gone_.status_code == 200, gone_.text
    assert gone_.json()["status"] == "stopped" and gone_.json()["hosts"][0]["pids"] == [old]
    assert f.pids(WORKER) == [] and gone(old)
    again = httpx.post(f"{api}/{WORKER}/unload", timeout=60)
    assert again.status_code == 200 and again.json()["status"] == "not_running"
    loaded = httpx.post(f"{api}/{WORKER}/load", timeout=150)
    assert loaded.status_code == 200, loaded.text + f.logs()
    [new] = f.pids(WORKER)
    assert loaded.json()["status"] == "online" and loaded.json()["hosts"][0]["pids"] == [new] != [old]
    assert "data" in asyncio.run(embed(f.nats_url, "after-load", "Loaded again."))  # it serves
    assert httpx.post(f"{api}/{WORKER}/load", timeout=60).json()["status"] == "running"
    unknown = httpx.post(f"{api}/no-such-model/load", timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_worker"
    assert "envs/worker.no-such-model.env" in unknown.json()["error"]["message"]
    host = httpx.post(f"{api}/{WORKER}/load", json={"host": "elsewhere"}, timeout=60)
    assert host.status_code == 404 and host.json()["error"]["type"] == "unknown_host"


# --- stop ------------------------------------------------------------------------------

def test_stop_ends_exactly_the_recorded_processes(fleet: tuple[Fleet, str], tmp_path: Path) -> None:
    f, _ = fleet
    ours = {name: pid for name in ("agent", WORKER, "gateway", "monitor", "nats") for pid in f.pids(name)}
    assert len(ours) == 5
    # a reused PID: the record names a worker, the process is something else
    impostor = subprocess.Popen(["sleep", "300"])
    fake = f.run / f"{WORKER}.{impostor.pid}.pid"
    fake.write_text(json.dumps({"pid": impostor.pid, "argv": [sys.executable, "-m", "workers", WORKER]}))
    # a monitor nobody recorded, with the command line of the recorded one: never found by name
    bystander = subprocess.Popen([sys.executable, "-m", "monitor"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT, env={**f.env, "MONITOR_ADDR": free_addr()})
    try:
        out = f.stop()
        stopping = re.findall(r"^stopping (\S+) \(pid (\d+)\)$", out, re.M)
        # the agent, the workers, then the monitor and the gateway, NATS last
        assert stopping == [("agent", str(ours["agent"])), (WORKER, str(ours[WORKER])),
                            ("gateway", str(ours["gateway"])), ("monitor", str(ours["monitor"])),
                            ("nats", str(ours["nats"]))], out
        assert all(gone(pid) for pid in ours.values())
        assert f.processes() == {bystander.pid}  # it has the fleet's DATA_DIR too
        assert not broker.answers(f.nats_url)
        assert impostor.poll() is None and bystander.poll() is None
        assert f.records() == {}  # the impostor's stale record is dropped too
        assert not [r for pid in ours.values() for r in (ROOT / "data" / "run").glob(f"*.{pid}.pid")]
        assert "nothing to stop" in f.stop()
    finally:
        for proc in (impostor, bystander):
            proc.kill()
            proc.wait()


# --- up when a server answers ----------------------------------------------------------

def test_up_uses_the_nats_that_answers_and_stop_leaves_it_running(tmp_path: Path, minilm: Path) -> None:
    servers = serve_nats(tmp_path)
    server = next(servers)
    f = fleet_at(tmp_path, server.url)
    try:
        out = f.up("--no-monitor")
        assert f"NATS: using the server at {server.url}" in out and "embedded" not in out, out
        assert f.pids("nats") == [] and not (f.data / "nats").exists()
        [pid] = f.pids(WORKER)
        assert f"✓ {WORKER}: online on {SUBJECT} (pid {pid})" in out, out
        assert set(f.records()) == {f"{WORKER}.{pid}.pid"}  # --no-monitor: no agent, monitor or gateway
        f.stop()
        assert gone(pid) and f.processes() == set() and broker.answers(server.url)
    finally:
        f.kill_leftovers()
        next(servers, None)
