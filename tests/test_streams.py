"""A worker never weakens the queue an operator set up: on a real nats-server, an existing stream changes only
where the worker's setting is stricter and the change cannot drop a queued request; an existing consumer never
changes; every difference left alone is an event in the worker's SQLite log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from workers import protocol as p
from workers.store import Store, read_recent
from workers.streams import Difference, ensure_consumer, ensure_stream

from .unit_support import unit_settings

QUEUE = p.queue_subject("inference", "unit.model")


def operator_stream(**fields: Any) -> StreamConfig:
    """The stream as an operator made it with `nats stream add`: the worker's shape, the operator's numbers."""
    values: dict[str, Any] = dict(name=p.STREAM_NAME, subjects=[p.QUEUE_SUBJECTS],
                                  retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                                  discard=DiscardPolicy.NEW, discard_new_per_subject=True, num_replicas=1,
                                  max_msgs_per_subject=1000, max_age=3600.0, max_msg_size=1024 * 1024 + 4096,
                                  max_bytes=10_000_000)
    values.update(fields)
    return StreamConfig(**values)


async def ensure(url: str, tmp_path: Path, **settings: Any) -> tuple[list[Difference], StreamConfig, list[dict]]:
    """ensure_stream as a worker with these settings runs it; the differences, the stream after, the events."""
    s = unit_settings(url, tmp_path / "data", **settings)
    store = Store(s.log_path)
    await store.open()
    nc = await nats.connect(url)
    try:
        kept = await ensure_stream(nc.jetstream(), s, store)
        after = (await nc.jetstream().stream_info(p.STREAM_NAME)).config
    finally:
        await nc.close()
        await store.close()
    events = [e for e in reversed(read_recent(s.log_path, "events", 50)) if e["code"].startswith("stream.")]
    return kept, after, events


async def add(url: str, config: StreamConfig) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(config)
    await nc.close()


async def test_a_looser_queue_cap_leaves_the_operators_cap_and_is_recorded(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(max_msgs_per_subject=50))
    kept, after, events = await ensure(nats_server.url, tmp_path, queue_max_per_model=1000)
    assert after.max_msgs_per_subject == 50
    assert after.max_bytes == 10_000_000  # a field the worker does not set survives untouched
    assert [(d.field, d.setting, d.current, d.wanted) for d in kept] == [
        ("max_msgs_per_subject", "QUEUE_MAX_PER_MODEL", 50, 1000)]
    [event] = events
    assert event["code"] == "stream.differs" and event["level"] == "info"
    assert "max_msgs_per_subject is 50, QUEUE_MAX_PER_MODEL asks 1000" in event["msg"]
    assert json.loads(event["meta"])["field"] == "max_msgs_per_subject"


async def test_a_stricter_queue_cap_is_not_applied_because_it_would_delete_queued_requests(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(max_msgs_per_subject=50))
    nc = await nats.connect(nats_server.url)
    for i in range(30):
        await nc.jetstream().publish(QUEUE, f'{{"input": "{i}"}}'.encode())
    await nc.close()
    kept, after, events = await ensure(nats_server.url, tmp_path, queue_max_per_model=20)
    assert after.max_msgs_per_subject == 50
    nc = await nats.connect(nats_server.url)
    assert (await nc.jetstream().stream_info(p.STREAM_NAME)).state.messages == 30  # nothing queued was deleted
    await nc.close()
    [d] = kept
    assert (d.field, d.current, d.wanted) == ("max_msgs_per_subject", 50, 20)
    assert "deleting the oldest queued requests" in d.why
    assert [e["code"] for e in events] == ["stream.differs"]


async def test_max_age_only_grows(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(max_age=600.0))
    kept, after, events = await ensure(nats_server.url, tmp_path, queue_max_age_s=3600)
    assert after.max_age == 3600 and kept == []
    assert [e["code"] for e in events] == ["stream.updated"] and "max_age 600 s -> 3600 s" in events[0]["msg"]

    kept, after, _ = await ensure(nats_server.url, tmp_path, queue_max_age_s=60)
    assert after.max_age == 3600  # a shorter age would delete every queued request older than it
    assert [(d.field, d.current, d.wanted) for d in kept] == [("max_age", 3600, 60)]


async def test_max_msg_size_only_shrinks(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(max_msg_size=-1))
    kept, after, _ = await ensure(nats_server.url, tmp_path, max_request_bytes=65536)
    assert after.max_msg_size == 65536 + 4096 and kept == []

    kept, after, _ = await ensure(nats_server.url, tmp_path, max_request_bytes=1024 * 1024)
    assert after.max_msg_size == 65536 + 4096
    assert [(d.field, d.setting) for d in kept] == [("max_msg_size", "MAX_REQUEST_BYTES")]


async def test_the_operators_policies_stay_and_each_difference_is_a_warning(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(discard=DiscardPolicy.OLD, discard_new_per_subject=False))
    kept, after, events = await ensure(nats_server.url, tmp_path)
    assert after.discard == DiscardPolicy.OLD and not after.discard_new_per_subject
    assert {(d.field, d.level) for d in kept} == {("discard", "warning"), ("discard_new_per_subject", "warning")}
    assert {e["level"] for e in events} == {"warning"}


async def test_subjects_an_operator_added_stay_and_are_no_difference(nats_server, tmp_path):
    await add(nats_server.url, operator_stream(subjects=[p.QUEUE_SUBJECTS, "audit.>"]))
    kept, after, events = await ensure(nats_server.url, tmp_path)
    assert sorted(after.subjects) == ["audit.>", p.QUEUE_SUBJECTS] and kept == [] and events == []


async def test_same_settings_change_nothing_and_record_nothing(nats_server, tmp_path):
    await ensure(nats_server.url, tmp_path)  # creates it
    kept, _, events = await ensure(nats_server.url, tmp_path)
    assert kept == []
    assert [e["code"] for e in events] == ["stream.created"]


async def test_more_replicas_than_servers_is_a_warning_not_a_crash(nats_server, tmp_path):
    kept, after, events = await ensure(nats_server.url, tmp_path, stream_replicas=3)
    assert after.num_replicas == 1  # a single server: the queue is created with one copy rather than not at all
    [d] = kept
    assert (d.field, d.current, d.wanted, d.level) == ("num_replicas", 1, 3, "warning")
    assert "replicas > 1 not supported in non-clustered mode" in d.why
    assert [e["code"] for e in events] == ["stream.created", "stream.differs"]

    kept, after, _ = await ensure(nats_server.url, tmp_path, stream_replicas=3)  # the existing stream: refused
    assert after.num_replicas == 1
    assert [(d.field, d.level) for d in kept] == [("num_replicas", "warning")]
    assert "nats-server refused the change" in kept[0].why


async def test_an_existing_consumer_never_changes_and_each_difference_is_recorded(nats_server, tmp_path):
    settings = unit_settings(nats_server.url, tmp_path / "data", queue_ack_wait_s=30, queue_max_deliver=4)
    durable = p.consumer_name("inference", "unit.model")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_stream(js, settings)
    await js.add_consumer(p.STREAM_NAME, ConsumerConfig(durable_name=durable, filter_subject=QUEUE,
                                                         ack_policy=AckPolicy.EXPLICIT, ack_wait=90, max_deliver=10,
                                                         max_ack_pending=settings.queue_max_ack_pending))
    store = Store(settings.log_path)
    await store.open()
    assert await ensure_consumer(js, settings, store) == durable
    await store.close()
    info = await js.consumer_info(p.STREAM_NAME, durable)
    await nc.close()
    assert (info.config.ack_wait, info.config.max_deliver) == (90, 10)
    events = [e for e in read_recent(settings.log_path, "events", 50) if e["code"] == "consumer.differs"]
    assert sorted(json.loads(e["meta"])["setting"] for e in events) == ["QUEUE_ACK_WAIT_S", "QUEUE_MAX_DELIVER"]
    assert all(e["level"] == "info" and "never changes an existing consumer" in e["msg"] for e in events)
