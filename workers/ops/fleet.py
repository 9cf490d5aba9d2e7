"""`fleet` / the Makefile's verbs: nats, up, cluster, start, stop, list-workers, logs.

Every process this starts has its PID recorded under data/run/; `stop` signals only those
PIDs (after checking the process is still the one we started), never processes found by name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import discovery
from .. import protocol as p
from ..config import ROOT, ConfigError, Settings, available_workers, load_settings
from ..connection import NatsUnavailable, connect
from ..logsetup import setup_logging
from ..modelfile import located
from ..settings import redact
from . import broker
from .pids import DATA, RUN, alive_as, argv_of, pidfile, record, recorded, recorded_names, stop_pid

DEFAULT_WORKERS = ["smollm2-135m", "gemma3-270m", "gemma3-270m-embed", "minilm-l6-v2"]
console = Console() if sys.stdout.isatty() else Console(width=160)  # pipes and CI logs get full rows
log = logging.getLogger(__name__)


# --- verbs -----------------------------------------------------------------------------

def ensure_nats(url: str) -> None:
    """Use the server at `url`, or start the embedded one there (store in data/nats/)."""
    if broker.answers(url):
        console.print(f"NATS: using the server at {redact(url)}")
        return
    host, port = broker.host_port(url)
    log = RUN / "nats.log"
    RUN.mkdir(parents=True, exist_ok=True)
    proc = broker.start(port, DATA / "nats", host=host, log_file=log)
    record("nats", proc.pid, argv_of(proc))
    console.print(f"NATS: nothing answered at {redact(url)}; started embedded nats-server (pid {proc.pid}, "
                  f"JetStream store {shown(DATA / 'nats')}/, log {shown(log)})")


def shown(path: Path) -> str:
    """A path as the user reads it: relative to the checkout when it lies inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass(frozen=True)
class Spec:
    """One worker to start: its settings and the command line (a name from envs/, or an env file)."""

    settings: Settings
    argv: list[str]

    @property
    def name(self) -> str:
        return self.settings.model_name


def spec(arg: str) -> Spec:
    """`smollm2-135m` (envs/worker.smollm2-135m.env) or a path to an env file (`path/worker.x.env`)."""
    if arg.endswith(".env") or os.sep in arg:
        path = Path(arg).expanduser().resolve()
        return Spec(load_settings(env_file=path), [sys.executable, "-m", "workers", "--env", str(path)])
    return Spec(load_settings(arg), [sys.executable, "-m", "workers", arg])


def start_background(name: str, argv: list[str] | None = None, env: dict[str, str] | None = None
                     ) -> subprocess.Popen[bytes]:
    RUN.mkdir(parents=True, exist_ok=True)
    argv = argv or [sys.executable, "-m", "workers", name]
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    record(name, proc.pid, argv)
    return proc


async def wait_online(settings: Settings, proc: subprocess.Popen[bytes], timeout: float,
                      nc: NATS | None = None) -> bool:
    """Until this process's worker sends `online` (its ready heartbeat; asked for as health, which carries the same
    body); False on timeout or when `proc` exits. Another instance of the model being online does not count.
    Asked on `nc` (the host agent's), else on a connection of its own with the worker's settings."""
    if nc is None:
        try:
            own = await connect(settings.nats_url, name="fleet", timeout=10, auth=settings.nats_auth())
        except NatsUnavailable:
            return False
        try:
            return await wait_online(settings, proc, timeout, own)
        finally:
            await own.close()
    # The child names itself <model>-<host>-<its pid> unless WORKER_ID names it (our settings were loaded in this
    # process, so a generated id ends in our pid).
    generated = settings.worker_id.endswith(f"-{os.getpid()}")
    return await discovery.wait_online(nc, settings.model_name, timeout=timeout, alive=lambda: proc.poll() is None,
                                       interval=0.5, worker_id=None if generated else settings.worker_id,
                                       pid=proc.pid if generated else None)


def up(names: list[str], timeout: float, monitor: bool = True) -> int:
    specs = [spec(n) for n in names]
    ensure_nats(specs[0].settings.nats_url)
    failed = start_workers(specs, timeout)
    if monitor:
        start_agent(specs[0].settings.nats_url)
        start_monitor(specs[0].settings.nats_url)
    console.print('\nTry: nats req --timeout 30s inference.request.smollm2-135m \'{"input":"What is NATS?"}\'   '
                  "· make logs WORKER=smollm2-135m · make stop")
    return 1 if failed else 0


