"""The least-privilege example (deploy/nats/, scripts/nats_credentials.py) on real nats-server processes: each
role can do its job and nothing else. The raw tests drive nats-py as each identity (no model); the `model` ones run
a real worker and monitor with their own identities."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.js.errors import APIError

from workers import discovery
from workers import protocol as p
from workers.config import ROOT, load_settings
from workers.ops import broker
from workers.queue import DeadLetters, Ingress, Replier, ensure_consumer, ensure_stream
from workers.streams import stream_config

from .acl_support import (
    DEPLOY,
    AclServer,
    Conn,
    Started,
    auth_ready,
    cluster,
    credentials_module,
    generate,
    identity_env,
    no_violations,
    spawn,
)

GEMMA, MINILM = "worker.inference.gemma3-270m", "worker.embedding.minilm-l6-v2"
ALICE, BOB, MONITOR, GATEWAY = "client.alice", "client.bob", "monitor.monitor", "gateway.gateway"
STREAM = p.STREAM_NAME
DURABLE = p.consumer_name("inference", "gemma3-270m")
REQUEST = p.request_subject("inference", "gemma3-270m")


@pytest.fixture(scope="session")
def acl_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default identities, generated once by the script into a copy of deploy/nats/."""
    out = tmp_path_factory.mktemp("acl") / "nats"
    done = generate(out)
    assert done.returncode == 0, done.stderr
    return out


@pytest_asyncio.fixture
async def acl(acl_conf: Path, tmp_path: Path) -> AsyncIterator[AclServer]:
    server = AclServer(acl_conf, tmp_path / "server", broker.free_port())
    server.start()
    yield server
    await server.close_all()
    server.stop()


async def queue_ready(acl: AclServer) -> Conn:
    """The stream and gemma's consumer, set up by the worker's own code under the worker's identity."""
    worker = await acl.connect(GEMMA)
    js = worker.nc.jetstream(timeout=5)
    settings = load_settings("gemma3-270m")
    await ensure_stream(js, settings)
    await ensure_consumer(js, settings)
    return worker


async def queued(worker: Conn) -> int:
    return int((await worker.nc.jetstream().stream_info(STREAM)).state.messages)


# --- the script ------------------------------------------------------------------------------------------


