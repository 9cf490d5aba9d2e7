"""The fleet registry: one in-memory picture of every worker instance, which every view reads.

Instances are keyed by `worker_id` and grouped by the `model_name` their bodies carry (as written, dots and
all). Liveness is judged on the monitor's own clock from when it last heard from an instance, against the
heartbeat interval that instance announced: `stale` after 1x (plus a little grace), `offline` after 2x, or at
once when the instance says it is `stopping`. Offline instances are purged after PURGE_AFTER. Memory is bounded
by MONITOR_MAX_INSTANCES (evicting unconfirmed instances first, then offline ones, then the least recently heard)
and MONITOR_HISTORY_LEN samples per model; models exist only while they have an instance.

Anyone on the bus can publish a heartbeat, so the registry trusts bodies only so far: their strings are cleaned
on the way in (clean.py); a worker_id is held by the first `instance` token heard for it, and bodies with another
token are ignored until that instance has gone quiet (a forged `stopping` cannot take a running worker off the
board); and the instance cap evicts instances no health reply has confirmed before any confirmed one.

Request events (`events.request.*`) go into a bounded log of the last MONITOR_REQUESTS_MAX (request_log.py) and
out to every SSE listener at once. What the views get out of it are the shapes in shapes.py. The clock is
injectable (`clock=`, or `now=` per call), so tests drive liveness on a synthetic one; wall-clock times are only
ever shown, never judged on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from workers import protocol as p

from . import clean
from .config import MonitorSettings
from .request_log import RequestLog
from .shapes import (
    AlertEntry,
    Event,
    History,
    InstanceEntry,
    InstanceQueue,
    Liveness,
    NatsChange,
    Pressure,
    RequestEntry,
    ServiceEntry,
    ServiceQueue,
    ServiceRemoved,
    SlotEntry,
    Slots,
    Snapshot,
    Stats,
    StatusChange,
    WorkerAlert,
)
from .window import instance_window, model_window

log = logging.getLogger(__name__)

# Best first: a model's status is the best of its instances'.
STATUS_ORDER: dict[Liveness, int] = {"online": 0, "draining": 1, "starting": 2, "stale": 3, "offline": 4}
LIVE: tuple[Liveness, ...] = ("online", "draining", "starting")
SERVICE_ALERTS = 10  # the newest alerts over a model's instances shown with the model


def _wire(data: bytes) -> dict[str, Any]:
    """A body off the bus as a JSON object with its strings cleaned; ValueError if it is not one."""
    obj = clean.body(clean.wire_object(data))
    if not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("model_name", "worker_id")):
        raise ValueError("body names no model or worker")
    return obj


def decode_health(data: bytes) -> p.Health:
    """A heartbeat or health reply, cleaned. Workers leave `None` fields out of the JSON while `protocol.Health`
    requires them, so they are put back before validation."""
    obj = _wire(data)
    obj.setdefault("endpoint", None)
    if isinstance(obj.get("queue_metrics"), dict):
        obj["queue_metrics"].setdefault("last_processed_at", None)
    return p.Health.model_validate(obj)


def decode_report(data: bytes) -> p.BackpressureReport:
    """A backpressure report, cleaned."""
    return p.BackpressureReport.model_validate(_wire(data))


@dataclass(slots=True)
class Instance:
    health: p.Health
    first_seen: float  # wall clock, for display
    last_seen: float  # wall clock, for display
    seen_at: float  # monotonic: liveness is judged on this
    status: Liveness
    pending: int  # the freshest queue numbers, from a heartbeat or a backpressure report
    active: int
    capacity: int
    level: p.Level
    data_at: float  # monotonic time of those numbers
    slots: p.SlotUsage | None  # the engine's slots and KV cache, as fresh as those numbers
    wait_s: float | None  # expected wait reported with those numbers
    health_at: float  # monotonic time of the last heartbeat or health reply (uptime counts from it)
    uptime_max: float = 0.0  # the longest uptime shown so far: it never goes backwards for one process
    rps: float | None = None  # unknown until two bodies at least a second apart
    rate_mark: tuple[float, int] | None = None  # (monotonic, total_processed) the rate is measured from
    confirmed: bool = False  # a health reply came from it: a live worker, not just a heartbeat anyone could send
    foreign_logged: bool = False  # bodies from another instance token were ignored, and that was logged


@dataclass(slots=True)
class Model:
    name: str
    first_seen: float
    workers: set[str] = field(default_factory=set)
    # (wall time, depth, req/s, tokens/s, p50 ms, p95 ms)
    history: deque[tuple[float, int, float, float | None, float | None, float | None]] = field(
        default_factory=deque)


@dataclass(slots=True)
class _Group:
    """A model's instances, split the way its entry reads them."""

    instances: list[Instance]
    live: list[Instance]
    freshest: Instance  # whose queue numbers stand for the model: the latest among the live ones, if any
    rps: float | None


