"""The queue on a real three-node cluster: replicas only ever go up, and killing nodes under load loses nothing.

The caller sits on a node the test never kills: replies are core NATS, so a caller whose own server dies misses
the ones sent meanwhile (its retry's business, not the queue's). Everything else is fair game: the stream's
leader, then the node a worker is connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.js.errors import APIError

from workers import discovery
from workers import protocol as p
from workers.config import ROOT
from workers.store import read_recent
from workers.streams import ensure_consumer, ensure_stream

from .cluster_support import Cluster, cluster  # noqa: F401 - fixture
from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc
from .unit_support import unit_settings

SUBJECT = "inference.request.gemma3-270m"
N_REQUESTS = 40
ACK_WAIT_S = 10  # well above a leader election (2-9 s here), so a retried ack lands before a redelivery


async def stream_leader(js: Any) -> str:
    return (await js.stream_info(p.STREAM_NAME)).cluster.leader


async def test_replicas_go_up_with_a_worker_that_asks_more_and_never_down(cluster, tmp_path):  # noqa: F811
    nc = await nats.connect(cluster.url().split(","))
    js = nc.jetstream()
    one = unit_settings(cluster.url(), tmp_path, stream_replicas=1)
    assert await ensure_stream(js, one) == []
    await ensure_consumer(js, one)
    assert (await js.stream_info(p.STREAM_NAME)).config.num_replicas == 1

    assert await ensure_stream(js, unit_settings(cluster.url(), tmp_path, stream_replicas=3)) == []
    assert (await js.stream_info(p.STREAM_NAME)).config.num_replicas == 3  # its followers join within ~10 s

    # The case: a worker with one replica and another QUEUE_MAX_PER_MODEL used to reset the stream to 1.
    kept = await ensure_stream(js, unit_settings(cluster.url(), tmp_path, stream_replicas=1, queue_max_per_model=200))
    assert (await js.stream_info(p.STREAM_NAME)).config.num_replicas == 3
    assert [(d.field, d.current, d.wanted) for d in kept] == [("num_replicas", 3, 1),
                                                              ("max_msgs_per_subject", 1000, 200)]

    kept = await ensure_stream(js, unit_settings(cluster.url(), tmp_path, stream_replicas=5))
    assert [(d.field, d.level) for d in kept] == [("num_replicas", "warning")]  # 5 copies on 3 servers: refused
    assert (await js.stream_info(p.STREAM_NAME)).config.num_replicas == 3
    await nc.close()


@pytest_asyncio.fixture
async def cluster_worker(cluster: Cluster, model_path: Path, tmp_path: Path  # noqa: F811
                         ) -> AsyncIterator[Callable[..., Any]]:
    """`await cluster_worker(worker_id, nats_url, **env)`: a real gemma3-270m worker process on the cluster."""
    started: list[WorkerProc] = []

    async def start(worker_id: str, nats_url: str, **overrides: Any) -> WorkerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_", "NATS_"))}
        env.update(NATS_URL=nats_url, DATA_DIR=str(tmp_path / "data"), MODEL_PATH=str(model_path),
                   PROMPT_TEMPLATE=str(GEMMA_TEMPLATE), HTTP_ADDR="", NATS_CONNECT_TIMEOUT="10", WORKER_ID=worker_id,
                   STREAM_REPLICAS="3", WORKER_CONCURRENCY="1", MODEL_THREADS="1", QUEUE_ACK_WAIT_S=str(ACK_WAIT_S))
        env.update({k: str(v) for k, v in overrides.items()})
        log = tmp_path / f"{worker_id}.log"
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(GEMMA_ENV)], env=env,
                                cwd=ROOT, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT)
        w = WorkerProc(proc, "gemma3-270m", env, log, tmp_path / "data")
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


async def caught_up(js: Any, node: str, durable: str, timeout: float = 60) -> None:
    """Until `node` is a current replica of the stream and of the consumer again (a second node lost before
    that would leave a group without a quorum: two failures at once, not one)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(TimeoutError, APIError):  # the JetStream API may be electing too
            infos = [await asyncio.wait_for(js.stream_info(p.STREAM_NAME), 3),
                     await asyncio.wait_for(js.consumer_info(p.STREAM_NAME, durable), 3)]
            if all(i.cluster.leader == node or any(r.name == node and r.current for r in i.cluster.replicas or [])
                   for i in infos):
                return
        assert time.monotonic() < deadline, f"{node} did not catch up with the stream and its consumer"
        await asyncio.sleep(0.1)


async def online(url: str, w: WorkerProc, timeout: float = 120) -> None:
    nc = await nats.connect(url)
    try:
        ok = await discovery.wait_online(nc, w.model, worker_id=w.env["WORKER_ID"], timeout=timeout,
                                         alive=lambda: w.proc.poll() is None)
    finally:
        await nc.close()
    assert ok, f"{w.env['WORKER_ID']} not online (exit code {w.proc.poll()}):\n{w.output()}"


