"""What a worker tells the world: health replies, heartbeats, backpressure reports, `$SRV` stats.

Queue depth is JetStream's own number (consumer `num_pending + num_ack_pending`), refreshed once a
second by one task and cached; replicas of a model therefore report the same depth. That look at the consumer is
shared with the stream guard (workers/healing.py), which recreates a deleted consumer.

Every heartbeat and health reply carries `instance`, a random token drawn once per process (the monitor trusts
the first one it saw for a worker_id), and `alerts`, the latest events worth an operator's eye (Store.alerts),
`stats`, the last STATS_WINDOW_S seconds of requests (workers/window.py), and `host`, the machine's use.

The backpressure level is the expected wait of a new request (`protocol.expected_wait`): the queue depth × this
instance's recent mean service time ÷ the slots of the model's live instances (this one's and those its peers
announce in their heartbeats). Each finished request is published as a RequestEvent (the monitor's Requests view).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from . import protocol as p
from .config import Settings
from .metrics import Metrics
from .outcome import Ledger
from .store import Store
from .surface import ModelCard
from .window import Host

INSTANCE = secrets.token_hex(8)  # this process, in every heartbeat
ALERT_MAX_AGE_S = 3600.0  # an alert older than this is no longer news



class WorkerState(Protocol):
    """What telemetry reads of the worker."""

    started_at: float
    ledger: Ledger  # the totals

    @property
    def status(self) -> p.WorkerStatus: ...

    @property
    def card(self) -> ModelCard: ...

    @property
    def active(self) -> int: ...

    @property
    def slots(self) -> p.SlotUsage | None: ...


class ConsumerWatch(Protocol):
    """Told of each look at the model's consumer (None: it does not exist): healing.StreamGuard."""

    def observe(self, info: ConsumerInfo | None) -> None: ...


