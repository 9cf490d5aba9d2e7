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

from rich.console import Console
from rich.table import Table

from .. import discovery
from .. import protocol as p
from ..config import ROOT, ConfigError, Settings, available_workers, load_settings
from ..connection import NatsUnavailable, connect
from ..logsetup import setup_logging
from ..modelfile import model_path
from ..settings import redact
from . import broker
from .pids import RUN, alive_as, argv_of, record, recorded, stop_pid

DEFAULT_WORKERS = ["gemma3-270m", "gemma3-270m-embed", "minilm-l6-v2"]
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
    proc = broker.start(port, ROOT / "data" / "nats", host=host, log_file=log)
    record("nats", proc.pid, argv_of(proc))
    console.print(f"NATS: nothing answered at {redact(url)}; started embedded nats-server (pid {proc.pid}, "
                  f"JetStream store data/nats/, log {log.relative_to(ROOT)})")


def start_background(name: str, argv: list[str] | None = None, env: dict[str, str] | None = None
                     ) -> subprocess.Popen[bytes]:
    RUN.mkdir(parents=True, exist_ok=True)
    argv = argv or [sys.executable, "-m", "workers", name]
    log = open(RUN / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    record(name, proc.pid, argv)
    return proc


async def wait_online(settings: Settings, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Until an instance of the worker answers health with `online`; False on timeout or when `proc` exits."""
    try:
        nc = await connect(settings.nats_url, name="fleet", timeout=10, auth=settings.nats_auth())
    except NatsUnavailable:
        return False
    try:
        return await discovery.wait_online(nc, settings.model_name, timeout=timeout, alive=lambda: proc.poll() is None,
                                           interval=0.5)
    finally:
        await nc.close()


def up(names: list[str], timeout: float) -> int:
    settings = [load_settings(n) for n in names]
    ensure_nats(settings[0].nats_url)
    failed = start_workers(settings, timeout)
    start_monitor(settings[0].nats_url)
    console.print('\nTry: nats req inference.request.gemma3-270m \'{"input":"What is NATS?"}\'   '
                  "· make logs WORKER=gemma3-270m · make stop")
    return 1 if failed else 0


def start_workers(settings: list[Settings], timeout: float, urls: list[str] | None = None,
                  env: dict[str, str] | None = None, nodes: list[broker.Node] | None = None) -> bool:
    """Start each worker in the background (worker i with NATS_URL `urls[i % len(urls)]`) and wait for it; True
    if any failed. With `nodes`, each line names the node the worker connected to."""
    procs = []
    for i, s in enumerate(settings):
        if urls:
            s = s.model_copy(update={"nats_url": urls[i % len(urls)]})
        procs.append((s, start_background(s.model_name, env={**(env or {}), "NATS_URL": s.nats_url} if urls else env)))
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
                log = RUN / f"{s.model_name}.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                console.print(f"[red]✗[/] {s.model_name}: not online (see {log.relative_to(ROOT)}): "
                              + " / ".join(tail))
    return failed


def cluster(names: list[str], ports: list[int], timeout: float) -> int:
    """Three (or len(ports)) routed nats-server nodes, the workers spread over them with STREAM_REPLICAS, the
    monitor."""
    nodes = ensure_cluster(ports)
    urls = [broker.cluster_urls(nodes, i) for i in range(len(nodes))]  # a different node first for each worker
    failed = start_workers([load_settings(n) for n in names], timeout, urls,
                           env={"STREAM_REPLICAS": str(min(len(nodes), 5))}, nodes=nodes)
    start_monitor(urls[0])
    console.print(f"\nTry: NATS_URL={urls[0]} make monitor-status   · kill a node's pid (data/run/nats.*.pid) "
                  "and watch the fleet carry on · make stop")
    return 1 if failed else 0


def ensure_cluster(ports: list[int]) -> list[broker.Node]:
    """Use the nodes answering on `ports`, or start them (stores under data/cluster/, logs in data/run/)."""
    RUN.mkdir(parents=True, exist_ok=True)
    nodes, started = broker.local_cluster(ports, ROOT / "data" / "cluster", log_dir=RUN)
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
    """The monitor (dashboard on MONITOR_ADDR, default 127.0.0.1:8080) beside the workers, unless ours runs."""
    if any(alive_as(pid, argv) for _, pid, argv in recorded("monitor")):
        console.print("monitor: already running")
        return
    proc = start_background("monitor", [sys.executable, "-m", "monitor"], env={"NATS_URL": nats_url})
    time.sleep(1.0)
    if proc.poll() is None:
        port = os.environ.get("MONITOR_ADDR", ":8080").rpartition(":")[2]
        console.print(f"[green]✓[/] monitor: dashboard on http://127.0.0.1:{port}/ (pid {proc.pid}) "
                      "· make monitor-cli · make monitor-status")
    else:
        log = RUN / "monitor.log"
        console.print(f"[red]✗[/] monitor: exited (see {log.relative_to(ROOT)}): "
                      + " / ".join(log.read_text(errors="replace").strip().splitlines()[-2:]))


def start(name: str) -> int:
    settings = load_settings(name)
    ensure_nats(settings.nats_url)
    argv = [sys.executable, "-m", "workers", name]
    record(name, os.getpid(), argv)  # exec keeps our PID
    os.chdir(ROOT)
    os.execv(sys.executable, argv)


def stop(names: list[str]) -> int:
    targets = names or [*available_workers(), "monitor", "nats"]
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
        path = model_path(s)
        present = "[green]present[/]" if path and path.is_file() else "[yellow]missing[/]"
        running = any(alive_as(pid, argv) for _, pid, argv in recorded(name))
        table.add_row(name + (" [green]●[/]" if running else ""), s.model_kind,
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
    u.add_argument("names", nargs="*", default=DEFAULT_WORKERS)
    u.add_argument("--timeout", type=float, default=300.0)
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
            return up(args.names, args.timeout)
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
