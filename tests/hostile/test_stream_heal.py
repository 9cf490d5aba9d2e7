"""The stream heals (issue 13, item 4): any client could delete FLEET_REQUESTS or a model's consumer; workers notice
(advisories, telemetry's look at the consumer, a periodic check), recreate them with their settings, log it, show it
in their heartbeat, and the callers of requests lost with the stream are told to send them again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.conftest import ask, send_many
from tests.unit_support import unit_settings
from workers import protocol as p
from workers.answered import ensure_answered
from workers.healing import StreamGuard
from workers.outcome import Finished
from workers.store import Store, read_recent
from workers.streams import ensure_consumers, ensure_stream, stored_us, stream_config

MODEL = "gemma3-270m"
SUBJECT = f"inference.request.{MODEL}"
DURABLE = p.consumer_name("inference", MODEL)
# The fields a worker sets on the stream it creates (workers/streams.py stream_config).
CONFIGURED = ("subjects", "retention", "storage", "discard", "discard_new_per_subject", "max_msgs_per_subject",
              "max_age", "max_msg_size", "num_replicas")
MAX_TOKENS = 8
WAIT_S = 120  # for a generation on a busy 2-core machine
T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """The first truthy result of `probe`, polled every 0.1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


async def stream_back(js: JetStreamContext) -> Any:
    async def probe() -> Any:
        try:
            stream = await js.stream_info(p.STREAM_NAME)
            await js.consumer_info(p.STREAM_NAME, DURABLE)
            return stream
        except NotFoundError:
            return None

    return await until(probe, 10, "the stream and the consumer exist again")


