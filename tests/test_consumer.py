"""Every way one JetStream message can end, on a real nats-server with the real queue and store; the engine is
the stand-in from unit_support (these tests are about what happens around a generation)."""

from __future__ import annotations

import json

import nats

from workers import protocol as p
from workers.consumer import Consumer
from workers.formats.raw import Raw
from workers.queue import Replier
from workers.runner import Runner

from .unit_support import Bus, ScriptedEngine, bus_factory  # noqa: F401 - fixture


async def setup(bus: Bus, engine: ScriptedEngine) -> tuple[Consumer, nats.js.JetStreamContext.PullSubscription]:
    s = bus.settings
    runner = Runner(model_name=s.model_name, worker_id=s.worker_id, engine=engine,  # type: ignore[arg-type]
                    fmt=Raw(), grammars=None)
    psub = await bus.js.pull_subscribe_bind(durable=p.consumer_name(s.model_kind, s.model_name), stream=p.STREAM_NAME)
    consumer = Consumer(psub, settings=s, runner=runner, replier=Replier(bus.nc, s), ledger=bus.ledger,
                        store=bus.store, metrics=bus.metrics)
    return consumer, psub


async def enqueue(bus: Bus, body: bytes, *, req_id: str,
                  deadline_in_ms: int = 60_000) -> nats.aio.subscription.Subscription:
    """What the ingress would store: the body plus the routing headers; returns the caller's inbox."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    now = p.now_ms()
    headers = {p.H_REQ_ID: req_id, p.H_REPLY_TO: inbox, p.H_ENQUEUED_AT: str(now - 5),
               p.H_DEADLINE: str(now + deadline_in_ms)}
    await bus.js.publish(p.queue_subject(bus.settings.model_kind, bus.settings.model_name), body, headers=headers)
    return sub


async def pending(bus: Bus) -> tuple[int, int]:
    info = await bus.js.consumer_info(p.STREAM_NAME, p.consumer_name(bus.settings.model_kind, bus.settings.model_name))
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


async def test_an_answered_request_is_replied_acked_and_recorded_ok(bus_factory):  # noqa: F811
    bus = await bus_factory()
    consumer, psub = await setup(bus, ScriptedEngine())
    inbox = await enqueue(bus, b'{"input": "Hi there"}', req_id="ok-1")
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    reply = json.loads((await inbox.next_msg(timeout=2)).data)
    assert reply["text"] == "Hello, world" and reply["req_id"] == "ok-1" and reply["worker_id"] == "unit-worker"
    assert reply["queue_ms"] >= 5
    assert await pending(bus) == (0, 0)
    [row] = await bus.rows()
    assert row["status"] == "ok" and row["formatted_input"] == "Hi there" and row["tokens_out"] == 3
    assert bus.ledger.total_processed == 1 and bus.ledger.last_processed_at is not None


async def test_a_request_past_its_deadline_is_skipped_with_504_expired(bus_factory):  # noqa: F811
    bus = await bus_factory()
    engine = ScriptedEngine()
    consumer, psub = await setup(bus, engine)
    inbox = await enqueue(bus, b'{"input": "Hi"}', req_id="late", deadline_in_ms=-1000)
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    reply = await inbox.next_msg(timeout=2)
    assert json.loads(reply.data)["error"]["type"] == "expired" and reply.headers[p.H_ERROR_CODE] == "504"
    assert engine.calls == [] and await pending(bus) == (0, 0)
    assert (await bus.rows())[0]["status"] == "expired"


async def test_invalid_input_is_answered_400_and_acked_never_redelivered(bus_factory):  # noqa: F811
    bus = await bus_factory()
    consumer, psub = await setup(bus, ScriptedEngine())
    inbox = await enqueue(bus, b'{"input": ""}', req_id="empty")
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    err = json.loads((await inbox.next_msg(timeout=2)).data)["error"]
    assert err == {"code": 400, "type": "empty_input", "message": err["message"]} and "input is empty" in err["message"]
    assert await pending(bus) == (0, 0)
    assert (await bus.rows())[0]["status"] == "rejected"


async def test_a_request_cancelled_while_queued_is_skipped_and_answered_cancelled(bus_factory):  # noqa: F811
    bus = await bus_factory()
    engine = ScriptedEngine()
    consumer, psub = await setup(bus, engine)
    inbox = await enqueue(bus, b'{"input": "Hi"}', req_id="gone")
    assert consumer.runner.cancel("gone") == "queued"
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    reply = json.loads((await inbox.next_msg(timeout=2)).data)
    assert reply["finish_reason"] == "cancelled" and reply["error"]["code"] == 499
    assert engine.calls == [] and (await bus.rows())[0]["status"] == "cancelled"


async def test_an_unexpected_failure_is_given_back_for_another_try_and_counted_failed(bus_factory):  # noqa: F811
    bus = await bus_factory()
    consumer, psub = await setup(bus, ScriptedEngine(fail=RuntimeError("boom")))
    inbox = await enqueue(bus, b'{"input": "Hi"}', req_id="boom")
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    [again] = await psub.fetch(1, timeout=5)  # nak with a 1 s delay: redelivered, not lost
    assert again.metadata.num_delivered == 2 and again.headers[p.H_REQ_ID] == "boom"
    try:
        await inbox.next_msg(timeout=0.2)
        raise AssertionError("a failed attempt must not answer the caller")
    except nats.errors.TimeoutError:
        pass
    [row] = await bus.rows()
    assert row["status"] == "failed" and "boom" in row["error"] and bus.ledger.total_failed == 1


async def test_after_a_drain_times_out_the_message_is_handed_back_at_once(bus_factory):  # noqa: F811
    bus = await bus_factory()
    consumer, psub = await setup(bus, ScriptedEngine())
    await enqueue(bus, b'{"input": "Hi"}', req_id="drained")
    [msg] = await psub.fetch(1, timeout=2)
    consumer.aborted = True  # what Consumer.drain sets when DRAIN_TIMEOUT has passed
    await consumer.handle(msg)
    [again] = await psub.fetch(1, timeout=1)  # plain nak: back at once
    assert again.metadata.num_delivered == 2
    [row] = await bus.rows()
    assert row["status"] == "handed_back" and bus.ledger.total_failed == 0 and bus.ledger.total_processed == 0


async def test_a_streamed_request_sends_ordered_chunks_then_the_full_answer(bus_factory):  # noqa: F811
    bus = await bus_factory()
    consumer, psub = await setup(bus, ScriptedEngine(pieces=("a", "b", "c", "d")))
    inbox = await enqueue(bus, b'{"input": "Hi", "stream": true}', req_id="s-1")
    [msg] = await psub.fetch(1, timeout=2)
    await consumer.handle(msg)
    got = [json.loads((await inbox.next_msg(timeout=2)).data) for _ in range(5)]
    assert [c["delta"] for c in got[:4]] == ["a", "b", "c", "d"] and [c["index"] for c in got[:4]] == [0, 1, 2, 3]
    assert got[4]["done"] is True and got[4]["text"] == "abcd"


async def test_the_pull_loop_runs_messages_and_drain_waits_for_them(bus_factory):  # noqa: F811
    bus = await bus_factory(worker_concurrency=2)
    consumer, _ = await setup(bus, ScriptedEngine())
    inboxes = [await enqueue(bus, json.dumps({"input": f"n{i}"}).encode(), req_id=f"n{i}") for i in range(4)]
    consumer.start()
    try:
        texts = [json.loads((await sub.next_msg(timeout=5)).data)["text"] for sub in inboxes]
    finally:
        await consumer.drain(5, lambda: None)
    assert texts == ["Hello, world"] * 4 and consumer.in_flight == {}
    assert bus.ledger.total_processed == 4
