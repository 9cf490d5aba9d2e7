"""One answer per queued request, even when JetStream delivers it twice.

JetStream delivers at least once. When the node that leads a replicated consumer dies, a delivery or an ack
it had not yet replicated is lost, and the new leader hands the message out again, sometimes while the first
worker is still answering it (on a 3-node cluster, tests/test_cluster.py: a second answer in 8 of 14 runs
without this, in none of 15 with it). So before replying, a worker claims the message in a replicated KV
bucket, keyed by the message's stream sequence (the same on every redelivery, unlike the caller's req_id,
which callers choose). The first claim wins; a worker that finds another's claim acks without replying. The
claim is committed by a quorum before the reply goes out, so it survives the node that took it; while the
bucket has no leader the claim waits (an election: seconds), and after `QUEUE_ACK_WAIT_S` without one the
worker answers anyway: a second answer is better than none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from . import protocol as p
from .config import Settings
from .connection import EventSink
from .streams import Difference, Rule, longer_age, more_replicas, record, refused_replicas, stored_us, tighten

__all__ = ["BUCKET", "Answered", "Attempts", "Claim", "ensure_answered"]

# How a claim came out: this worker answers first ("mine"), answers for a claimer that is gone or without a
# claim while the bucket had no leader (a second answer is possible: the reply is marked Fleet-Duplicate), or
# another live worker answers ("theirs").
Claim = Literal["mine", "taken_over", "unclaimed", "theirs"]

BUCKET = "FLEET_ANSWERED"
RELEASED = "released"  # the claim's value after an unconfirmed answer: `<worker_id> released`
CONFIRMED_KEPT = 10_000  # confirmed answers remembered per process (a redelivery comes within ack_wait)
# The never-lower rule for the bucket (workers/streams.py): more replicas, and claims kept at least as long as
# a request may stay queued (a claim that expires first would let a late redelivery be answered again).
BUCKET_RULES: list[Rule] = [
    ("num_replicas", "STREAM_REPLICAS", more_replicas, "info"),
    ("max_age", "QUEUE_MAX_AGE_S", longer_age, "info"),
]


async def ensure_answered(js: JetStreamContext, settings: Settings, events: EventSink | None = None
                          ) -> tuple[KeyValue, list[Difference]]:
    """The claims bucket, created with STREAM_REPLICAS copies and a TTL of QUEUE_MAX_AGE_S, or the existing one
    tightened by the same rule as the queue's stream; with the differences left alone."""
    config = KeyValueConfig(bucket=BUCKET, history=1, ttl=settings.queue_max_age_s, storage=StorageType.FILE,
                            replicas=settings.stream_replicas, description="one answer per queued request")
    try:
        kv = await js.key_value(BUCKET)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(config), []
        except APIError as e:
            if settings.stream_replicas <= 1:
                raise
            config.replicas = 1  # a single server, or too few up (as for the queue's stream)
            kv = await js.create_key_value(config)
            d = refused_replicas(f"KV_{BUCKET}", settings.stream_replicas, e)
            record(events, "stream.differs", d)
            return kv, [d]
    current = (await js.stream_info(f"KV_{BUCKET}")).config
    wanted = current.evolve(num_replicas=settings.stream_replicas, max_age=settings.queue_max_age_s)
    return kv, await tighten(js, current, wanted, BUCKET_RULES, settings, events)