def running(name: str) -> list[int]:
    """PIDs of the recorded processes of `name` that still run."""
    return [pid for _, pid, argv in recorded(name) if alive_as(pid, argv)]


def start_workers(specs: list[Spec], timeout: float, urls: list[str] | None = None,
                  env: dict[str, str] | None = None, nodes: list[broker.Node] | None = None) -> bool:
    """Start each worker in the background (worker i with NATS_URL `urls[i % len(urls)]`) unless ours already runs,
    and wait for its ready heartbeat: ✓ for those that sent one, ✗ and the last line of the log for the others.
    True if any failed. With `nodes`, each line names the node the worker connected to."""
    procs = []
    for i, sp in enumerate(specs):
        s = sp.settings
        if pids := running(sp.name):
            console.print(f"[green]·[/] {sp.name}: already running (pid {', '.join(map(str, pids))})")
            continue
        if urls:
            s = s.model_copy(update={"nats_url": urls[i % len(urls)]})
        child_env = {**(env or {}), "NATS_URL": s.nats_url} if urls else env
        procs.append((s, start_background(sp.name, sp.argv, env=child_env)))
    failed = False
    with console.status("waiting for workers to load their models …"):
        for s, proc in procs:
            if asyncio.run(wait_online(s, proc, timeout)):
                conns = broker.connections(nodes) if nodes else {}
                node = next((n for name, n in conns.items() if name in (s.worker_id, f"{s.model_name}-"
                             f"{socket.gethostname()}-{proc.pid}")), None)  # the child's own default worker id
                where = f", connected to {node}" if node else ""
                console.print(f"[green]✓[/] {s.model_name}: online on "
                              f"{p.request_subject(s.model_kind, s.model_name)} (pid {proc.pid}{where})")
            else:
                failed = True
                console.print(f"[red]✗[/] {s.model_name}: {escape(not_online(s.model_name, proc, timeout))}",
                              highlight=False, soft_wrap=True)  # one line, whole, to copy from
    return failed