class Listener:
    """One SSE client's bounded queue; a client that falls behind is dropped (it reconnects to a snapshot)."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self.dropped = False


class Registry:
    def __init__(self, settings: MonitorSettings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock = clock or time.monotonic  # what `now` is when a call does not say
        self.instances: dict[str, Instance] = {}
        self.models: dict[str, Model] = {}
        self.listeners: set[Listener] = set()
        self.requests = RequestLog(settings.monitor_requests_max)
        self.nats_connected = False
        self.counters = {"heartbeats": 0, "reports": 0, "request_events": 0, "health_replies": 0, "invalid": 0,
                         "oversized": 0, "foreign": 0, "evicted": 0, "purged": 0}
        self.unconfirmed_arrived = False  # a new instance came by heartbeat: the feed sweeps early to confirm it
        self._dirty: set[str] = set()
        self._last_sample = 0.0
        self._nats_shown: bool | None = None

    # --- input ------------------------------------------------------------------------------

    def observe_health(self, h: p.Health, now: float | None = None, *, confirmed: bool = False) -> None:
        """A heartbeat or a health reply (`confirmed`: it answered the monitor's request): create or refresh the
        instance, unless the body comes from another instance than the one holding its worker_id."""
        now = self._now(now)
        wall = time.time()
        inst = self.instances.get(h.worker_id)
        qm = h.queue_metrics
        new = inst is None
        if inst is not None and not self._accepts(inst, h, now, confirmed):
            self.counters["foreign"] += 1
            if not inst.foreign_logged:
                inst.foreign_logged = True
                log.warning("ignoring bodies for worker %s from another instance (%.16s, holding %.16s); "
                            "two workers share that WORKER_ID, or someone forges its heartbeats",
                            h.worker_id, h.instance or "none", inst.health.instance)
            return
        if inst is None:
            self._make_room()
            inst = Instance(h, wall, wall, now, self._liveness(h, 0.0), qm.pending_messages, qm.active_processing,
                            qm.queue_capacity, h.backpressure_status.level, now, qm.slots,
                            h.backpressure_status.expected_wait_s, now)
            self.instances[h.worker_id] = inst
            self.unconfirmed_arrived |= not confirmed
        else:
            if inst.health.model_name != h.model_name:
                self._detach(h.worker_id, inst.health.model_name)
            if h.instance != inst.health.instance or h.started_at != inst.health.started_at:
                # another process took the id over: start its record afresh
                inst.confirmed = inst.foreign_logged = False
                inst.uptime_max = 0.0
        self._attach(h.worker_id, h.model_name, wall)
        inst.health, inst.last_seen, inst.seen_at, inst.health_at = h, wall, now, now
        inst.confirmed |= confirmed
        if now >= inst.data_at:
            inst.pending, inst.active, inst.capacity = qm.pending_messages, qm.active_processing, qm.queue_capacity
            inst.slots, inst.wait_s = qm.slots, h.backpressure_status.expected_wait_s
            inst.level, inst.data_at = h.backpressure_status.level, now
        self._measure_rate(inst, now)
        if new:
            self._changed(inst, "new")
        else:
            self._set_status(inst, self._liveness(h, 0.0))
        self._dirty.add(h.model_name)

    def observe_report(self, r: p.BackpressureReport, now: float | None = None) -> None:
        """A backpressure report refreshes the queue numbers (every second while busy) of a known instance."""
        now = self._now(now)
        inst = self.instances.get(r.worker_id)
        if inst is None or inst.health.model_name != r.model_name:
            return  # its first heartbeat or the next sweep brings the full picture
        if inst.health.instance and r.instance != inst.health.instance:
            self.counters["foreign"] += 1  # a report from another process than the one holding this worker_id
            return
        inst.pending, inst.active, inst.capacity, inst.level = (r.pending_messages, r.active_processing,
                                                                r.queue_capacity, r.status)
        inst.slots, inst.wait_s = r.slots, r.expected_wait_s
        inst.data_at = inst.seen_at = now
        inst.last_seen = time.time()
        self._set_status(inst, self._liveness(inst.health, 0.0))
        self._dirty.add(r.model_name)

    def observe_request(self, ev: p.RequestEvent) -> RequestEntry | None:
        """A finished request (already cleaned: request_log.decode_request_event) into the Requests view, pushed
        to every listener at once; None if it comes from another process than the one holding its worker_id."""
        inst = self.instances.get(ev.worker_id)
        if inst is not None and inst.health.instance and ev.instance != inst.health.instance:
            self.counters["foreign"] += 1
            return None
        item = self.requests.add(ev)
        self._emit(item)
        return item

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Status changes, purges, history samples and the pushes of changed models; called every tick."""
        now = self._now(now)
        if self.nats_connected != self._nats_shown:
            self._nats_shown = self.nats_connected
            self._emit(NatsChange(connected=self.nats_connected, at=time.time()))
        for wid, inst in list(self.instances.items()):
            self._set_status(inst, self._liveness(inst.health, now - inst.seen_at))
            if inst.status == "offline" and now - inst.seen_at > self.settings.purge_after:
                self._remove(wid)
                self.counters["purged"] += 1
        if now - self._last_sample >= self.settings.monitor_history_interval:
            self._last_sample = now
            wall = time.time()
            for m in self.models.values():
                g = self._group(m)
                w = model_window([i.health.stats for i in g.live if i.health.stats is not None])
                rps = g.rps if g.rps is not None else w.rate_per_s if w else 0.0
                m.history.append((wall, g.freshest.pending, rps, w.tokens_per_s if w else None,
                                  w.latency_p50_ms if w else None, w.latency_p95_ms if w else None))
                self._dirty.add(m.name)
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Push the entries of the models that changed since the last push (the feed calls this right after
        input, so a changed queue reaches the dashboard without waiting for the next tick)."""
        now = self._now(now)
        for name in self._dirty if self.listeners else ():  # entries are built only for someone to read
            if (changed := self.models.get(name)) is not None:
                self._emit(self._entry(changed, now))
        self._dirty.clear()

    # --- views ----------------------------------------------------------------------------------

    def services(self, now: float | None = None) -> list[ServiceEntry]:
        """Every model, sorted by name."""
        now = self._now(now)
        return [self._entry(m, now) for m in sorted(self.models.values(), key=lambda m: m.name)]

    def service(self, name: str, now: float | None = None) -> ServiceEntry | None:
        """One model by its name as written or by its subject token (`nomic-embed-v1_5`)."""
        m = self.models.get(name) or next((m for m in self.models.values() if p.token(m.name) == name), None)
        return self._entry(m, self._now(now)) if m else None

    def snapshot(self, now: float | None = None) -> Snapshot:
        return Snapshot(at=time.time(), nats_connected=self.nats_connected, services=self.services(now),
                        requests=self.requests.select(newest_first=False))

    def history(self) -> dict[str, History]:
        """Every model's chart samples, by name."""
        return {m.name: _history(m) for m in sorted(self.models.values(), key=lambda m: m.name)}

    def stats(self) -> Stats:
        """Counters for /metrics and /healthz."""
        return Stats(**self.counters, instances=len(self.instances), models=len(self.models),
                     sse_clients=len(self.listeners))

    def listen(self) -> Listener:
        lst = Listener(self.settings.monitor_sse_queue)
        self.listeners.add(lst)
        return lst

    def unlisten(self, lst: Listener) -> None:
        self.listeners.discard(lst)

    # --- inside ---------------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _liveness(self, h: p.Health, age: float) -> Liveness:
        """The verdict on an instance whose last body is `h`, heard `age` seconds ago."""
        status = h.status
        if status == "stopping":
            return "offline"
        interval = h.heartbeat_interval_s or self.settings.monitor_default_interval
        if age > 2 * interval:
            return "offline"
        if age > interval * (1 + self.settings.monitor_stale_grace):
            return "stale"
        return status

    def _accepts(self, inst: Instance, h: p.Health, now: float, confirmed: bool) -> bool:
        """Whether `h` may speak for the worker_id `inst` holds. The first instance token heard keeps it while it
        is live; a body without a token counts as another instance then. A worker that never sent a token (older
        workers) is taken at its word, as before tokens existed. A health reply may take over from a holder that
        never answered one (a forger that got in first)."""
        held = inst.health.instance
        if held is None or h.instance == held:
            return True
        if self._liveness(inst.health, now - inst.seen_at) in ("stale", "offline"):
            return True  # the holder went quiet or stopped: a restart under the same id
        return confirmed and not inst.confirmed

    def _set_status(self, inst: Instance, status: Liveness) -> None:
        if status != inst.status:
            old, inst.status = inst.status, status
            self._changed(inst, old)

    def _changed(self, inst: Instance, old: Liveness | Literal["new"]) -> None:
        self._dirty.add(inst.health.model_name)
        self._emit(StatusChange(model_name=inst.health.model_name, worker_id=inst.health.worker_id, from_=old,
                                to=inst.status, at=time.time()))

    def _measure_rate(self, inst: Instance, now: float) -> None:
        total = inst.health.queue_metrics.total_processed
        mark = inst.rate_mark
        if mark is None or total < mark[1]:  # first sight, or the worker restarted under the same id
            inst.rate_mark, inst.rps = (now, total), None
        elif now - mark[0] >= 1.0:  # heartbeats sent on a status change may come close together
            inst.rps = round((total - mark[1]) / (now - mark[0]), 3)
            inst.rate_mark = (now, total)

    def _attach(self, wid: str, model: str, wall: float) -> None:
        m = self.models.get(model)
        if m is None:
            m = self.models[model] = Model(model, wall, history=deque(maxlen=self.settings.monitor_history_len))
        m.workers.add(wid)

    def _detach(self, wid: str, model: str) -> None:
        m = self.models.get(model)
        if m is None:
            return
        m.workers.discard(wid)
        if not m.workers:
            del self.models[model]
            self._emit(ServiceRemoved(model_name=model, at=time.time()))

    def _remove(self, wid: str) -> None:
        inst = self.instances.pop(wid)
        self._detach(wid, inst.health.model_name)
        self._dirty.add(inst.health.model_name)

    def _make_room(self) -> None:
        if len(self.instances) < self.settings.monitor_max_instances:
            return
        # Unconfirmed instances go before any confirmed one (a flood of forged heartbeats must not push real
        # workers out), offline before live, and then the least recently heard.
        victim = min(self.instances.items(),
                     key=lambda kv: (kv[1].confirmed, kv[1].status != "offline", kv[1].seen_at))[0]
        self._remove(victim)
        self.counters["evicted"] += 1

    def _emit(self, event: Event) -> None:
        for lst in list(self.listeners):
            try:
                lst.queue.put_nowait(event)
            except asyncio.QueueFull:
                lst.dropped = True
                self.listeners.discard(lst)

    def _group(self, m: Model) -> _Group:
        insts = [self.instances[w] for w in m.workers]
        live = [i for i in insts if i.status in LIVE]
        rates = [i.rps for i in live if i.rps is not None]
        return _Group(insts, live, max(live or insts, key=lambda i: i.data_at),
                      round(sum(rates), 3) if rates else None)

    def _entry(self, m: Model, now: float) -> ServiceEntry:
        g = self._group(m)
        fresh = g.freshest
        waits = [i.wait_s for i in g.live if i.wait_s is not None]
        newest = max(g.instances, key=lambda i: i.seen_at).health  # descriptive fields from the latest body
        processed = [i.health.queue_metrics.last_processed_at for i in g.instances]
        return ServiceEntry(
            model_name=m.name,
            token=p.token(m.name),
            kind=newest.kind,
            status=min((i.status for i in g.instances), key=STATUS_ORDER.__getitem__),
            capabilities=sorted({c for i in g.instances for c in i.health.capabilities}),
            model_info=newest.model_info,
            endpoint=next((i.health.endpoint for i in g.live if i.health.endpoint), newest.endpoint),
            nats_topic=newest.nats_topic,
            version=newest.version,
            queue_metrics=ServiceQueue(
                pending_messages=fresh.pending,  # JetStream's depth for the model: the same for every replica
                active_processing=sum(i.active for i in g.live),
                queue_capacity=fresh.capacity,
                total_processed=sum(i.health.queue_metrics.total_processed for i in g.instances),
                total_failed=sum(i.health.queue_metrics.total_failed for i in g.instances),
                last_processed_at=max((t for t in processed if t is not None), default=None),
            ),
            backpressure_status=_pressure(fresh, max(waits) if waits else None),
            slots=_slots([i.slots for i in g.live if i.slots is not None]),
            requests_per_s=g.rps,
            stats=model_window([i.health.stats for i in g.live if i.health.stats is not None]),
            first_seen=m.first_seen,
            last_seen=max(i.last_seen for i in g.instances),
            uptime=round(max((self._uptime(i, now) for i in g.live), default=0.0), 1),
            instance_count=len(g.instances),
            online_count=len(g.live),
            instances=[self._instance(i, now) for i in sorted(g.instances, key=lambda i: i.health.worker_id)],
            alerts=sorted((WorkerAlert(worker_id=i.health.worker_id, **a.model_dump()) for i in g.instances
                           for a in i.health.alerts), key=lambda a: a.ts)[-SERVICE_ALERTS:],
            history=_history(m),
        )

    def _uptime(self, inst: Instance, now: float) -> float:
        """Its reported uptime plus the time since that body while it is live; never less than shown before
        (reports between heartbeats, and heartbeats that took a while to arrive, used to pull it back)."""
        if inst.status in LIVE:
            inst.uptime_max = max(inst.uptime_max, inst.health.uptime_s + max(0.0, now - inst.health_at))
        return max(inst.uptime_max, inst.health.uptime_s)

    def _instance(self, inst: Instance, now: float) -> InstanceEntry:
        h, qm = inst.health, inst.health.queue_metrics
        return InstanceEntry(
            worker_id=h.worker_id, status=inst.status, worker_status=h.status, endpoint=h.endpoint,
            version=h.version, first_seen=inst.first_seen, last_seen=inst.last_seen,
            age_s=round(now - inst.seen_at, 2), uptime=round(self._uptime(inst, now), 1),
            started_at=h.started_at, heartbeat_interval_s=h.heartbeat_interval_s, seq=h.seq,
            queue_metrics=InstanceQueue(pending_messages=inst.pending, active_processing=inst.active,
                                        queue_capacity=qm.queue_capacity, total_processed=qm.total_processed,
                                        total_failed=qm.total_failed, last_processed_at=qm.last_processed_at),
            backpressure_status=_pressure(inst, inst.wait_s),
            slots=_slots([inst.slots] if inst.slots is not None else []),
            requests_per_s=inst.rps,
            stats=instance_window(h.stats) if h.stats is not None else None,
            host=h.host,
            slot_requests=[SlotEntry(**r.model_dump()) for r in inst.slots.requests] if inst.slots else [],
            confirmed=inst.confirmed,
            alerts=[AlertEntry(**a.model_dump()) for a in h.alerts],
        )


def _pressure(inst: Instance, wait_s: float | None) -> Pressure:
    """The level `inst` reported with its queue numbers, the utilization they make, and the expected wait."""
    return Pressure(level=inst.level, utilization=round(inst.pending / inst.capacity, 4) if inst.capacity else 0.0,
                    expected_wait_s=wait_s)


def _history(m: Model) -> History:
    h = m.history
    return History(t=[round(x[0], 1) for x in h], queue_depth=[x[1] for x in h], requests_per_s=[x[2] for x in h],
                   tokens_per_s=[x[3] for x in h], latency_p50_ms=[x[4] for x in h],
                   latency_p95_ms=[x[5] for x in h])


def _slots(usages: list[p.SlotUsage]) -> Slots | None:
    """Slot and KV usage summed; each kv_* field over the usages that report it, null if none does."""
    if not usages:
        return None

    def total(name: str) -> int | None:
        known = [v for u in usages if (v := getattr(u, name)) is not None]
        return sum(known) if known else None

    tokens, reserved, kept = total("kv_tokens"), total("kv_reserved"), total("kv_kept")
    return Slots(slots=sum(u.slots for u in usages), busy=sum(u.busy for u in usages),
                 waiting=sum(u.waiting for u in usages), kv_tokens=tokens, kv_reserved=reserved, kv_kept=kept,
                 kv_used=round(((reserved or 0) + (kept or 0)) / tokens, 4) if tokens else None)
