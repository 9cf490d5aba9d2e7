"""The answer claims on a real nats-server: one claim per queued message wins, whoever asks twice; the claims
bucket follows the never-lower rule of the queue's stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from workers import protocol as p
from workers.answered import BUCKET, Answered, ensure_answered
from workers.config import Settings
from workers.streams import ensure_consumer, ensure_stream, stored_us

from .unit_support import unit_settings


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def event(self, code: str, msg: str = "", level: str = "info", **meta: object) -> None:
        self.seen.append((code, msg))


async def queued(nats_server: Any, tmp_path: Path, n: int) -> tuple[Settings, Settings, nats.NATS, KeyValue, list[Msg]]:
    """Workers a and b of one model, the claims bucket (as a fresh one: nothing left as it was), and `n` queued
    messages fetched once."""
    a = unit_settings(nats_server.url, tmp_path, worker_id="a")
    b = unit_settings(nats_server.url, tmp_path, worker_id="b")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_stream(js, a)
    durable = await ensure_consumer(js, a)
    kv, kept = await ensure_answered(js, a)
    assert kept == []
    for i in range(n):
        await js.publish(p.queue_subject("inference", "unit.model"), f'{{"input": "{i}"}}'.encode())
    psub = await js.pull_subscribe_bind(durable=durable, stream=p.STREAM_NAME)
    return a, b, nc, kv, await psub.fetch(n, timeout=5)


async def test_the_first_claim_on_a_message_wins_and_a_redelivery_is_not_answered_again(nats_server, tmp_path):
    a, b, nc, kv, (first, second) = await queued(nats_server, tmp_path, 2)
    events = Events()
    worker_a = Answered(kv, a, events)
    assert await worker_a.claim(first) == "mine"
    assert await Answered(kv, b, events).claim(first) == "theirs"  # delivered again to b: b must not answer it
    assert not await worker_a.answered_by_other(first)  # a's answer is not confirmed yet: a runs it again
    worker_a.answer_confirmed(first)
    assert await worker_a.answered_by_other(first)  # a redelivery after a lost ack is acked unanswered
    assert await worker_a.claim(first) == "theirs"
    assert await Answered(kv, b, events).claim(second) == "mine"  # another message: its own claim
    assert (await kv.get(f"unit_model.{first.metadata.sequence.stream}.{stored_us(first)}")).value.startswith(b"a ")
    assert events.seen == []
    await nc.close()


async def test_a_claim_by_a_worker_that_is_gone_does_not_swallow_the_answer(nats_server, tmp_path):
    a, b, nc, kv, [msg] = await queued(nats_server, tmp_path, 1)
    events = Events()
    assert await Answered(kv, a, events).claim(msg) == "mine"  # a claims it, then is killed before it replies
    assert await Answered(kv, b, events, live=lambda wid: wid == "a").claim(msg) == "theirs"  # a still heard
    assert await Answered(kv, b, events, live=lambda wid: wid == "b").claim(msg) == "taken_over"  # a gone
    assert [code for code, _ in events.seen] == ["request.claim_taken_over"]
    await nc.close()


async def test_an_unconfirmed_answer_is_answered_again_marked_as_a_possible_duplicate(nats_server, tmp_path):
    """An answer the server never confirmed may or may not have reached the caller: the next attempt answers
    (nothing lost), as a possible duplicate, whichever worker it reaches; one of two racing attempts wins."""
    a, b, nc, kv, (first, second) = await queued(nats_server, tmp_path, 2)
    events = Events()
    worker_a, worker_b = Answered(kv, a, events), Answered(kv, b, events)
    assert await worker_a.claim(first) == "mine"
    await worker_a.release(first)  # its answer was never confirmed
    assert not await worker_b.answered_by_other(first)
    assert await worker_b.claim(first) == "taken_over"
    assert await worker_a.claim(first) == "theirs"  # b holds it now
    assert await worker_a.claim(second) == "mine"
    assert await worker_a.claim(second) == "taken_over"  # a's own earlier attempt, its answer unconfirmed
    await nc.close()


async def test_the_claims_bucket_is_never_weakened_by_a_worker(nats_server, tmp_path):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, ttl=7200))  # as an operator made it
    kv, kept = await ensure_answered(js, unit_settings(nats_server.url, tmp_path, queue_max_age_s=3600))
    assert [(d.field, d.current, d.wanted) for d in kept] == [("max_age", 7200, 3600)]
    _, kept = await ensure_answered(js, unit_settings(nats_server.url, tmp_path, queue_max_age_s=10800))
    assert kept == [] and (await js.stream_info(f"KV_{BUCKET}")).config.max_age == 10800
    await nc.close()


async def test_more_claim_replicas_than_servers_creates_the_bucket_with_one(nats_server, tmp_path):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    events = Events()
    _, kept = await ensure_answered(js, unit_settings(nats_server.url, tmp_path, stream_replicas=3), events)
    assert [(d.field, d.current, d.wanted, d.level) for d in kept] == [("num_replicas", 1, 3, "warning")]
    assert [code for code, _ in events.seen] == ["stream.differs"]
    assert (await js.stream_info(f"KV_{BUCKET}")).config.num_replicas == 1
    await nc.close()