def not_online(name: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Why a worker sent no ready heartbeat, with the last line of its log."""
    log = RUN / f"{name}.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    last = lines[-1].strip() if lines else "(the log is empty)"
    code = proc.poll()
    if code is None:
        return (f"no ready heartbeat within {timeout:g} s, still running (pid {proc.pid}; make stop ends it); "
                f"{shown(log)}: {last}")
    pidfile(name, proc.pid).unlink(missing_ok=True)
    return f"exited with code {code}; {shown(log)}: {last}"


def cluster(names: list[str], ports: list[int], timeout: float) -> int:
    """Three (or len(ports)) routed nats-server nodes, the workers spread over them with STREAM_REPLICAS, the
    monitor."""
    nodes = ensure_cluster(ports)
    urls = [broker.cluster_urls(nodes, i) for i in range(len(nodes))]  # a different node first for each worker
    failed = start_workers([spec(n) for n in names], timeout, urls,
                           env={"STREAM_REPLICAS": str(min(len(nodes), 5))}, nodes=nodes)
    start_monitor(urls[0])
    console.print(f"\nTry: NATS_URL={urls[0]} make monitor-status   · kill a node's pid (data/run/nats.*.pid) "
                  "and watch the fleet carry on · make stop")
    return 1 if failed else 0


def ensure_cluster(ports: list[int]) -> list[broker.Node]:
    """Use the nodes answering on `ports`, or start them (stores under data/cluster/, logs in data/run/)."""
    RUN.mkdir(parents=True, exist_ok=True)
    nodes, started = broker.local_cluster(ports, DATA / "cluster", log_dir=RUN)
    if not started:
        console.print(f"NATS cluster: using the servers at {broker.cluster_urls(nodes)}")
    for n in nodes if started else []:
        assert n.proc is not None
        record("nats", n.proc.pid, argv_of(n.proc))
        console.print(f"[green]✓[/] NATS {n.name}: pid {n.proc.pid}, clients {n.url}, routes :{n.cluster_port}, "
                      f"monitoring http://{n.host}:{n.http_port}/, store data/cluster/{n.name}/, "
                      f"log data/run/nats-{n.name}.log")
    return nodes


def start_monitor(nats_url: str) -> None:
    """The monitor (dashboard on MONITOR_ADDR, default 127.0.0.1:8080) and the gateway (the OpenAI API for every
    model on GATEWAY_ADDR, default 127.0.0.1:8000) beside the workers, unless ours run."""
    port = os.environ.get("MONITOR_ADDR", ":8080").rpartition(":")[2]
    start_front("monitor", nats_url, http_answers(f"http://127.0.0.1:{port}/healthz"),
                f"dashboard on http://127.0.0.1:{port}/ (pid {{pid}}) · make monitor-cli · make monitor-status")
    port = os.environ.get("GATEWAY_ADDR", ":8000").rpartition(":")[2]
    start_front("gateway", nats_url, http_answers(f"http://127.0.0.1:{port}/health"),
                f"OpenAI API on http://127.0.0.1:{port}/v1 (pid {{pid}}) · curl http://127.0.0.1:{port}/v1/models")


def start_agent(nats_url: str) -> None:
    """This machine's host agent (workers/ops/agent.py: the gateway's load and unload), unless ours runs; it is
    ready once its log says it is answering."""
    log = RUN / "agent.log"
    start = log.stat().st_size if log.exists() else 0

    def answering() -> bool:
        with log.open("rb") as f:
            f.seek(start)
            return b"answering" in f.read()

    start_front("agent", nats_url, answering, "loads and unloads workers of this machine for the gateway "
                "(pid {pid})", module="workers.ops.agent")


def http_answers(url: str) -> Callable[[], bool]:
    """Whether `url` answers at all (a 503 while the process connects to NATS counts)."""
    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).close()
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        return True
    return answers


def start_front(name: str, nats_url: str, ready: Callable[[], bool], serves: str, module: str | None = None,
                timeout: float = 15.0) -> None:
    """`python -m <module>` (default: `name`) in the background unless ours runs; ✓ and `serves` (its `{pid}`
    filled in) once `ready()`, ✗ with its log's last lines if it exits, a warning if neither within `timeout`."""
    if pids := running(name):
        console.print(f"[green]·[/] {name}: already running (pid {', '.join(map(str, pids))})")
        return
    proc = start_background(name, [sys.executable, "-m", module or name], env={"NATS_URL": nats_url})
    log = RUN / f"{name}.log"
    ends, answered = time.monotonic() + timeout, False
    while proc.poll() is None and time.monotonic() < ends and not (answered := ready()):
        time.sleep(0.2)
    if answered:
        console.print(f"[green]✓[/] {name}: {serves.format(pid=proc.pid)}")
    elif proc.poll() is None:
        console.print(f"[yellow]·[/] {name}: started (pid {proc.pid}) but not answering within {timeout:g} s; "
                      f"see {shown(log)}")
    else:
        pidfile(name, proc.pid).unlink(missing_ok=True)
        console.print(f"[red]✗[/] {name}: exited (see {shown(log)}): "
                      + " / ".join(log.read_text(errors="replace").strip().splitlines()[-2:]))


def start(name: str) -> int:
    settings = load_settings(name)
    ensure_nats(settings.nats_url)
    argv = [sys.executable, "-m", "workers", name]
    record(name, os.getpid(), argv)  # exec keeps our PID
    os.chdir(ROOT)
    os.execv(sys.executable, argv)


def stop(names: list[str]) -> int:
    # the agent first (it starts nothing more), the workers, then the monitor and the gateway, NATS last (the workers
    # drain through it)
    targets = names or sorted(recorded_names(),
                              key=lambda n: (n != "agent", n == "nats", n in ("monitor", "gateway"), n))
    stopped = 0
    for name in targets:
        for f, pid, argv in recorded(name):
            if alive_as(pid, argv):
                console.print(f"stopping {name} (pid {pid})")
                stop_pid(pid, grace=40.0)
                stopped += 1
            f.unlink(missing_ok=True)
    if not stopped:
        console.print("nothing to stop (no recorded process is running)")
    return 0


def list_workers() -> int:
    table = Table(title="workers (envs/)")
    for col in ("name", "kind", "subject", "http", "model source", "file"):
        table.add_column(col)
    for name in available_workers():
        try:
            s = load_settings(name)
        except ConfigError as e:
            table.add_row(name, "[red]invalid[/]", str(e), "", "", "")
            continue
        source = (f"package {s.model_package}" if s.model_package else
                  f"hf {s.model_repo}/{s.model_file}" if s.model_repo else s.model_path or "?")
        present = "[green]present[/]" if located(s) else "[yellow]missing[/]"
        table.add_row(name + (" [green]●[/]" if running(name) else ""), s.model_kind,
                      p.request_subject(s.model_kind, s.model_name), s.http_addr or "-", source, present)
    console.print(table)
    return 0


