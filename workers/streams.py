"""The queue's JetStream objects: the shared stream and each model's durable consumer, and the rule for an
existing one (docs/architecture.md, "The request path").

A worker creates what is missing from its own settings. What exists belongs to the operator (or to the
worker that came first): a worker changes it only where its own setting is stricter *and* the change cannot drop
a request the queue already accepted, and records one `stream.differs` / `consumer.differs` event for each
difference it leaves alone. Values therefore only move one way, so workers with different settings converge
instead of undoing each other at every restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from . import protocol as p
from .config import Settings
from .connection import EventSink

__all__ = ["Difference", "Rule", "ensure_consumer", "ensure_consumers", "ensure_stream", "longer_age", "more_replicas",
           "record", "recreate_stream", "refused_replicas", "stored_us", "stream_config", "tighten"]

log = logging.getLogger(__name__)

ERR_STREAM_NAME_IN_USE = 10058  # another worker created it first, with other settings
ERR_CONSUMER_EXISTS = 10148

# (wanted, current) -> None: apply wanted; "": the current value serves as well; else why it stays
Decide = Callable[[Any, Any], str | None]
Rule = tuple[str, str, Decide, str]  # field, the worker setting behind it, how to decide, the level if it stays


@dataclass(frozen=True)
class Difference:
    """One field where the existing stream or consumer differs from this worker's settings, left as it is."""

    target: str  # "stream FLEET_REQUESTS" or "consumer work-inference-gemma3-270m"
    field: str  # JetStream's name for it (num_replicas, max_age, …)
    setting: str  # the worker setting that asks for `wanted`
    current: Any
    wanted: Any
    why: str  # why the current value stays
    level: str = "info"  # warning: the queue does not behave as this worker expects, or nats-server refused

    def __str__(self) -> str:
        return (f"{self.target}: {self.field} is {_show(self.current)}, {self.setting} asks {_show(self.wanted)}; "
                f"left as it is: {self.why}")


def _unlimited(v: Any) -> float:
    return float("inf") if v is None or v <= 0 else float(v)  # JetStream: -1 (or 0) means no limit


def more_replicas(wanted: Any, current: Any) -> str | None:
    return None if wanted > current else "more replicas is stricter and a worker never lowers them"


def longer_age(wanted: Any, current: Any) -> str | None:
    if wanted > _unlimited(current):
        return None
    return ("a longer max_age is stricter: a shorter one makes nats-server delete everything older than it at "
            "once (queued requests, or their answer claims)")


def _max_msg_size(wanted: Any, current: Any) -> str | None:
    if wanted < _unlimited(current):
        return None
    return "a smaller max_msg_size is stricter (bigger requests are refused with a reply, nothing queued is touched)"


def _max_per_subject(wanted: Any, current: Any) -> str | None:
    if wanted > _unlimited(current):
        return "a smaller cap is stricter and a worker never raises it"
    return ("a smaller cap is stricter, but nats-server applies a lower cap by deleting the oldest queued requests "
            "above it, so only an operator lowers it (nats stream edit), when the queue is short")


def _policy(wanted: Any, current: Any) -> str | None:
    return "a worker never changes the queue's policies (nats-server refuses to change storage and retention)"


def _subjects(wanted: Any, current: Any) -> str | None:
    if set(wanted) <= set(current or []):
        return ""  # an operator's extra subjects stay
    return "a worker never changes the stream's subjects; requests for the missing ones cannot be queued"


def _consumer(wanted: Any, current: Any) -> str | None:
    return "a worker never changes an existing consumer (nats consumer edit does)"


STREAM_RULES: list[Rule] = [
    ("num_replicas", "STREAM_REPLICAS", more_replicas, "info"),
    ("max_age", "QUEUE_MAX_AGE_S", longer_age, "info"),
    ("max_msg_size", "MAX_REQUEST_BYTES", _max_msg_size, "info"),
    ("max_msgs_per_subject", "QUEUE_MAX_PER_MODEL", _max_per_subject, "info"),
    ("subjects", "the queue's subjects", _subjects, "error"),
    ("retention", "the queue's retention", _policy, "warning"),
    ("storage", "the queue's storage", _policy, "warning"),
    ("discard", "the queue's discard policy", _policy, "warning"),
    ("discard_new_per_subject", "the queue's discard policy", _policy, "warning"),
]
CONSUMER_RULES: list[Rule] = [
    ("filter_subject", "MODEL_NAME", _consumer, "error"),
    ("ack_policy", "the consumer's ack policy", _consumer, "warning"),
    ("deliver_policy", "the consumer's deliver policy", _consumer, "warning"),
    ("ack_wait", "QUEUE_ACK_WAIT_S", _consumer, "info"),
    ("max_deliver", "QUEUE_MAX_DELIVER", _consumer, "info"),
    ("max_ack_pending", "QUEUE_MAX_ACK_PENDING", _consumer, "info"),
]


