"""The queue heals: a worker notices when the stream FLEET_REQUESTS or its model's durable consumer is deleted (or
changed), creates it again with its own settings (the rule of workers/streams.py), records it, and tells the callers
whose queued requests went down with the stream (docs/architecture.md, "The request path").

It learns of a deletion three ways, because any one may fail: JetStream's advisories (a least-privilege user may not
be allowed to read them; one sent during a reconnect is missed), telemetry's once-a-second look at the consumer, and a
check of its own every CHECK_INTERVAL_S. Several workers race to recreate: a stream or consumer that exists by the
time a worker creates it was created by another, which is as good.

A consumer deleted alone loses nothing: its messages stay in the stream and the new consumer delivers them again
(workers/answered.py keeps them answered once). A deleted stream loses every request it held. The ingress tells
the guard of each request it queued (`queued`, O(1), bounded); when the stream goes, each remembered request that no
worker took (no attempt or claim in FLEET_ANSWERED for its sequence while that stream lived) is answered
`503 queue_lost`, and the caller sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo, StreamConfig
from nats.js.errors import APIError, NotFoundError

from . import protocol as p
from .answered import BUCKET, RELEASED
from .config import Settings
from .connection import EventSink
from .outcome import Finished, Intake
from .queue import Replier
from .streams import ensure_consumer, ensure_consumers, ensure_stream, recreate_stream

__all__ = ["CHECK_INTERVAL_S", "LOST_MESSAGE", "MAX_REMEMBERED", "Queued", "StreamGuard"]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0
MAX_REMEMBERED = 10_000  # queued requests remembered per worker (the oldest go first)
INPUT_EXCERPT = 512  # characters of a lost request's input kept for its log row
TELL_CONCURRENCY = 16
LOST_MESSAGE = "the queue was deleted before a worker took this request; send it again"

Record = Callable[[Finished], None]  # Ledger.record


def _us(t: datetime | None) -> int:
    return round(t.timestamp() * 1_000_000) if t is not None else 0


@dataclass(frozen=True, slots=True)
class Queued:
    """A request the ingress put in the stream, as long as its caller may wait for it."""

    seq: int
    req_id: str
    targets: tuple[str, ...]
    deadline_ms: int
    raw_input: str | None = None
    trace_id: str | None = None
    priority: int = p.DEFAULT_PRIORITY


class StreamGuard:
    """Keeps FLEET_REQUESTS and this model's consumers (one per priority) in place, and answers the callers of
    requests lost with them."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, events: EventSink, record: Record,
                 *, interval: float = CHECK_INTERVAL_S, remember: int = MAX_REMEMBERED) -> None:
        self.nc, self.js, self.settings, self.events, self.record = nc, js, settings, events, record
        self.interval = interval
        self.replier = Replier(nc, settings)
        self.durables = {pr: p.consumer_name(settings.model_kind, settings.model_name, pr) for pr in p.PRIORITIES}
        self.durable = self.durables[p.DEFAULT_PRIORITY]
        self.remembered: deque[Queued] = deque(maxlen=remember)
        self.created: datetime | None = None  # the stream being watched (its creation time tells a new one)
        self.stream_config: StreamConfig | None = None
        self.consumer_configs: dict[str, ConsumerConfig] = {}
        self._pending: dict[str, int] = {}  # by consumer: requests queued and not yet delivered, as last seen
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self._failing = False

    # --- what the ingress and telemetry call --------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    def queued(self, seq: int, req_id: str, targets: list[str], deadline_ms: int, *, raw_input: str | None = None,
               trace_id: str | None = None, priority: int = p.DEFAULT_PRIORITY) -> None:
        """The ingress queued a request at stream sequence `seq`; its caller waits on `targets` until `deadline_ms`."""
        now = p.now_ms()
        while self.remembered and self.remembered[0].deadline_ms < now:
            self.remembered.popleft()
        if targets:  # nobody to tell otherwise
            self.remembered.append(Queued(seq, req_id, tuple(targets), deadline_ms,
                                          raw_input[:INPUT_EXCERPT] if raw_input else None, trace_id, priority))

    async def cancel_queued(self, req_id: str, owner: str | None = None) -> str | None:
        """A cancel for a request this instance queued: remove it from the stream while no worker has taken it
        and answer its caller `cancelled` ("removed"); "taken" when a worker already has it (that worker's
        runner stops it), "refused" when `owner` is not the caller's, None when this instance did not queue it."""
        entry = next((e for e in reversed(self.remembered) if e.req_id == req_id), None)
        if entry is None or entry.deadline_ms < p.now_ms():
            return None
        if owner is not None and p.inbox_owner(entry.targets[0]) != owner:
            return "refused"
        try:
            info = await self.js.consumer_info(p.STREAM_NAME, self.durables[entry.priority])
            if info.delivered is not None and (info.delivered.stream_seq or 0) >= entry.seq:
                return "taken"
            await self.js.delete_msg(p.STREAM_NAME, entry.seq)
        except Exception:  # gone already (taken and answered), or JetStream unreachable: the runners remember it
            return "taken"
        self.remembered.remove(entry)
        await self._tell(entry, p.BadRequest("cancelled", "the caller cancelled the request while it was queued; "
                                             "it was removed from the queue and never ran", status=499), "cancelled")
        return "removed"

    def observe(self, info: ConsumerInfo | None) -> None:
        """Telemetry's look at one of the model's consumers (None: not found, a reason to check now)."""
        if info is None:
            self._kick.set()
            return
        self._pending[info.name] = int(info.num_pending or 0)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Note the stream and consumer as they are now (the worker has just ensured them), then watch."""
        with contextlib.suppress(Exception):
            info = await self.js.stream_info(p.STREAM_NAME)
            self.created, self.stream_config = info.created, info.config
            for durable in self.durables.values():
                consumer = await self.js.consumer_info(p.STREAM_NAME, durable)
                self.consumer_configs[durable] = consumer.config
                self.observe(consumer)
        for subject in (f"$JS.EVENT.ADVISORY.STREAM.DELETED.{p.STREAM_NAME}",
                        f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{p.STREAM_NAME}",
                        *(f"$JS.EVENT.ADVISORY.CONSUMER.DELETED.{p.STREAM_NAME}.{d}" for d in self.durables.values())):
            self._subs.append(await self.nc.subscribe(subject, cb=self._on_advisory))
        self._task = asyncio.create_task(self._loop(), name="stream-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def _on_advisory(self, _msg: Msg) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.interval)
            self._kick.clear()
            if not self.nc.is_connected:
                continue  # reconnecting: looked at again once the connection is back
            try:
                await self.check()
            except APIError as e:  # JetStream refused (permissions, resources): said once, tried again until it works
                if not self._failing:
                    self._failing = True
                    self.events.event("stream.recreate_failed", f"could not check or recreate the queue: "
                                      f"{e.description or e!r}; trying again every {self.interval:g} s", level="error")
                log.warning("stream guard: %r", e)
            except Exception as e:  # unreachable for a moment (a reconnect, an election): the next check
                log.info("stream guard: %r", e)
            else:
                if self._failing:
                    self._failing = False
                    self.events.event("stream.recreate_recovered", "the queue is checked and in place again")

    # --- the check ---------------------------------------------------------------------------------

    async def check(self) -> None:
        """Look at the stream and the consumer once; recreate what is missing, re-apply the rule to what changed."""
        async with self._lock:
            try:
                stream = await self.js.stream_info(p.STREAM_NAME)
            except NotFoundError:
                await self._stream_lost(None)
                return
            if self.created is not None and stream.created != self.created:
                await self._stream_lost(stream.created)  # deleted and created again before this worker looked
                return
            self.created = stream.created
            if self.stream_config is not None and stream.config != self.stream_config:
                await ensure_stream(self.js, self.settings, self.events)  # changed: the rule, and its differences
                stream = await self.js.stream_info(p.STREAM_NAME)
            self.stream_config = stream.config
            for priority, durable in self.durables.items():
                try:
                    consumer = await self.js.consumer_info(p.STREAM_NAME, durable)
                except NotFoundError:
                    await self._consumer_lost(priority)
                    continue
                known = self.consumer_configs.get(durable)
                if known is not None and consumer.config != known:  # recorded as consumer.differs
                    await ensure_consumer(self.js, self.settings, self.events, priority)
                self.consumer_configs[durable] = consumer.config
                self.observe(consumer)

    async def _consumer_lost(self, priority: int) -> None:
        durable = self.durables[priority]
        await ensure_consumer(self.js, self.settings, self.events, priority)
        self.consumer_configs[durable] = (await self.js.consumer_info(p.STREAM_NAME, durable)).config
        kept = self._pending.get(durable, 0)
        self.events.event("consumer.recreated", f"consumer {durable} was deleted; recreated it with this "
                          f"worker's settings; its queued requests ({kept} when last seen) stay in the stream and "
                          "are delivered again", level="warning", consumer=durable, pending=kept)
        log.warning("%s: consumer %s was deleted; recreated", self.settings.model_name, durable)

    async def _stream_lost(self, recreated_at: datetime | None) -> None:
        """The stream this worker watched is gone (`recreated_at`: someone already created a new one)."""
        old_us, lost = _us(self.created), self.pending
        entries = list(self.remembered)
        self.remembered.clear()
        try:
            by_us = recreated_at is None and await recreate_stream(self.js, self.settings, self.events)
            stream = await self.js.stream_info(p.STREAM_NAME)
            await ensure_consumers(self.js, self.settings, self.events)  # consumers go with their stream
            configs = {d: (await self.js.consumer_info(p.STREAM_NAME, d)).config for d in self.durables.values()}
        except Exception:
            self.remembered.extendleft(reversed(entries))  # told at the next try
            raise
        self.created, self.stream_config, self.consumer_configs = stream.created, stream.config, configs
        self._pending.clear()
        told = await self._tell_lost(entries, old_us, _us(stream.created))
        lost = max(lost, told)  # as last seen by telemetry, or as known here, whichever is more
        who = "recreated it" if by_us else "another worker (or an operator) had recreated it"
        model = self.settings.model_name
        what = (f"at least {lost} queued request(s) of {model} were lost with it, {told} caller(s) told to send "
                "again" if lost else f"no queued request of {model} is known to have been lost with it")
        self.events.event("stream.recreated", f"stream {p.STREAM_NAME} was deleted; {who} with this worker's "
                          f"settings; {what}", level="warning", lost=lost, told=told, by_this_worker=by_us)
        log.warning("%s: stream %s was deleted; recreated (%d queued request(s) lost, %d caller(s) told)",
                    self.settings.model_name, p.STREAM_NAME, lost, told)

    # --- the callers of lost requests --------------------------------------------------------------------

    async def _tell_lost(self, entries: list[Queued], old_us: int, new_us: int) -> int:
        """Answer `queue_lost` to each remembered request that no worker took while the old stream lived; the ones
        the ingress queued into the new stream are remembered again."""
        gate = asyncio.Semaphore(TELL_CONCURRENCY)
        now = p.now_ms()

        async def one(e: Queued) -> bool:
            if e.deadline_ms < now:
                return False  # its caller gave up
            async with gate:
                if await self._in_stream(e):
                    self.remembered.append(e)
                    return False
                if await self._taken(e.seq, old_us, new_us):
                    return False
                await self._tell(e)
                return True

        return sum(await asyncio.gather(*(one(e) for e in entries)))

    async def _in_stream(self, e: Queued) -> bool:
        """Whether the request sits in the stream as it is now (queued after someone else recreated it)."""
        try:
            stored = await self.js.get_msg(p.STREAM_NAME, e.seq)
        except Exception:
            return False
        return (stored.headers or {}).get(p.H_REQ_ID) == e.req_id

    async def _taken(self, seq: int, old_us: int, new_us: int) -> bool:
        """Whether a worker is running or has answered the message stored at `seq` between `old_us` and `new_us`
        (the old stream's life): an attempt `<model>.run.<seq>.<stored µs>` = `<crashes> running <worker_id>`, or
        a claim `<model>.<seq>.<stored µs>` (workers/answered.py). An attempt that gave the message back
        (`settled`), waiting for a delivery that will not come, or a released claim does not count."""
        model = p.token(self.settings.model_name)
        for key, running in ((f"{model}.run.{seq}.*", True), (f"{model}.{seq}.*", False)):
            try:
                entry = await self.js.get_last_msg(f"KV_{BUCKET}", f"$KV.{BUCKET}.{key}")
            except Exception:  # none, or unreadable: telling the caller beats silence
                continue
            if (entry.headers or {}).get("KV-Operation") not in (None, "PUT"):
                continue
            state = (entry.data or b"").split()[1:2]
            if (running and state != [b"running"]) or (not running and state == [RELEASED.encode()]):
                continue
            if old_us <= _int((entry.subject or "").rsplit(".", 1)[-1]) < new_us:
                return True
        return False

    async def _tell(self, e: Queued, err: p.BadRequest | None = None, finish: p.FinishReason = "error") -> None:
        """Answer a remembered caller `err` (default: its request was lost with the stream) and log it."""
        err = err or p.BadRequest("queue_lost", LOST_MESSAGE, status=503)
        data, headers = self.replier.error(e.req_id, err.status, err.type, err.message, finish)
        if e.trace_id:
            headers[p.H_TRACE_ID] = e.trace_id
        with contextlib.suppress(Exception):  # disconnected: nobody can be told
            await self.replier.send(list(e.targets), data, headers, e.req_id)
        intake = Intake(req_id=e.req_id, worker_id=self.settings.worker_id, raw_input=e.raw_input,
                        trace_id=e.trace_id, deliveries=0)
        self.record(Finished.refused(intake, err))


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return -1