def events(db: Path, code: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM events WHERE code = ? ORDER BY id", (code,)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


async def logged(db: Path, code: str) -> sqlite3.Row:
    async def probe() -> sqlite3.Row | None:
        rows = events(db, code)
        return rows[-1] if rows else None

    return await until(probe, 10, f"event {code} in {db.name}")


async def first_replies(subs: list[Any], timeout: float) -> list[dict[str, Any] | None]:
    """Each caller's first reply (None: nothing within `timeout`)."""
    async def one(sub: Any) -> dict[str, Any] | None:
        try:
            return json.loads((await sub.next_msg(timeout)).data)
        except nats.errors.TimeoutError:
            return None

    return list(await asyncio.gather(*(one(s) for s in subs)))


async def health(nc: nats.NATS) -> p.Health:
    return p.Health.model_validate_json((await nc.request(p.health_subject(MODEL), b"", timeout=10)).data)


async def send(nc: nats.NATS, req_id: str, max_tokens: int) -> Any:
    """Publish one request with its own inbox subscription (a second reply would be seen)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"req_id": req_id, "input": "Tell me a fact about the sea.", "params": {"max_tokens": max_tokens}}
    await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
    return sub


async def load_and_delete_stream(nc: nats.NATS, prefix: str, n: int = 6) -> list[Any]:
    """Queue `n` short requests on a one-slot worker and delete the stream once the first is answered (the others
    still queued, one running); the callers' inbox subscriptions."""
    subs = await send_many(nc, n, MAX_TOKENS, prefix)
    await subs[0].next_msg(WAIT_S)
    await nc.jetstream().delete_stream(p.STREAM_NAME)
    return subs


# --- with the real worker ------------------------------------------------------------------------------------


@pytest.mark.model
async def test_a_deleted_stream_is_recreated_as_configured_logged_shown_and_serves_again(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1, HEARTBEAT_INTERVAL=1, QUEUE_ACK_WAIT_S=5)
    js = nc.jetstream()
    before = (await js.stream_info(p.STREAM_NAME)).config
    instance = (await health(nc)).instance
    beats: asyncio.Queue[p.Health] = asyncio.Queue()

    async def on_beat(msg: Any) -> None:
        await beats.put(p.Health.model_validate_json(msg.data))

    await nc.subscribe(p.heartbeat_subject(MODEL), cb=on_beat)
    await load_and_delete_stream(nc, "heal")
    deleted = time.monotonic()
    after = (await stream_back(js)).config
    assert time.monotonic() - deleted < 5  # the advisory: at once
    assert {f: getattr(after, f) for f in CONFIGURED} == {f: getattr(before, f) for f in CONFIGURED}

    out = await ask(nc, SUBJECT, {"req_id": "after-heal", "input": "Say hi.",
                                  "params": {"max_tokens": 8, "temperature": 0}}, WAIT_S)
    assert "error" not in out and out["req_id"] == "after-heal" and out["text"], json.dumps(out)

    row = await logged(w.db, "stream.recreated")
    assert row["level"] == "warning" and "deleted" in row["msg"] and json.loads(row["meta"])["lost"] >= 0

    async def beat_with_alert() -> p.Health | None:
        beat = await beats.get()
        return beat if any(a.kind == "stream.recreated" for a in beat.alerts) else None

    beat = await until(beat_with_alert, 10, "a heartbeat with the stream.recreated alert")
    alert = next(a for a in beat.alerts if a.kind == "stream.recreated")
    assert alert.level == "warning" and "deleted" in alert.message and abs(alert.ts - time.time()) < 60
    assert len(beat.alerts) <= 5 and beat.instance == instance and len(instance or "") == 16
    assert w.proc.poll() is None


@pytest.mark.model
async def test_callers_of_requests_lost_with_the_stream_hear_queue_lost_and_none_is_silent(start_worker, nc):
    # Needs the ingress to tell the guard of each queued request (Ingress(queued=StreamGuard.queued)), and the
    # attempt records in FLEET_ANSWERED keyed by stored time (answered.py) to tell the running one from the lost.
    w = await start_worker(WORKER_CONCURRENCY=1, QUEUE_ACK_WAIT_S=5)
    running = await send(nc, "running", 48)
    subs = [await send(nc, f"lost-{i}", MAX_TOKENS) for i in range(5)]
    js = nc.jetstream()

    async def taken() -> bool:
        info = await js.consumer_info(p.STREAM_NAME, DURABLE)
        return info.num_ack_pending == 1 and info.num_pending == len(subs)

    await until(taken, WAIT_S, "the first request running, the others queued")
    await js.delete_stream(p.STREAM_NAME)
    await stream_back(js)
    replies = await first_replies(subs, WAIT_S)
    assert None not in replies, f"silent callers: {[i for i, r in enumerate(replies) if r is None]}"
    for r in replies:
        assert r["error"]["code"] == 503 and r["error"]["type"] == "queue_lost", r
        assert "send it again" in r["error"]["message"]
    [answer] = await first_replies([running], WAIT_S)
    assert answer is not None and "error" not in answer and answer["req_id"] == "running"  # its worker answered
    out = await ask(nc, SUBJECT, {"req_id": "after", "input": "Hi", "params": {"max_tokens": 2}}, WAIT_S)
    assert "error" not in out
    assert await first_replies([running, *subs], 0.5) == [None] * 6  # one answer each
    row = await logged(w.db, "stream.recreated")
    assert json.loads(row["meta"])["told"] == 5
    con = sqlite3.connect(w.db)
    rejected = con.execute("SELECT req_id FROM requests WHERE error LIKE '503 queue_lost%' ORDER BY req_id")
    assert [r[0] for r in rejected] == [f"lost-{i}" for i in range(5)]


@pytest.mark.model
async def test_a_deleted_consumer_is_recreated_and_every_queued_request_is_still_answered(start_worker, nc):
    w = await start_worker(WORKER_CONCURRENCY=1, QUEUE_ACK_WAIT_S=5)
    subs = await send_many(nc, 5, MAX_TOKENS, "consumer")
    await subs[0].next_msg(WAIT_S)
    js = nc.jetstream()
    await js.delete_consumer(p.STREAM_NAME, DURABLE)
    await stream_back(js)
    replies = await first_replies(subs[1:], WAIT_S)
    assert all(r is not None and "error" not in r for r in replies), replies  # nothing was lost
    assert sorted(r["req_id"] for r in replies if r) == [f"consumer-{i}" for i in range(1, 5)]
    row = await logged(w.db, "consumer.recreated")
    assert row["level"] == "warning"
    assert any(a.kind == "consumer.recreated" for a in (await health(nc)).alerts)


@pytest.mark.model
async def test_two_workers_racing_to_recreate_both_survive_with_one_stream(start_worker, nc):
    a = await start_worker(WORKER_CONCURRENCY=1)
    b = await start_worker(WORKER_CONCURRENCY=1)
    js = nc.jetstream()
    for _ in range(2):  # deleted twice: the second time each worker knows the stream the first race left
        await js.delete_stream(p.STREAM_NAME)
        await stream_back(js)
        await asyncio.sleep(0.5)  # both guards have acted
    names = [s.config.name for s in await js.streams_info()]
    assert names.count(p.STREAM_NAME) == 1
    outs = await asyncio.gather(*(ask(nc, SUBJECT, {"req_id": f"race-{i}", "input": "Hi",
                                                   "params": {"max_tokens": 4, "temperature": 0}}, WAIT_S)
                                  for i in range(4)))
    assert all("error" not in o for o in outs), outs
    assert a.proc.poll() is None and b.proc.poll() is None
    for w in (a, b):
        await logged(w.db, "stream.recreated")
        assert events(w.db, "stream.recreate_failed") == []


# --- the guard on its own, against a real nats-server (no advisories: the periodic check) ----------------------


class Bus:
    """A model's queue and a guard that is never started: the test runs its check, as the timer would."""

    def __init__(self, url: str, data: Path) -> None:
        self.settings = unit_settings(url, data)
        self.url = url
        self.finished: list[Finished] = []

    async def __aenter__(self) -> Bus:
        s = self.settings
        self.store = Store(s.log_path)
        await self.store.open()
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, s, self.store)
        await ensure_consumers(self.js, s, self.store)
        self.kv, _ = await ensure_answered(self.js, s, self.store)
        self.guard = StreamGuard(self.nc, self.js, s, self.store, self.finished.append)
        await self.guard.check()
        self.durable = p.consumer_name(s.model_kind, s.model_name)
        self.psub = await self.js.pull_subscribe_bind(durable=self.durable, stream=p.STREAM_NAME)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.nc.close()
        await self.store.close()

    async def queue(self, req_id: str, deadline_ms: int | None = None) -> tuple[Any, int]:
        """Queue a request as the ingress does and tell the guard; the caller's inbox subscription, and the
        request's stream sequence."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        ack = await self.js.publish(p.queue_subject(self.settings.model_kind, self.settings.model_name), b"{}",
                                    headers={p.H_REQ_ID: req_id, p.H_REPLY_TO: inbox})
        self.guard.queued(ack.seq, req_id, [inbox], deadline_ms or p.now_ms() + 60_000, raw_input="{}")
        return sub, ack.seq

    async def events(self, code: str) -> list[dict[str, Any]]:
        await self.store.flush()
        return [e for e in read_recent(self.settings.log_path, "events", 100) if e["code"] == code]


async def test_a_periodic_check_recreates_the_stream_and_tells_only_the_callers_no_worker_took(nats_server, tmp_path):
    async with Bus(nats_server.url, tmp_path / "data") as bus:
        tok = p.token(bus.settings.model_name)
        # As workers record them in FLEET_ANSWERED: an attempt when it starts, a claim when it answers.
        running, _ = await bus.queue("running")  # still running when the stream goes: its worker answers it
        [m1] = await bus.psub.fetch(1, timeout=5)
        await bus.kv.put(f"{tok}.run.{m1.metadata.sequence.stream}.{stored_us(m1)}", b"0 running w1")
        answered, _ = await bus.queue("answered")  # answered already
        [m2] = await bus.psub.fetch(1, timeout=5)
        await bus.kv.put(f"{tok}.run.{m2.metadata.sequence.stream}.{stored_us(m2)}", b"0 running w1")
        await bus.kv.create(f"{tok}.{m2.metadata.sequence.stream}.{stored_us(m2)}", b"w1 x")
        given_back, _ = await bus.queue("given-back")  # failed once, waiting for a delivery that will not come
        [m3] = await bus.psub.fetch(1, timeout=5)
        await bus.kv.put(f"{tok}.run.{m3.metadata.sequence.stream}.{stored_us(m3)}", b"0 settled")
        await m3.nak(delay=30)
        lost, _ = await bus.queue("lost")
        stale, seq = await bus.queue("stale-claim")  # a claim at its sequence from an older stream does not count
        await bus.kv.create(f"{tok}.{seq}.1", b"w1 old")
        gone, _ = await bus.queue("given-up", deadline_ms=p.now_ms() - 1)  # its caller stopped waiting

        await bus.js.delete_stream(p.STREAM_NAME)
        await bus.guard.check()

        info = await bus.js.stream_info(p.STREAM_NAME)
        wanted = stream_config(bus.settings)
        assert {f: getattr(info.config, f) for f in CONFIGURED} == {f: getattr(wanted, f) for f in CONFIGURED}
        await bus.js.consumer_info(p.STREAM_NAME, bus.durable)
        for sub, req_id in ((given_back, "given-back"), (lost, "lost"), (stale, "stale-claim")):
            body = json.loads((await sub.next_msg(5)).data)
            assert body["req_id"] == req_id and body["error"]["type"] == "queue_lost"
            assert body["error"]["code"] == 503
        assert await first_replies([running, answered, gone], 0.5) == [None, None, None]
        assert sorted(f.intake.req_id for f in bus.finished) == ["given-back", "lost", "stale-claim"]
        assert all(f.error and f.error.startswith("503 queue_lost") and f.intake.raw_input == "{}"
                   for f in bus.finished)
        [event] = await bus.events("stream.recreated")
        assert event["level"] == "warning" and json.loads(event["meta"])["told"] == 3
        assert [a.code for a in bus.store.alerts] == ["stream.recreated"]

        # the new stream's sequences start at 1 again; the next check finds nothing to do
        await bus.guard.check()
        assert len(await bus.events("stream.recreated")) == 1


async def test_a_periodic_check_recreates_a_deleted_consumer_and_tells_nobody(nats_server, tmp_path):
    async with Bus(nats_server.url, tmp_path / "data") as bus:
        waiting, _ = await bus.queue("waiting")
        await bus.js.delete_consumer(p.STREAM_NAME, bus.durable)
        await bus.guard.check()
        info = await bus.js.consumer_info(p.STREAM_NAME, bus.durable)
        assert info.num_pending == 1  # the request is still queued, for the new consumer
        [msg] = await bus.psub.fetch(1, timeout=5)  # the same pull subscription works again (by durable name)
        assert msg.headers[p.H_REQ_ID] == "waiting"
        assert await first_replies([waiting], 0.3) == [None] and bus.finished == []
        [event] = await bus.events("consumer.recreated")
        assert event["level"] == "warning"
        assert await bus.events("stream.recreated") == []


async def test_a_stream_recreated_by_someone_else_is_noticed_by_its_creation_time(nats_server, tmp_path):
    async with Bus(nats_server.url, tmp_path / "data") as bus:
        lost, _ = await bus.queue("lost")
        other = unit_settings(nats_server.url, tmp_path / "other", model_name="other.model", worker_id="other")
        await bus.js.delete_stream(p.STREAM_NAME)
        await ensure_stream(bus.js, other)  # another model's worker was quicker
        kept, _ = await bus.queue("queued-again")  # this ingress queued into the new stream before the check
        await bus.guard.check()
        body = json.loads((await lost.next_msg(5)).data)
        assert body["error"]["type"] == "queue_lost"
        assert await first_replies([kept], 0.3) == [None]  # still queued: a worker answers it
        await bus.js.consumer_info(p.STREAM_NAME, bus.durable)
        [event] = await bus.events("stream.recreated")
        assert "another worker" in event["msg"]
        assert [e.req_id for e in bus.guard.remembered] == ["queued-again"]


async def test_a_stream_changed_under_the_worker_gets_the_rule_again(nats_server, tmp_path):
    async with Bus(nats_server.url, tmp_path / "data") as bus:
        info = await bus.js.stream_info(p.STREAM_NAME)
        info.config.max_age = 600.0  # an operator (or an attacker) shortens it: queued requests would expire
        await bus.js.update_stream(info.config)
        await bus.guard.check()
        assert (await bus.js.stream_info(p.STREAM_NAME)).config.max_age == bus.settings.queue_max_age_s
        [event] = await bus.events("stream.updated")
        assert "max_age" in event["msg"]
        await bus.guard.check()  # nothing changed since: nothing done
        assert len(await bus.events("stream.updated")) == 1
        assert await bus.events("stream.recreated") == []