def test_the_generated_config_is_valid_for_one_server_and_for_a_cluster_node(acl_conf: Path) -> None:
    ok = subprocess.run([broker.binary(), "-t", "-c", str(acl_conf / "server.conf")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    node = {"NODE": "n1", "PORT": "4222", "ROUTE_PORT": "6222", "STORE": str(acl_conf / "n1"),
            **{f"ROUTE_{i}": f"nats-route://127.0.0.1:{6221 + i}" for i in (1, 2, 3)}}
    ok = subprocess.run([broker.binary(), "-t", "-c", str(acl_conf / "cluster.conf")], capture_output=True, text=True,
                        env={**os.environ, **node})
    assert ok.returncode == 0, ok.stderr
    accounts = (acl_conf / "accounts.conf").read_text()
    seeds = sorted((acl_conf / "creds").glob("*.nk"))
    assert [s.name for s in seeds] == ["client.alice.nk", "client.bob.nk", "gateway.gateway.nk", "monitor.monitor.nk",
                                       "worker.embedding.gemma3-270m-embed.nk", "worker.embedding.minilm-l6-v2.nk",
                                       "worker.inference.gemma3-270m.nk", "worker.inference.smollm2-135m.nk"]
    for seed in seeds:
        assert seed.stat().st_mode & 0o777 == 0o600
        assert seed.read_text().strip() not in accounts  # public keys only
        assert credentials_module().public_key(seed) in accounts


def test_the_shipped_config_files_include_the_generated_accounts() -> None:
    """What `make cluster` and docker-compose build on: both variants include accounts.conf beside them."""
    for conf in ("server.conf", "cluster.conf"):
        assert 'include "accounts.conf"' in (DEPLOY / conf).read_text()
    assert (DEPLOY / "creds" / "README.md").exists()


def run(out: Path, *args: str) -> int:
    """The script's main() in this process (quicker than a subprocess per case)."""
    return int(credentials_module().main(["--out", str(out), *args]))


def test_a_rerun_keeps_every_key_adds_a_model_and_rotates_only_what_it_is_told(tmp_path: Path) -> None:
    out = tmp_path / "nats"
    assert run(out) == 0
    before = {f.name: f.read_text() for f in (out / "creds").glob("*.nk")}
    assert run(out, "--worker", "qwen3-4b", "--worker", "my-model.v2:embedding", "--client", "carol") == 0
    after = {f.name: f.read_text() for f in (out / "creds").glob("*.nk")}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"worker.inference.qwen3-4b.nk", "worker.embedding.my-model.v2.nk",
                                        "client.carol.nk"}
    accounts = (out / "accounts.conf").read_text()
    assert '"queue.inference.qwen3-4b"' in accounts and '"_INBOX.carol.>"' in accounts
    assert '"models.my-model_v2.heartbeat"' in accounts and '"embedding.request.my-model.v2"' in accounts
    assert run(out, "--rotate", "client.bob") == 0
    final = {f.name: f.read_text() for f in (out / "creds").glob("*.nk")}
    assert [k for k in final if final[k] != after[k]] == ["client.bob.nk"]


@pytest.mark.parametrize("args, says", [
    (["--client", "al.ice"], "one subject token"),
    (["--client", "worker-gemma3-270m"], "names starting with worker- are the workers'"),
    (["--monitor", "alice", "--client", "alice"], "would share the inbox _INBOX.alice"),
    (["--worker", "nomic-embed-v1.5", "--client", "nomic-embed-v1"], "named like the start of model"),
    (["--worker", "no-such-model"], "write --worker no-such-model:inference"),
    (["--rotate", "client.zed"], "no such identity"),
])
def test_a_bad_name_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                           says: str) -> None:
    assert run(tmp_path / "nats", *args) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nats" / "accounts.conf").exists()


# --- logging in ------------------------------------------------------------------------------------------


async def test_nobody_connects_without_an_identity_the_server_knows(acl: AclServer, tmp_path: Path) -> None:
    with pytest.raises(nats.errors.Error):  # AuthorizationError, or NoServers once it gave up
        await acl.connect(None)
    stranger = tmp_path / "stranger.nk"
    assert generate(tmp_path / "other", "--client", "mallory").returncode == 0
    stranger.write_bytes((tmp_path / "other" / "creds" / "client.mallory.nk").read_bytes())
    with pytest.raises(nats.errors.Error):
        await nats.connect(acl.url, nkeys_seed=str(stranger), allow_reconnect=False, connect_timeout=2)


# --- client ------------------------------------------------------------------------------------------------


async def test_a_client_cannot_subscribe_to_another_callers_inbox(acl: AclServer) -> None:
    alice, bob = await acl.connect(ALICE), await acl.connect(BOB)
    spy = await alice.nc.subscribe("_INBOX.bob.>")
    await alice.refused('"_INBOX.bob.>"')
    for wide in ("_INBOX.>", ">"):
        await alice.nc.subscribe(wide)
        await alice.refused(f'"{wide}"')
    mine = await bob.nc.subscribe("_INBOX.bob.answer")
    await bob.nc.flush()
    worker = await acl.connect(GEMMA)
    await worker.nc.publish("_INBOX.bob.answer", b"for bob only")
    assert (await mine.next_msg(timeout=2)).data == b"for bob only"
    with pytest.raises(nats.errors.TimeoutError):
        await spy.next_msg(timeout=0.5)
    assert bob.violations() == [] and worker.violations() == []


async def test_a_client_cannot_consume_or_read_the_work_queue(acl: AclServer) -> None:
    worker = await queue_ready(acl)
    alice = await acl.connect(ALICE)
    await worker.nc.jetstream().publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "queued"}')
    js = alice.nc.jetstream(timeout=0.25)
    psub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=0.25)
    await alice.refused(f'"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"')
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer(STREAM, ConsumerConfig(durable_name="alice-reads-all"))
    await alice.refused(f'"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.alice-reads-all"')
    for call, subject in ((lambda: js.stream_info(STREAM), "STREAM.INFO"),
                          (lambda: js.get_msg(STREAM, 1), "STREAM.MSG.GET")):
        with pytest.raises(nats.errors.TimeoutError):
            await call()
        await alice.refused(f"$JS.API.{subject}.{STREAM}")
    await alice.nc.subscribe("queue.>")
    await alice.refused('"queue.>"')
    assert await queued(worker) == 1  # still there for a worker


