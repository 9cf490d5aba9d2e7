"""The ingress and the reply guard on a real nats-server, with no model: what a caller gets when a request
cannot be queued, and what nothing in the queue may ever do (take down the connection with a big reply)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats

from workers import protocol as p
from workers.ops import broker
from workers.queue import Ingress, Replier

from .unit_support import Bus, bus_factory  # noqa: F401 - fixture

SUBJECT = p.request_subject("inference", "unit.model")


@asynccontextmanager
async def ingress_for(bus: Bus, url: str) -> AsyncIterator[nats.NATS]:
    """The ingress serving the bus's model, and a caller's own connection."""
    ingress = Ingress(bus.nc, bus.js, bus.settings, bus.ledger.record)
    await ingress.start(lambda _endpoint: {})
    await bus.nc.flush()
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await ingress.stop()
        await nc.close()


async def replies(nc: nats.NATS, bodies: list[bytes], wait: float = 1.0) -> list[nats.aio.msg.Msg]:
    """Publish each body with its own inbox; the first reply of each within `wait` (None when there is none)."""
    subs = []
    for body in bodies:
        inbox = nc.new_inbox()
        subs.append(await nc.subscribe(inbox))
        await nc.publish(SUBJECT, body, reply=inbox)
    await nc.flush()
    out: list[Any] = []
    for sub in subs:
        try:
            out.append(await sub.next_msg(timeout=wait))
        except nats.errors.TimeoutError:
            out.append(None)
    return out


async def test_a_queued_request_carries_the_callers_inbox_deadline_and_req_id(bus_factory, nats_server):  # noqa: F811
    bus = await bus_factory()
    async with ingress_for(bus, nats_server.url) as nc:
        [reply] = await replies(nc, [b'{"req_id": "q-1", "input": "Hi", "timeout_ms": 5000}'], wait=0.5)
        assert reply is None  # queued: the answer comes from a worker, not the ingress
        psub = await bus.js.pull_subscribe_bind(durable=p.consumer_name("inference", "unit.model"),
                                                stream=p.STREAM_NAME)
        [msg] = await psub.fetch(1, timeout=2)
        h = msg.headers or {}
        assert h[p.H_REQ_ID] == "q-1" and h[p.H_REPLY_TO].startswith("_INBOX.")
        assert int(h[p.H_DEADLINE]) - int(h[p.H_ENQUEUED_AT]) == 5000
        assert msg.subject == p.queue_subject("inference", "unit.model")


async def test_an_oversized_request_is_refused_with_413_and_never_queued(bus_factory, nats_server):  # noqa: F811
    bus = await bus_factory(max_request_bytes=1024)
    async with ingress_for(bus, nats_server.url) as nc:
        body = json.dumps({"req_id": "big", "input": "x" * 4000}).encode()
        [reply] = await replies(nc, [body])
        data = json.loads(reply.data)
        assert data["error"]["code"] == 413 and data["error"]["type"] == "payload_too_large"
        assert reply.headers[p.H_ERROR_CODE] == "413" and "MAX_REQUEST_BYTES" in reply.headers[p.H_ERROR]
        assert data["req_id"] == "big"
        info = await bus.js.stream_info(p.STREAM_NAME)
        assert info.state.messages == 0
        [row] = await bus.rows()
        assert row["status"] == "rejected" and row["deliveries"] == 0 and row["error"].startswith("413 ")
        assert bus.ledger.total_failed == 1


async def test_a_full_queue_answers_503_queue_full_at_once(bus_factory, nats_server):  # noqa: F811
    bus = await bus_factory(queue_max_per_model=2)
    async with ingress_for(bus, nats_server.url) as nc:
        bodies = [json.dumps({"req_id": f"f{i}", "input": "Hi"}).encode() for i in range(3)]
        got = await replies(nc, bodies, wait=1.0)
        assert got[0] is None and got[1] is None  # queued
        err = json.loads(got[2].data)["error"]
        assert err["code"] == 503 and err["type"] == "queue_full" and "full (2 waiting)" in err["message"]


async def test_without_jetstream_the_caller_gets_503_queue_unavailable(bus_factory, nats_server):  # noqa: F811
    bus = await bus_factory()
    async with ingress_for(bus, nats_server.url) as nc:
        await bus.js.delete_stream(p.STREAM_NAME)  # nothing captures the queue subject any more
        t0 = asyncio.get_running_loop().time()
        [reply] = await replies(nc, [b'{"input": "Hi"}'], wait=8.0)
        err = json.loads(reply.data)["error"]
        assert err["code"] == 503 and err["type"] == "queue_unavailable"
        assert asyncio.get_running_loop().time() - t0 < 6.5


async def test_invalid_json_is_refused_with_400_by_the_ingress(bus_factory, nats_server):  # noqa: F811
    bus = await bus_factory()
    async with ingress_for(bus, nats_server.url) as nc:
        [reply] = await replies(nc, [b"{not json"])
        err = json.loads(reply.data)["error"]
        assert err["code"] == 400 and err["type"] == "invalid_json"


async def test_a_reply_over_max_payload_becomes_a_413_error_not_a_dropped_connection(tmp_path: Path):
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 4096\n")
    port = broker.free_port()
    server = broker.start(port, tmp_path / "js", extra_args=["-c", str(conf)])
    try:
        from .unit_support import unit_settings

        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        settings = unit_settings(f"nats://127.0.0.1:{port}", tmp_path / "data")
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await Replier(nc, settings).send([inbox], b"x" * 5000, {"A": "b"}, "r-big")
        msg = await sub.next_msg(timeout=2)
        body = json.loads(msg.data)
        assert body["error"]["code"] == 413 and body["error"]["type"] == "response_too_large"
        assert msg.headers[p.H_ERROR_CODE] == "413"
        assert nc.is_connected  # the server did not close the connection
        await nc.close()
    finally:
        server.terminate()
        server.wait(10)