class Answered:
    """Claims the right to answer a queued message, once per message across every worker of the fleet."""

    def __init__(self, kv: KeyValue, settings: Settings, events: EventSink,
                 live: Callable[[str], bool] = lambda _worker_id: True) -> None:
        self.kv, self.settings, self.events = kv, settings, events
        self.live = live  # whether a worker that claimed a message is still heard from (telemetry.is_live)
        self.confirmed: OrderedDict[str, None] = OrderedDict()  # keys this process's confirmed answers hold

    def key(self, msg: Msg) -> str:
        """`<model>.<stream seq>.<stored µs>`: a stream recreated after a deletion numbers from 1 again."""
        return f"{p.token(self.settings.model_name)}.{msg.metadata.sequence.stream}.{stored_us(msg)}"

    async def claim(self, msg: Msg) -> Claim:
        """Whether this worker answers `msg` (see Claim)."""
        key = self.key(msg)
        mine = f"{self.settings.worker_id} {uuid.uuid4().hex}".encode()
        deadline = time.monotonic() + self.settings.queue_ack_wait_s
        while True:
            try:
                await self.kv.create(key, mine)
                return "mine"
            except KeyWrongLastSequenceError:
                try:
                    entry = await self.kv.get(key)
                except KeyNotFoundError:
                    continue
                claim = entry.value or b""
                if claim == mine:  # ours: an earlier try was committed but its answer lost with a dying node
                    return "mine"
                claimer, _, state = claim.decode(errors="replace").partition(" ")
                if state == RELEASED:
                    # An earlier attempt's answer was never confirmed: it may have reached the caller or not.
                    # Take the claim over (one winner) and answer, marked as a possible duplicate.
                    try:
                        await self.kv.update(key, mine, last=entry.revision)
                    except KeyWrongLastSequenceError:
                        continue
                    return "taken_over"
                if claimer == self.settings.worker_id:
                    # This process claimed it on an earlier delivery: answered if that answer was confirmed.
                    return "theirs" if key in self.confirmed else "taken_over"
                if self.live(claimer):
                    return "theirs"
                # The claimer is gone (killed between its claim and its reply, or since): answering again
                # risks a second answer, not answering risks none at all; nothing accepted may be lost.
                self.events.event("request.claim_taken_over", f"{claimer} claimed it and is gone; answering",
                                  level="warning", key=key)
                return "taken_over"
            except (TimeoutError, nats.errors.Error, APIError) as e:  # the bucket is electing a leader
                if time.monotonic() > deadline:
                    self.events.event("request.claim_failed", f"answering without a claim ({e!r}); a second "
                                      "answer is possible", level="warning", key=key)
                    return "unclaimed"
                await asyncio.sleep(0.1)

    def answer_confirmed(self, msg: Msg) -> None:
        """The server has this worker's answer to `msg`: a redelivery of it (an ack lost) is acked unanswered."""
        self.confirmed[self.key(msg)] = None
        while len(self.confirmed) > CONFIRMED_KEPT:
            self.confirmed.popitem(last=False)

    async def answered_by_other(self, msg: Msg) -> bool:
        """Whether `msg` was already answered: claimed by another live worker, or by this one with its answer
        confirmed (a redelivery after a lost ack: ack it without running it again)."""
        key = self.key(msg)
        if key in self.confirmed:
            return True
        try:
            claim = (await self.kv.get(key)).value or b""
        except (KeyNotFoundError, TimeoutError, nats.errors.Error, APIError):
            return False
        claimer, _, state = claim.decode(errors="replace").partition(" ")
        return state != RELEASED and claimer != self.settings.worker_id and self.live(claimer)

    async def release(self, msg: Msg) -> None:
        """This worker's answer was not confirmed (it may or may not have reached the caller): mark the claim
        released, so the next attempt, on any worker, answers again and marks that answer Fleet-Duplicate."""
        with contextlib.suppress(Exception):
            await self.kv.put(self.key(msg), f"{self.settings.worker_id} {RELEASED}".encode())


class Attempts:
    """Counts the attempts at a message that ended with their worker gone (no ack, no nak): a request that
    crashes every worker that runs it (a llama.cpp bug, a poison input) is answered `dead_letter` after
    POISON_MAX_CRASHES such attempts instead of killing the fleet one worker at a time.

    Each attempt writes `<crashes> running <worker_id>` under `<model>.run.<stream seq>.<stored µs>` in the
    claims bucket before it runs, and `<crashes> settled` when it gives the message back; an attempt that finds
    `running` left by the previous one counts one more crash. The key expires with the bucket's TTL."""

    def __init__(self, kv: KeyValue, settings: Settings, events: EventSink) -> None:
        self.kv, self.settings, self.events = kv, settings, events

    def key(self, msg: Msg) -> str:
        return f"{p.token(self.settings.model_name)}.run.{msg.metadata.sequence.stream}.{stored_us(msg)}"

    async def begin(self, msg: Msg) -> int:
        """Record this attempt; the number of earlier attempts that crashed."""
        crashes = 0
        if (msg.metadata.num_delivered or 1) > 1:
            try:
                count, _, state = ((await self.kv.get(self.key(msg))).value or b"").decode().partition(" ")
                crashes = int(count) + (1 if state.startswith("running") else 0)
            except (KeyNotFoundError, ValueError):
                pass
            except (TimeoutError, nats.errors.Error, APIError) as e:
                self.events.event("request.attempt_unknown", f"could not read earlier attempts ({e!r})",
                                  level="warning", key=self.key(msg))
        await self._put(msg, f"{crashes} running {self.settings.worker_id}")
        return crashes

    async def settled(self, msg: Msg, crashes: int) -> None:
        """The attempt gave the message back itself: it did not crash."""
        await self._put(msg, f"{crashes} settled")

    async def _put(self, msg: Msg, value: str) -> None:
        with contextlib.suppress(TimeoutError, nats.errors.Error, APIError):
            await self.kv.put(self.key(msg), value.encode())