async def test_a_client_cannot_publish_heartbeats_or_cancel_other_peoples_requests(acl: AclServer) -> None:
    alice, monitor = await acl.connect(ALICE), await acl.connect(MONITOR)
    beats = await monitor.nc.subscribe("models.*.heartbeat")
    worker = await acl.connect(GEMMA)
    cancels = [await worker.nc.subscribe(s) for s in (p.cancel_subject("inference", "gemma3-270m"),
                                                     p.owner_cancel_subject("inference", "*", "gemma3-270m"))]
    await worker.nc.flush()
    await monitor.nc.flush()
    await alice.nc.publish(p.heartbeat_subject("gemma3-270m"), b'{"status": "online"}')
    await alice.refused('"models.gemma3-270m.heartbeat"')
    await alice.nc.publish(p.cancel_subject("inference", "gemma3-270m"), b'{"req_id": "bobs"}')
    await alice.refused('"inference.cancel.gemma3-270m"')
    await alice.nc.publish(p.owner_cancel_subject("inference", "bob", "gemma3-270m"), b'{"req_id": "bobs"}')
    await alice.refused('"inference.cancel.bob.gemma3-270m"')
    await alice.nc.publish(p.owner_cancel_subject("inference", "alice", "gemma3-270m"), b'{"req_id": "mine"}')
    got = await cancels[1].next_msg(timeout=2)  # her own cancel subject is hers to use
    assert got.subject == "inference.cancel.alice.gemma3-270m"
    for sub in (beats, cancels[0]):
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.3)
    with pytest.raises(nats.errors.TimeoutError):
        await cancels[1].next_msg(timeout=0.3)


async def test_a_client_cannot_delete_or_purge_the_stream(acl: AclServer) -> None:
    worker = await queue_ready(acl)
    await worker.nc.jetstream().publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "keep me"}')
    alice = await acl.connect(ALICE)
    js = alice.nc.jetstream(timeout=0.25)
    for call, subject in ((lambda: js.delete_stream(STREAM), "STREAM.DELETE"),
                          (lambda: js.purge_stream(STREAM), "STREAM.PURGE"),
                          (lambda: js.delete_consumer(STREAM, DURABLE), "CONSUMER.DELETE")):
        with pytest.raises(nats.errors.TimeoutError):
            await call()
        await alice.refused(f"$JS.API.{subject}.{STREAM}")
    assert await queued(worker) == 1


async def test_a_request_goes_through_ingress_queue_and_reply_each_side_with_its_own_identity(acl: AclServer) -> None:
    """The worker's own ingress, queue and replier code as the worker; the request and answer as alice."""
    worker = await queue_ready(acl)
    settings = load_settings("gemma3-270m")
    js = worker.nc.jetstream(timeout=5)
    ingress = Ingress(worker.nc, js, settings, record=lambda finished: None)
    await ingress.start(stats=lambda endpoint: {})
    psub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    alice, bob = await acl.connect(ALICE), await acl.connect(BOB)
    answer = asyncio.create_task(alice.nc.request(REQUEST, b'{"req_id": "a1", "input": "hi"}', timeout=10))
    msg = (await psub.fetch(1, timeout=5))[0]
    reply_to = (msg.headers or {})[p.H_REPLY_TO]
    assert reply_to.startswith("_INBOX.alice.") and p.inbox_owner(reply_to) == "alice"
    await msg.in_progress()
    await Replier(worker.nc, settings).send([reply_to], b'{"req_id": "a1", "text": "hello alice"}')
    await msg.ack()
    assert json.loads((await answer).data)["text"] == "hello alice"
    assert await queued(worker) == 0
    await bob.nc.subscribe(reply_to)
    await bob.refused(reply_to)
    await ingress.stop()
    assert worker.violations() == [] and alice.violations() == []