def logs(name: str, limit: int) -> int:
    from ..store import read_recent

    s = load_settings(name)
    if not s.log_path.exists():
        log.error("no log yet at %s; start the worker with `make start WORKER=%s`", s.log_path, name)
        return 1
    req = Table(title=f"{name}: last {limit} requests")
    for col in ("time", "req_id", "status", "finish", "in/out", "queue ms", "ms", "input", "output / error"):
        req.add_column(col, overflow="fold")
    for r in reversed(read_recent(s.log_path, "requests", limit)):
        req.add_row(time.strftime("%H:%M:%S", time.localtime(r["ts"])), r["req_id"] or "", r["status"] or "",
                    r["finish_reason"] or "", f"{r['tokens_in'] or 0}/{r['tokens_out'] or 0}",
                    f"{r['queue_ms'] or 0:.0f}", f"{r['dur_ms'] or 0:.0f}", _input_text(r["raw_input"])[:60],
                    (r["error"] or r["response_text"] or "")[:80])
    ev = Table(title=f"{name}: last {limit} events")
    for col in ("time", "level", "code", "message"):
        ev.add_column(col, overflow="fold")
    for r in reversed(read_recent(s.log_path, "events", limit)):
        ev.add_row(time.strftime("%H:%M:%S", time.localtime(r["ts"])), r["level"], r["code"], r["msg"] or "")
    console.print(req, ev)
    return 0


def _input_text(raw: str | None) -> str:
    """The prompt a caller sent, for display: `input`, or the last chat message, or the raw body."""
    try:
        body = json.loads(raw or "")
        if isinstance(body.get("input"), str):
            return body["input"]
        if isinstance(body.get("input"), list):
            return " | ".join(map(str, body["input"]))
        return str(body["messages"][-1]["content"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return raw or ""


def _ports(value: str) -> list[int]:
    ports = [int(v) for v in value.split(",") if v.strip().isdigit()]
    if len(ports) < 3 or len(set(ports)) != len(ports) or len(ports) != len(value.split(",")):
        raise ConfigError(f"CLUSTER_PORTS must be three or more different client ports like 4222,4223,4224 "
                          f"(JetStream replicas need a quorum), got {value!r}")
    return ports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fleet", description="Run and inspect the local worker fleet.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("nats", help="start the embedded nats-server unless one answers at NATS_URL")
    u = sub.add_parser("up", help="NATS + the default workers, in the background")
    u.add_argument("names", nargs="*", default=DEFAULT_WORKERS, help="worker names (envs/) or env files")
    u.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each worker's ready heartbeat")
    u.add_argument("--no-monitor", dest="monitor", action="store_false",
                   help="do not start the agent, the monitor or the gateway")
    c = sub.add_parser("cluster", help="a local 3-node NATS cluster + the default workers spread over it + monitor")
    c.add_argument("names", nargs="*", default=DEFAULT_WORKERS)
    c.add_argument("--ports", default=os.environ.get("CLUSTER_PORTS", "4222,4223,4224"),
                   help="client ports, one per node (routes on port+2000, monitoring on port+4000)")
    c.add_argument("--timeout", type=float, default=300.0)
    st = sub.add_parser("start", help="one worker in the foreground")
    st.add_argument("name")
    sp = sub.add_parser("stop", help="stop recorded workers (all, or the named ones) and the embedded NATS")
    sp.add_argument("names", nargs="*")
    sub.add_parser("list-workers", help="the workers envs/ defines")
    lg = sub.add_parser("logs", help="recent requests and events from a worker's SQLite log")
    lg.add_argument("name")
    lg.add_argument("-n", "--limit", type=int, default=15)
    args = ap.parse_args(argv)
    setup_logging()
    try:
        if args.cmd == "nats":
            ensure_nats(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
            return 0
        if args.cmd == "up":
            return up(args.names, args.timeout, args.monitor)
        if args.cmd == "cluster":
            return cluster(args.names, _ports(args.ports), args.timeout)
        if args.cmd == "start":
            return start(args.name)
        if args.cmd == "stop":
            return stop(args.names)
        if args.cmd == "list-workers":
            return list_workers()
        return logs(args.name, args.limit)
    except (ConfigError, broker.BrokerError) as e:
        log.error("error: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