def stream_config(settings: Settings) -> StreamConfig:
    """The stream this worker would create: a WorkQueue of every model's requests, refusing (not dropping) the
    newest request when a model's queue is full."""
    return StreamConfig(
        name=p.STREAM_NAME,
        subjects=[p.QUEUE_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_msgs_per_subject=settings.queue_max_per_model,
        discard_new_per_subject=True,
        max_age=settings.queue_max_age_s,
        max_msg_size=settings.max_request_bytes + 4096,
        num_replicas=settings.stream_replicas,
    )


async def ensure_stream(js: JetStreamContext, settings: Settings, events: EventSink | None = None
                        ) -> list[Difference]:
    """Create the shared WorkQueue stream, or tighten an existing one; returns the differences left alone.

    On an existing stream, per field (the one direction a worker moves it, and why):

    | field                 | setting             | stricter | a worker                                        |
    |-----------------------|---------------------|----------|-------------------------------------------------|
    | num_replicas          | STREAM_REPLICAS     | more     | raises it (survives more lost nodes)            |
    | max_age               | QUEUE_MAX_AGE_S     | longer   | raises it; a shorter one deletes queued requests|
    | max_msg_size          | MAX_REQUEST_BYTES   | smaller  | lowers it (only new publishes are refused)      |
    | max_msgs_per_subject  | QUEUE_MAX_PER_MODEL | fewer    | never changes it: raising undoes an operator's  |
    |                       |                     |          | cap, lowering deletes queued requests above it  |
    | subjects, retention, storage, discard           | -        | never changes them                  |

    Every other field (set by an operator) is sent back as it is. nats-server may refuse a change (more
    replicas than the cluster has servers, or a single server): that is a warning and an event, never an
    error; a stream it cannot create with STREAM_REPLICAS copies is created with one.
    """
    wanted = stream_config(settings)
    try:
        info = await js.stream_info(p.STREAM_NAME)
    except NotFoundError:
        created = await _create_stream(js, wanted, events)
        if created is not None:
            return [created] if isinstance(created, Difference) else []
        info = await js.stream_info(p.STREAM_NAME)  # another worker created it in between
    return await tighten(js, info.config, wanted, STREAM_RULES, settings, events)


async def recreate_stream(js: JetStreamContext, settings: Settings, events: EventSink | None = None) -> bool:
    """The stream was deleted: create it with this worker's settings. False when another worker was first with other
    settings (the usual rule then applies to theirs); nats-server accepts a create identical to the existing
    stream, so racing workers with the same settings all see True."""
    if await _create_stream(js, stream_config(settings), events) is not None:
        return True
    await ensure_stream(js, settings, events)
    return False


def stored_us(msg: Msg) -> int:
    """When JetStream stored `msg` (µs since the epoch): the same on every delivery of it, and unlike the stream
    sequence never repeated by a message of the stream recreated since (workers/healing.py), whose sequences
    start again at 1. Keys in FLEET_ANSWERED end with it."""
    return round(msg.metadata.timestamp.timestamp() * 1_000_000)


async def tighten(js: JetStreamContext, current: StreamConfig, wanted: StreamConfig, rules: list[Rule],
                  settings: Settings, events: EventSink | None) -> list[Difference]:
    """Move an existing stream's fields towards `wanted` where `rules` allow it; the differences left alone."""
    target = f"stream {current.name}"
    kept: list[Difference] = []
    changes: dict[str, Any] = {}
    for field, setting, decide, level in rules:
        want, have = getattr(wanted, field), getattr(current, field)
        if _same(want, have):
            continue
        why = decide(want, have)
        if why is None:
            changes[field] = want
        elif why:
            kept.append(Difference(target, field, setting, have, want, why, level))
    # Replicas apart: a cluster too small for them must not block the limits.
    for batch in ({k: v for k, v in changes.items() if k != "num_replicas"},
                  {k: v for k, v in changes.items() if k == "num_replicas"}):
        if batch:
            kept += await _update_stream(js, current, batch, rules, settings, events)
    for d in kept:
        record(events, "stream.differs", d)
    return kept


async def _create_stream(js: JetStreamContext, config: StreamConfig, events: EventSink | None
                         ) -> Difference | bool | None:
    """True when created as asked, a Difference when created with one replica, None when it already exists."""
    asked = config.num_replicas or 1
    try:
        await js.add_stream(config)
    except APIError as e:
        if e.err_code == ERR_STREAM_NAME_IN_USE:
            return None
        if asked <= 1:
            raise
        config.num_replicas = 1  # a single server, or too few servers up: a queue now beats none
        try:
            await js.add_stream(config)
        except APIError as again:
            if again.err_code == ERR_STREAM_NAME_IN_USE:
                return None
            raise
        _created(events, config)
        d = refused_replicas(p.STREAM_NAME, asked, e)
        record(events, "stream.differs", d)
        return d
    _created(events, config)
    return True


def refused_replicas(stream: str, asked: int, e: APIError) -> Difference:
    return Difference(f"stream {stream}", "num_replicas", "STREAM_REPLICAS", 1, asked,
                      f"nats-server refused {asked} ({e.description}); created with one replica", "warning")


async def _update_stream(js: JetStreamContext, current: StreamConfig, changes: dict[str, Any], rules: list[Rule],
                         settings: Settings, events: EventSink | None) -> list[Difference]:
    """Apply `changes` on top of the stream's current config; a refusal comes back as differences."""
    before = {k: getattr(current, k) for k in changes}
    for k, v in changes.items():
        setattr(current, k, v)
    try:
        await js.update_stream(current)
    except APIError as e:
        for k, v in before.items():
            setattr(current, k, v)
        settings_of = {f: setting for f, setting, _, _ in rules}
        return [Difference(f"stream {current.name}", k, settings_of[k], before[k], changes[k],
                           f"nats-server refused the change ({e.description})", "warning") for k in changes]
    if events is not None:
        what = ", ".join(f"{k} {_show(before[k])} -> {_show(v)}" for k, v in changes.items())
        events.event("stream.updated", f"stream {current.name}: {what} (stricter settings of "
                     f"{settings.worker_id})", **{k: _show(v) for k, v in changes.items()})
    return []


async def ensure_consumers(js: JetStreamContext, settings: Settings, events: EventSink | None = None
                           ) -> dict[int, str]:
    """The model's durable consumer of each priority (protocol.PRIORITIES), by priority."""
    return {pr: await ensure_consumer(js, settings, events, pr) for pr in p.PRIORITIES}


async def ensure_consumer(js: JetStreamContext, settings: Settings, events: EventSink | None = None,
                          priority: int = p.DEFAULT_PRIORITY) -> str:
    """The model's durable pull consumer of one priority (shared by every worker of the model); returns its name.

    An existing consumer is never changed, whichever side is stricter (an operator tunes it with
    `nats consumer edit`); each field where it differs from this worker's settings is recorded as one
    `consumer.differs` event. Its replicas follow the stream's (num_replicas 0).
    """
    kind, model = settings.model_kind, settings.model_name
    durable = p.consumer_name(kind, model, priority)
    wanted = ConsumerConfig(
        durable_name=durable,
        filter_subject=p.queue_subject(kind, model, priority),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.queue_ack_wait_s,
        max_deliver=settings.queue_max_deliver,
        max_ack_pending=settings.queue_max_ack_pending,
    )
    try:
        info = await js.consumer_info(p.STREAM_NAME, durable)
    except NotFoundError:
        try:
            await js.add_consumer(p.STREAM_NAME, wanted)
            return durable
        except APIError as e:
            if e.err_code != ERR_CONSUMER_EXISTS:
                raise
            info = await js.consumer_info(p.STREAM_NAME, durable)
    for field, setting, decide, level in CONSUMER_RULES:
        want, have = getattr(wanted, field), getattr(info.config, field)
        if not _same(want, have):
            record(events, "consumer.differs",
                    Difference(f"consumer {durable}", field, setting, have, want, decide(want, have) or "", level))
    return durable


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a or 0) - float(b or 0)) < 1e-3  # durations come back from nanoseconds
    if isinstance(a, list) and isinstance(b, list):
        return sorted(a) == sorted(b)
    return bool(a == b)


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g} s"
    if hasattr(v, "value"):
        return str(v.value)
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _created(events: EventSink | None, config: StreamConfig) -> None:
    if events is not None:
        events.event("stream.created", f"created stream {p.STREAM_NAME} with {config.num_replicas} replica(s)",
                     replicas=config.num_replicas)


def record(events: EventSink | None, code: str, d: Difference) -> None:
    if d.level != "info":
        log.warning("%s", d)
    else:
        log.info("%s", d)
    if events is not None:
        events.event(code, str(d), level=d.level, field=d.field, setting=d.setting, current=_show(d.current),
                     wanted=_show(d.wanted))