# --- monitor -------------------------------------------------------------------------------------------------


async def test_the_monitor_watches_heartbeats_reports_and_jetstream_without_consuming(acl: AclServer) -> None:
    worker = await queue_ready(acl)
    monitor = await acl.connect(MONITOR)
    beats = await monitor.nc.subscribe("models.*.heartbeat")
    reports = await monitor.nc.subscribe("monitoring.>")
    await monitor.nc.flush()
    await worker.nc.publish(p.heartbeat_subject("gemma3-270m"), b"beat")
    await worker.nc.publish(p.monitoring_subject("inference", "gemma3-270m"), b"report")
    assert (await beats.next_msg(timeout=2)).data == b"beat"
    assert (await reports.next_msg(timeout=2)).data == b"report"
    js = monitor.nc.jetstream(timeout=2)
    assert (await js.stream_info(STREAM)).config.name == STREAM
    assert (await js.consumer_info(STREAM, DURABLE)).name == DURABLE
    assert (await js.account_info()).streams == 1
    assert await discovery.gather(monitor.nc, discovery.PING, 0.3) == []  # allowed; nobody serves yet
    await worker.nc.jetstream().publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "not yours"}')
    js = monitor.nc.jetstream(timeout=0.25)
    psub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=0.25)
    await monitor.refused(f'"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"')
    for call, subject in ((lambda: js.add_consumer(STREAM, ConsumerConfig(durable_name="peek")),
                           "CONSUMER.DURABLE.CREATE"),
                          (lambda: js.get_msg(STREAM, 1), "STREAM.MSG.GET"),
                          (lambda: js.delete_stream(STREAM), "STREAM.DELETE")):
        with pytest.raises(nats.errors.TimeoutError):
            await call()
        await monitor.refused(f"$JS.API.{subject}.{STREAM}")
    await monitor.nc.publish(p.heartbeat_subject("gemma3-270m"), b"fake")
    await monitor.refused('"models.gemma3-270m.heartbeat"')
    for subject in ("queue.>", "_INBOX.alice.>", REQUEST):
        await monitor.nc.subscribe(subject)
        await monitor.refused(f'"{subject}"')
    assert await queued(worker) == 1


# --- worker --------------------------------------------------------------------------------------------------


async def test_a_worker_identity_is_confined_to_its_own_model(acl: AclServer) -> None:
    gemma = await queue_ready(acl)
    minilm = await acl.connect(MINILM)
    settings = load_settings("minilm-l6-v2")
    await ensure_consumer(minilm.nc.jetstream(timeout=5), settings)
    other = p.consumer_name("embedding", "minilm-l6-v2")
    await gemma.nc.publish(p.heartbeat_subject("minilm-l6-v2"), b"beat")
    await gemma.refused('"models.minilm-l6-v2.heartbeat"')
    await gemma.nc.publish(p.queue_subject("embedding", "minilm-l6-v2"), b"{}")
    await gemma.refused('"queue.embedding.minilm-l6-v2"')
    for subject in (p.request_subject("embedding", "minilm-l6-v2"), "_INBOX.alice.>", "_INBOX.worker-minilm-l6-v2.>",
                    "queue.>"):
        await gemma.nc.subscribe(subject)
        await gemma.refused(f'"{subject}"')
    js = gemma.nc.jetstream(timeout=0.25)
    psub = await js.pull_subscribe_bind(durable=other, stream=STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=0.25)
    await gemma.refused(f'"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{other}"')
    for call, subject in ((lambda: js.delete_stream(STREAM), "STREAM.DELETE"),
                          (lambda: js.purge_stream(STREAM), "STREAM.PURGE"),
                          (lambda: js.delete_consumer(STREAM, other), "CONSUMER.DELETE")):
        with pytest.raises(nats.errors.TimeoutError):
            await call()
        await gemma.refused(f"$JS.API.{subject}.{STREAM}")
    assert (await minilm.nc.jetstream().stream_info(STREAM)).config.name == STREAM
    assert minilm.violations() == []