class Telemetry:
    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, store: Store, state: WorkerState,
                 metrics: Metrics, watch: ConsumerWatch | None = None) -> None:
        self.nc, self.js, self.settings, self.store, self.state, self.metrics = nc, js, settings, store, state, metrics
        self.watch = watch
        self.instance = INSTANCE
        self.depth = 0
        self.seq = 0
        self.peers: dict[str, float] = {}  # worker_id -> monotonic time of its last heartbeat
        self.peer_slots: dict[str, int] = {}  # worker_id -> the slots its last heartbeat announced
        self.host = Host()
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._heartbeat_failed = False

    async def start(self) -> None:
        s = self.settings
        self._subs.append(await self.nc.subscribe(p.health_subject(s.model_name), cb=self._on_health))
        self._subs.append(await self.nc.subscribe(p.heartbeat_subject(s.model_name), cb=self._on_peer))
        self.host.refresh_gpus()
        await self.heartbeat()
        self._tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                       asyncio.create_task(self._report_loop(), name="backpressure")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.heartbeat()  # the `stopping` one
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- numbers -------------------------------------------------------------------

    @property
    def utilization(self) -> float:
        return round(self.depth / self.settings.queue_max_per_model, 4)

    @property
    def level(self) -> p.Level:
        return self.backpressure().level

    @property
    def live_slots(self) -> int:
        """Requests the model's live instances can run at once: this one's slots and its live peers'."""
        own = self.state.slots
        me = self.settings.worker_id
        return (own.slots if own else 0) + sum(n for w, n in self.peer_slots.items() if w != me and self.is_live(w))

    def stats(self) -> p.WindowStats | None:
        window = self.state.ledger.window
        return window.stats() if window is not None else None

    def backpressure(self, stats: p.WindowStats | None = None) -> p.Backpressure:
        """The level by the expected wait of a new request (protocol.wait_level), beside the capacity fraction."""
        s = self.settings
        stats = stats or self.stats()
        mean_ms = stats.mean_service_ms if stats else None
        wait = p.expected_wait(self.depth, mean_ms / 1000 if mean_ms is not None else None, self.live_slots)
        level = p.wait_level(wait, self.utilization, s.backpressure_wait_warning_s, s.backpressure_wait_critical_s,
                             s.backpressure_warning, s.backpressure_critical)
        return p.Backpressure(level=level, utilization=self.utilization, expected_wait_s=wait)

    @property
    def worker_count(self) -> int:
        return len({w for w in self.peers if self.is_live(w)} | {self.settings.worker_id})

    def is_live(self, worker_id: str) -> bool:
        """This instance, or a peer of the model heard within two heartbeat intervals."""
        seen = self.peers.get(worker_id)
        return worker_id == self.settings.worker_id or (
            seen is not None and seen >= time.monotonic() - 2 * self.settings.heartbeat_interval)

    async def refresh_depth(self) -> None:
        """The model's depth: queued or running requests of every priority (one consumer each)."""
        s = self.settings
        depth = 0
        for priority in p.PRIORITIES:
            try:
                info = await self.js.consumer_info(p.STREAM_NAME, p.consumer_name(s.model_kind, s.model_name, priority))
            except NotFoundError:
                if self.watch is not None:
                    self.watch.observe(None)
                return
            except Exception:
                return  # keep the last known depth while JetStream is unreachable
            if self.watch is not None:
                self.watch.observe(info)
            depth += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        self.depth = depth
        self.metrics.waiting.labels(s.model_name).set(self.depth)

    def health(self) -> p.Health:
        s, st = self.settings, self.state
        stats = self.stats()
        host, port = s.http_host_port or ("", 0)
        endpoint = f"http://{_public_host(host)}:{port}" if port else None
        return p.Health(
            model_name=s.model_name, worker_id=s.worker_id, kind=s.model_kind, status=st.status,
            capabilities=st.card.capabilities, endpoint=endpoint,
            nats_topic=p.request_subject(s.model_kind, s.model_name), version=p.VERSION,
            model_info=st.card.model_info,
            queue_metrics=p.QueueMetrics(
                pending_messages=self.depth, active_processing=st.active, queue_capacity=s.queue_max_per_model,
                total_processed=st.ledger.total_processed, total_failed=st.ledger.total_failed,
                last_processed_at=st.ledger.last_processed_at, slots=st.slots,
            ),
            backpressure_status=self.backpressure(stats),
            started_at=st.started_at, uptime_s=round(time.time() - st.started_at, 3),
            heartbeat_interval_s=s.heartbeat_interval, seq=self.seq, instance=self.instance, alerts=self.alerts(),
            stats=stats, host=self.host.sample(),
        )

    def alerts(self) -> list[p.Alert]:
        """The worker's latest warnings worth showing on the monitor, newest last (from memory, not SQLite)."""
        since = time.time() - ALERT_MAX_AGE_S
        return [p.Alert(ts=a.ts, kind=a.code, message=a.msg, level="critical" if a.level == "error" else "warning")
                for a in self.store.alerts if a.ts >= since]

    def report(self) -> p.BackpressureReport:
        s = self.settings
        bp = self.backpressure()
        return p.BackpressureReport(
            model_name=s.model_name, worker_id=s.worker_id, pending_messages=self.depth,
            active_processing=self.state.active, queue_capacity=s.queue_max_per_model,
            utilization=bp.utilization, status=bp.level, worker_count=self.worker_count,
            timestamp=time.time(), instance=self.instance, slots=self.state.slots, expected_wait_s=bp.expected_wait_s,
        )

    def stats_data(self, _endpoint_stats: Any = None) -> dict[str, Any]:
        """The `data` of `$SRV.STATS`: the cached queue depth and this instance's totals."""
        st = self.state
        return {"queue_depth": self.depth, "active": st.active, "processed": st.ledger.total_processed,
                "failed": st.ledger.total_failed, "level": self.level, "status": st.status}

    # --- publishing -------------------------------------------------------------------

    def publish_event(self, event: p.RequestEvent) -> None:
        """Publish a finished request's event (the Ledger's sink): fire and forget, off the request's path."""
        try:
            task = asyncio.get_running_loop().create_task(self._publish_event(event))
        except RuntimeError:  # not on the event loop (a thread): nobody to publish with
            return
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _publish_event(self, event: p.RequestEvent) -> None:
        with contextlib.suppress(Exception):  # a lost event costs a row in a view, never a request
            await self.nc.publish(p.request_event_subject(self.settings.model_name), p.dumps(event))

    async def heartbeat(self) -> None:
        self.seq += 1
        self._forget_quiet_peers()
        try:
            await self.nc.publish(p.heartbeat_subject(self.settings.model_name), p.dumps(self.health()))
            if self._heartbeat_failed:
                self._heartbeat_failed = False
                self.store.event("heartbeat.recovered", "heartbeats are going out again")
        except Exception as e:
            if not self._heartbeat_failed:  # one event per outage, not one per beat
                self._heartbeat_failed = True
                self.store.event("heartbeat.failed", f"could not publish a heartbeat: {e!r}", level="warning")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            self.host.refresh_gpus()
            await self.heartbeat()

    def _forget_quiet_peers(self) -> None:
        for w in [w for w in self.peers if not self.is_live(w)]:
            self.peers.pop(w, None)
            self.peer_slots.pop(w, None)

    async def _report_loop(self) -> None:
        s = self.settings
        subject = p.monitoring_subject(s.model_kind, s.model_name)
        last_sent = 0.0
        was_busy = False
        while True:
            await self.refresh_depth()
            busy = self.depth > 0 or self.state.active > 0
            interval = s.report_interval_busy if busy else s.report_interval_idle
            now = time.monotonic()
            # report at the busy cadence, at the idle cadence, and at once when the queue empties
            if now - last_sent >= interval or (was_busy and not busy):
                with contextlib.suppress(Exception):
                    await self.nc.publish(subject, p.dumps(self.report()))
                last_sent = now
            was_busy = busy
            await asyncio.sleep(min(s.report_interval_busy, 1.0))

    async def _on_health(self, msg: Msg) -> None:
        if msg.reply:
            await msg.respond(p.dumps(self.health()))

    async def _on_peer(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            body = p.Health.model_validate_json(msg.data)
            if body.status == "stopping":
                self.peers.pop(body.worker_id, None)
                self.peer_slots.pop(body.worker_id, None)
            else:
                self.peers[body.worker_id] = time.monotonic()
                slots = body.queue_metrics.slots
                self.peer_slots[body.worker_id] = slots.slots if slots and body.status == "online" else 0


def _public_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        import socket

        return socket.gethostname()
    return host