class Answers:
    """Every reply on every request's own inbox, with its arrival time, so a second answer would show."""

    def __init__(self) -> None:
        self.got: dict[str, list[dict[str, Any]]] = {}
        self.times: list[float] = []
        self.by_worker: dict[str, list[float]] = {}

    async def on_reply(self, msg: Any) -> None:
        body, now = json.loads(msg.data), time.monotonic()
        if body["req_id"] not in self.got:
            self.times.append(now)
        self.got.setdefault(body["req_id"], []).append(body)
        self.by_worker.setdefault(body.get("worker_id", ""), []).append(now)

    def count(self) -> int:
        """Requests answered (a second answer to one is not counted)."""
        return len(self.got)

    def after(self, t: float) -> int:
        return sum(1 for x in self.times if x > t)

    def first_after(self, t: float) -> float:
        return min(x for x in self.times if x > t) - t

    async def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what} ({self.count()} answers so far)"
            await asyncio.sleep(0.05)


@pytest.mark.model
async def test_killing_the_leader_then_a_workers_node_under_load_loses_and_repeats_nothing(
        cluster, cluster_worker, tmp_path):  # noqa: F811
    # The stream (3 replicas) first, so the caller can sit on a node that does not lead it.
    setup = await nats.connect(cluster.url().split(","))
    await ensure_stream(setup.jetstream(), unit_settings(cluster.url(), tmp_path, stream_replicas=3))
    leader = await stream_leader(setup.jetstream())
    await setup.close()
    caller_node, other = [n.name for n in cluster.nodes if n.name != leader]
    # The workers are given the two other nodes (they still learn of the caller's from the cluster).
    workers = [await cluster_worker(f"cw-{i}", cluster.url(*order))
               for i, order in enumerate([(leader, other), (other, leader)])]
    for w in workers:
        await online(cluster.node(caller_node).url, w)

    nc = await nats.connect(cluster.node(caller_node).url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream(timeout=10)
    answers = Answers()
    t0 = time.monotonic()
    for i in range(N_REQUESTS):
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=answers.on_reply)
        body = {"req_id": f"c-{i}", "input": f"Name a colour, number {i}.",
                "params": {"max_tokens": 16, "temperature": 0}}
        await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
    await nc.flush()

    async def all_queued() -> bool:
        return answers.count() + (await js.stream_info(p.STREAM_NAME)).state.messages >= N_REQUESTS

    deadline = time.monotonic() + 60
    while answers.count() < 3 or not await all_queued():
        assert time.monotonic() < deadline, "the requests were not all queued"
        await asyncio.sleep(0.05)

    # 1. SIGKILL the stream's leader mid-load
    first = await stream_leader(js)
    assert first != caller_node
    cluster.kill(first)
    t_kill1 = time.monotonic()
    await answers.wait(lambda: answers.after(t_kill1) >= 3, 60, "answers after the leader's death")
    cluster.restart(first)  # back with its store, it catches up as a follower
    await caught_up(js, first, p.consumer_name("inference", "gemma3-270m"))

    # 2. SIGKILL the node a worker is connected to (after the failover, and not the caller's)
    on = {w.env["WORKER_ID"]: cluster.node_of(w.env["WORKER_ID"]) for w in workers}
    target_worker, second = next((wid, node) for wid, node in on.items() if node not in (None, caller_node))
    remaining = N_REQUESTS - answers.count()
    cluster.kill(second)
    t_kill2 = time.monotonic()
    await answers.wait(lambda: answers.count() >= N_REQUESTS, 180, "every request to be answered")
    t_done = time.monotonic()
    await asyncio.sleep(ACK_WAIT_S + 2)  # a redelivered request would be answered again by now

    stamps = sorted(answers.times)
    gaps = [b - a for a, b in zip([t0, *stamps], stamps, strict=False)]
    print(f"\ncluster: {N_REQUESTS} requests in {t_done - t0:.1f} s; killed {first} (stream leader) at "
          f"{t_kill1 - t0:.1f} s, next answer after {answers.first_after(t_kill1):.2f} s; killed {second} "
          f"({target_worker}'s node, {remaining} requests left) at {t_kill2 - t0:.1f} s, next answer after "
          f"{answers.first_after(t_kill2):.2f} s; worst gap between answers {max(gaps[1:]):.2f} s "
          f"(first answer after {gaps[0]:.2f} s)")

    assert sorted(answers.got) == sorted(f"c-{i}" for i in range(N_REQUESTS)), "a request was never answered"
    repeated = {k: [(b.get("worker_id"), b.get("queue_ms")) for b in v] for k, v in answers.got.items() if len(v) > 1}
    assert not repeated, f"answered more than once (worker, queue_ms): {repeated}"
    assert all("error" not in r[0] and r[0]["finish_reason"] in ("stop", "length") for r in answers.got.values())
    # The workers reconnected to the survivors by themselves and kept working.
    assert all(w.proc.poll() is None for w in workers)
    assert cluster.node_of(target_worker) not in (None, second)
    assert any(t > t_kill2 for t in answers.by_worker[target_worker]), f"{target_worker} answered nothing after"
    reconnects = [e for e in read_recent(workers[0].db, "events", 500) if e["code"] == "nats.reconnected"]
    assert reconnects, "no worker recorded a reconnect"
    await nc.close()