async def test_a_worker_identity_may_do_everything_its_worker_does(acl: AclServer) -> None:
    """Every subject a worker uses besides the engine: setup, ingress service, pull/ack, dead letters, telemetry,
    cancels; no violation."""
    worker = await queue_ready(acl)
    settings = load_settings("gemma3-270m")
    nc, js = worker.nc, worker.nc.jetstream(timeout=5)
    await ensure_stream(js, settings)  # a second worker: info only
    ingress = Ingress(nc, js, settings, record=lambda finished: None)
    await ingress.start(stats=lambda endpoint: {})
    dead = DeadLetters(nc, js, settings, store=None, record=lambda finished: None)  # type: ignore[arg-type]
    await dead.start()
    for subject in (p.health_subject("gemma3-270m"), p.heartbeat_subject("gemma3-270m"),
                    p.cancel_subject("inference", "gemma3-270m"),
                    p.owner_cancel_subject("inference", "*", "gemma3-270m")):
        await nc.subscribe(subject)
    await nc.publish(p.heartbeat_subject("gemma3-270m"), b"beat")
    await nc.publish(p.monitoring_subject("inference", "gemma3-270m"), b"report")
    ack = await js.publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "one"}')
    await js.publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "two"}')
    assert (await js.get_msg(STREAM, ack.seq)).data == b'{"input": "one"}'
    await js.delete_msg(STREAM, ack.seq)
    psub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    msg = (await psub.fetch(1, timeout=5))[0]
    await msg.in_progress()
    await msg.nak(delay=0.1)
    msg = (await psub.fetch(1, timeout=5))[0]
    await msg.ack_sync()
    assert (await js.consumer_info(STREAM, DURABLE)).num_pending == 0
    monitor = await acl.connect(MONITOR)
    pings = await discovery.gather(monitor.nc, discovery.PING, 0.5)
    assert [discovery.model_of_ping(d) for d in pings] == ["gemma3-270m"]
    for verb in ("INFO", "STATS"):
        assert await discovery.gather(monitor.nc, f"$SRV.{verb}.{p.service_name('gemma3-270m')}", 0.5)
    await ingress.stop()
    await dead.stop()
    await nc.flush()
    assert worker.violations() == [] and monitor.violations() == []


# --- cluster ---------------------------------------------------------------------------------------------------


async def test_a_three_node_cluster_from_cluster_conf_keeps_the_roles_and_replicates_the_queue(
        acl_conf: Path, tmp_path: Path) -> None:
    nodes = cluster(acl_conf, tmp_path / "cluster")
    try:
        worker = await nodes[0].connect(GEMMA)
        settings = load_settings("gemma3-270m").model_copy(update={"stream_replicas": 3})
        js = worker.nc.jetstream(timeout=2)
        async with asyncio.timeout(30):  # until the meta leader knows all three peers
            while True:
                try:
                    await js.add_stream(stream_config(settings))
                    break
                except (APIError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.25)
        assert await ensure_stream(js, settings) == []  # the worker's own code agrees with what is there
        await ensure_consumer(js, settings)
        info = await js.stream_info(STREAM)
        assert info.config.num_replicas == 3 and info.cluster is not None and len(info.cluster.replicas or []) == 2
        async def answer(msg: Msg) -> None:
            await msg.respond(b"answered across the routes")

        await worker.nc.subscribe(REQUEST, cb=answer)
        await worker.nc.flush()
        alice, bob = await nodes[1].connect(ALICE), await nodes[2].connect(BOB)
        assert (await alice.nc.request(REQUEST, b"{}", timeout=5)).data == b"answered across the routes"
        await bob.nc.subscribe("_INBOX.alice.>")
        await bob.refused('"_INBOX.alice.>"')
        with pytest.raises(nats.errors.TimeoutError):
            await bob.nc.jetstream(timeout=0.25).delete_stream(STREAM)
        await bob.refused(f"$JS.API.STREAM.DELETE.{STREAM}")
        assert worker.violations() == [] and alice.violations() == []
    finally:
        for node in nodes:
            await node.close_all()
            node.stop()


