"""A real three-node nats-server cluster per test (free ports, stores under tmp_path), and what the tests need
to pick a node to kill: which one leads a stream, which one a client is connected to."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.ops import broker


@dataclass
class Cluster:
    nodes: list[broker.Node]
    logs: Path

    def url(self, *names: str) -> str:
        """NATS_URL listing the named nodes (all by default), in that order."""
        return ",".join(self.node(n).url for n in names or [n.name for n in self.nodes])

    def node(self, name: str) -> broker.Node:
        return next(n for n in self.nodes if n.name == name)

    def alive(self) -> list[broker.Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def kill(self, name: str) -> None:
        """SIGKILL: no lame-duck mode, no goodbye to the routes or the clients."""
        proc = self.node(name).proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> None:
        """The node again, with its config and its JetStream store as the kill left them."""
        node = self.node(name)
        broker.start_node(node, self.logs / f"nats-{name}.log")

    def node_of(self, client_name: str) -> str | None:
        """The node a client (by its connection name) is connected to, from the nodes' /connz."""
        return broker.connections(self.alive()).get(client_name)

    def stop(self) -> None:
        for node in self.alive():
            broker.stop(node.proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three routed nodes n1..n3, JetStream on each (stores in tmp_path/cluster/n*), monitoring ports for /connz."""
    ports = [broker.free_port() for _ in range(9)]
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    nodes = broker.start_cluster(ports[0:3], ports[3:6], tmp_path / "cluster", http_ports=ports[6:9], log_dir=logs)
    c = Cluster(nodes, logs)
    yield c
    c.stop()