# --- end to end: real worker and monitor processes ---------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[Started]:
    started: Started = []
    yield started
    for proc, _ in started:
        broker.stop(proc)


async def start_fleet(acl: AclServer, model_path: Path, tmp_path: Path, started: Started) -> tuple[Conn, int]:
    """A gemma worker and a monitor, each with its own identity; returns the monitor's HTTP port once the
    worker is online (asked as the monitor identity)."""
    worker_env = {**identity_env(acl, GEMMA), "DATA_DIR": str(tmp_path / "data"), "MODEL_PATH": str(model_path),
                  "PROMPT_TEMPLATE": str(ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json"),
                  "HTTP_ADDR": "", "HEARTBEAT_INTERVAL": "1"}
    worker = spawn(started, ["-m", "workers", "--env", str(ROOT / "envs" / "worker.gemma3-270m.env")], worker_env,
                   tmp_path / "worker.log")
    port = broker.free_port()
    spawn(started, ["-m", "monitor"], {**identity_env(acl, MONITOR), "MONITOR_ADDR": f"127.0.0.1:{port}",
                                       "MONITOR_SWEEP_INTERVAL": "1"}, tmp_path / "monitor.log")
    watcher = await acl.connect(MONITOR)
    online = await discovery.wait_online(watcher.nc, "gemma3-270m", pid=worker.pid, timeout=90,
                                         alive=lambda: worker.poll() is None)
    assert online, (tmp_path / "worker.log").read_text(errors="replace")
    return watcher, port


@pytest.mark.model
async def test_a_worker_the_monitor_and_a_client_each_with_their_own_identity_serve_a_request(
        acl: AclServer, model_path: Path, tmp_path: Path, processes: Started
) -> None:
    if (why := auth_ready()) is not None:
        pytest.skip(why)
    from .monitor_support import get_json, until

    _, port = await start_fleet(acl, model_path, tmp_path, processes)
    alice = await acl.connect(ALICE)
    body = {"req_id": "e2e-1", "input": "Say hello.", "params": {"max_tokens": 8, "temperature": 0}}
    answer = json.loads((await alice.nc.request(REQUEST, json.dumps(body).encode(), timeout=60)).data)
    assert answer["req_id"] == "e2e-1" and answer["tokens_out"] > 0 and answer.get("error") is None

    async def listed() -> Any:
        services = await get_json(f"http://127.0.0.1:{port}/api/services")
        return "gemma3-270m" in json.dumps(services)

    await until(listed, timeout=15, what="gemma3-270m in the monitor's /api/services")
    await asyncio.sleep(1.5)  # a heartbeat and a report go out under the worker's identity
    no_violations(processes)
    assert alice.violations() == []


@pytest.mark.model
async def test_alices_owner_cancel_stops_her_request_and_not_bobs(
        acl: AclServer, model_path: Path, tmp_path: Path, processes: Started
) -> None:
    if (why := auth_ready()) is not None:
        pytest.skip(why)
    await start_fleet(acl, model_path, tmp_path, processes)
    alice, bob = await acl.connect(ALICE), await acl.connect(BOB)
    long = {"input": "Write a very long story.", "params": {"max_tokens": 200, "temperature": 0}}
    mine = asyncio.create_task(alice.nc.request(REQUEST, json.dumps({**long, "req_id": "alice-1"}).encode(),
                                                timeout=120))
    theirs = asyncio.create_task(bob.nc.request(REQUEST, json.dumps({**long, "req_id": "bob-1"}).encode(),
                                                timeout=120))
    await asyncio.sleep(1.5)  # both running (WORKER_CONCURRENCY=2)
    cancel = p.owner_cancel_subject("inference", "alice", "gemma3-270m")
    with pytest.raises(nats.errors.TimeoutError):  # bob's request is not hers: no "cancelled" answer
        await alice.nc.request(cancel, b'{"req_id": "bob-1"}', timeout=1.0)
    ack = json.loads((await alice.nc.request(cancel, b'{"req_id": "alice-1"}', timeout=5)).data)
    assert ack["cancelled"] is True
    out = json.loads((await mine).data)
    assert out["finish_reason"] == "cancelled" and 0 < out["tokens_out"] < 200
    out = json.loads((await theirs).data)
    assert out["finish_reason"] in ("length", "stop") and out.get("error") is None
    no_violations(processes)
    assert alice.violations() == [] and bob.violations() == []


@pytest.mark.model
async def test_a_client_cannot_steer_a_workers_answer_onto_its_heartbeat_or_reports(
        acl: AclServer, model_path: Path, tmp_path: Path, processes: Started
) -> None:
    if (why := auth_ready()) is not None:
        pytest.skip(why)
    watcher, _ = await start_fleet(acl, model_path, tmp_path, processes)
    seen = await watcher.nc.subscribe("models.*.heartbeat")
    reports = await watcher.nc.subscribe("monitoring.>")
    await watcher.nc.flush()
    alice = await acl.connect(ALICE)
    body = {"req_id": "steer-1", "input": "Hi", "params": {"max_tokens": 4}}
    await alice.nc.publish(REQUEST, json.dumps(body).encode(), reply=p.heartbeat_subject("gemma3-270m"))
    body = {"req_id": "steer-2", "input": "Hi", "params": {"max_tokens": 4},
            "reply_to": p.monitoring_subject("inference", "gemma3-270m")}
    await alice.nc.publish(REQUEST, json.dumps(body).encode())
    bodies: list[bytes] = []

    def processed() -> int:  # by the worker's own heartbeats: both refused at the ingress (400 invalid_reply_to)
        beats = [json.loads(b)["queue_metrics"] for b in bodies if b'"queue_metrics"' in b]
        return max((q["total_processed"] + q["total_failed"] for q in beats), default=0)

    async with asyncio.timeout(60):
        while processed() < 2:
            bodies.append((await seen.next_msg(timeout=10)).data)
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            bodies.append((await reports.next_msg(timeout=0.2)).data)
    assert not [b for b in bodies if b'"steer-' in b]


@pytest.mark.model
async def test_the_gateway_with_its_own_identity_serves_caches_and_runs_jobs(
        acl: AclServer, model_path: Path, tmp_path: Path, processes: Started
) -> None:
    """The gateway identity: discovery (heartbeats, reports, $SRV, health), requests and their cancels, both KV
    buckets (a cached answer, a job record and the gateway's heartbeat in FLEET_JOBS) and the agents' subject, with
    no permission refused; it cannot consume the work queue or pose as a worker."""
    if (why := auth_ready()) is not None:
        pytest.skip(why)
    import httpx

    await start_fleet(acl, model_path, tmp_path, processes)
    port = broker.free_port()
    spawn(processes, ["-m", "gateway"], {**identity_env(acl, GATEWAY), "GATEWAY_ADDR": f"127.0.0.1:{port}",
                                         "CACHE_TTL_S": "60", "MONITOR_SWEEP_INTERVAL": "1"}, tmp_path / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    body = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.3)
        first = await http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200 and first.headers["x-fleet-cache"] == "miss", first.text
        again = await http.post("/v1/chat/completions", json=body)
        assert again.headers["x-fleet-cache"] == "hit" and again.json() == first.json()
        job = await http.post("/v1/jobs", json={"request": {**body, "temperature": 0.5}})
        assert job.status_code == 202, job.text
        async with asyncio.timeout(60):
            while (done := (await http.get(f"/v1/jobs/{job.json()['id']}")).json())["status"] in ("queued", "running"):
                await asyncio.sleep(0.2)
        assert done["status"] == "succeeded", done
        nobody = await http.post("/v1/models/gemma3-270m/load")
        assert nobody.status_code == 503 and nobody.json()["error"]["type"] == "no_agent"  # asked, none runs here
    no_violations(processes)
    gateway = await acl.connect(GATEWAY)
    await gateway.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}", b"{}")
    await gateway.refused(f'"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"')
    await gateway.nc.publish(p.heartbeat_subject("gemma3-270m"), b"fake")
    await gateway.refused('"models.gemma3-270m.heartbeat"')
