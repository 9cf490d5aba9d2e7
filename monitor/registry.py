"""The fleet registry: one in-memory picture of every worker instance, which every view reads.

Instances are keyed by `worker_id` and grouped by the `model_name` their bodies carry (as written, dots and
all). Liveness is judged on the monitor's own clock from when it last heard from an instance, against the
heartbeat interval that instance announced: `stale` after 1x (plus a little grace), `offline` after 2x, or at
once when the instance says it is `stopping`. Offline instances are purged after PURGE_AFTER. Memory is bounded
by MONITOR_MAX_INSTANCES (the least recently heard instance is evicted first) and MONITOR_HISTORY_LEN samples
per model; models exist only while they have an instance.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from workers import protocol as p

from .config import MonitorSettings

# Best first: a model's status is the best of its instances'.
STATUS_ORDER = {"online": 0, "draining": 1, "starting": 2, "stale": 3, "offline": 4}
LIVE = ("online", "draining", "starting")


def decode_health(data: bytes) -> p.Health:
    """A heartbeat or health reply. Workers leave `None` fields out of the JSON while `protocol.Health` requires
    them, so they are put back before validation."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("health body is not a JSON object")
    obj.setdefault("endpoint", None)
    if isinstance(obj.get("queue_metrics"), dict):
        obj["queue_metrics"].setdefault("last_processed_at", None)
    return p.Health.model_validate(obj)


@dataclass(slots=True)
class Instance:
    health: p.Health
    first_seen: float  # wall clock, for display
    last_seen: float  # wall clock, for display
    seen_at: float  # monotonic: liveness is judged on this
    status: str
    pending: int  # the freshest queue numbers, from a heartbeat or a backpressure report
    active: int
    capacity: int
    level: str
    data_at: float  # monotonic time of those numbers
    rps: float | None = None  # unknown until two bodies at least a second apart
    rate_mark: tuple[float, int] | None = None  # (monotonic, total_processed) the rate is measured from


@dataclass(slots=True)
class Model:
    name: str
    first_seen: float
    workers: set[str] = field(default_factory=set)
    history: deque[tuple[float, int, float]] = field(default_factory=deque)  # (wall time, depth, req/s)


class Listener:
    """One SSE client's bounded queue; a client that falls behind is dropped (it reconnects to a snapshot)."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=size)
        self.dropped = False


class Registry:
    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.instances: dict[str, Instance] = {}
        self.models: dict[str, Model] = {}
        self.listeners: set[Listener] = set()
        self.nats_connected = False
        self.counters = {"heartbeats": 0, "reports": 0, "health_replies": 0, "invalid": 0, "oversized": 0,
                         "evicted": 0, "purged": 0}
        self._dirty: set[str] = set()
        self._last_sample = 0.0
        self._nats_shown: bool | None = None

    # --- input ------------------------------------------------------------------------------

    def observe_health(self, h: p.Health, now: float | None = None) -> None:
        """A heartbeat or a health reply: create or refresh the instance."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        inst = self.instances.get(h.worker_id)
        qm = h.queue_metrics
        if inst is None:
            self._make_room()
            inst = Instance(h, wall, wall, now, "new", qm.pending_messages, qm.active_processing,
                            qm.queue_capacity, h.backpressure_status.level, now)
            self.instances[h.worker_id] = inst
        elif inst.health.model_name != h.model_name:
            self._detach(h.worker_id, inst.health.model_name)
        self._attach(h.worker_id, h.model_name, wall)
        inst.health, inst.last_seen, inst.seen_at = h, wall, now
        if now >= inst.data_at:
            inst.pending, inst.active, inst.capacity = qm.pending_messages, qm.active_processing, qm.queue_capacity
            inst.level, inst.data_at = h.backpressure_status.level, now
        self._measure_rate(inst, now)
        self._set_status(inst, self._liveness(inst, now))
        self._dirty.add(h.model_name)

    def observe_report(self, r: p.BackpressureReport, now: float | None = None) -> None:
        """A backpressure report refreshes the queue numbers (every second while busy) of a known instance."""
        now = time.monotonic() if now is None else now
        inst = self.instances.get(r.worker_id)
        if inst is None or inst.health.model_name != r.model_name:
            return  # its first heartbeat or the next sweep brings the full picture
        inst.pending, inst.active, inst.capacity, inst.level = (r.pending_messages, r.active_processing,
                                                                r.queue_capacity, r.status)
        inst.data_at = inst.seen_at = now
        inst.last_seen = time.time()
        self._set_status(inst, self._liveness(inst, now))
        self._dirty.add(r.model_name)

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Status changes, purges, history samples and the pushes of changed models; called every tick."""
        now = time.monotonic() if now is None else now
        if self.nats_connected != self._nats_shown:
            self._nats_shown = self.nats_connected
            self._emit("nats", {"connected": self.nats_connected, "at": time.time()})
        for wid, inst in list(self.instances.items()):
            self._set_status(inst, self._liveness(inst, now))
            if inst.status == "offline" and now - inst.seen_at > self.settings.purge_after:
                self._remove(wid)
                self.counters["purged"] += 1
        if now - self._last_sample >= self.settings.monitor_history_interval:
            self._last_sample = now
            wall = time.time()
            for m in self.models.values():
                agg = self._aggregate(m)
                m.history.append((wall, agg["pending"], agg["rps"] or 0.0))
                self._dirty.add(m.name)
        for name in self._dirty if self.listeners else ():  # entries are built only for someone to read
            if name in self.models:
                self._emit("service", self.service(name) or {})
        self._dirty.clear()

    # --- views ----------------------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        return [self._entry(m) for m in sorted(self.models.values(), key=lambda m: m.name)]

    def service(self, name: str) -> dict[str, Any] | None:
        """One model by its name as written or by its subject token (`nomic-embed-v1_5`)."""
        m = self.models.get(name) or next((m for m in self.models.values() if p.token(m.name) == name), None)
        return self._entry(m) if m else None

    def snapshot(self) -> dict[str, Any]:
        return {"at": time.time(), "nats_connected": self.nats_connected, "services": self.services()}

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and /healthz."""
        return {**self.counters, "instances": len(self.instances), "models": len(self.models),
                "sse_clients": len(self.listeners)}

    def listen(self) -> Listener:
        lst = Listener(self.settings.monitor_sse_queue)
        self.listeners.add(lst)
        return lst

    def unlisten(self, lst: Listener) -> None:
        self.listeners.discard(lst)

    # --- inside ---------------------------------------------------------------------------------

    def _liveness(self, inst: Instance, now: float) -> str:
        if inst.health.status == "stopping":
            return "offline"
        interval = inst.health.heartbeat_interval_s or self.settings.monitor_default_interval
        age = now - inst.seen_at
        if age > 2 * interval:
            return "offline"
        if age > interval * (1 + self.settings.monitor_stale_grace):
            return "stale"
        return inst.health.status

    def _set_status(self, inst: Instance, status: str) -> None:
        if status == inst.status:
            return
        old, inst.status = inst.status, status
        self._dirty.add(inst.health.model_name)
        self._emit("status", {"model_name": inst.health.model_name, "worker_id": inst.health.worker_id,
                              "from": old, "to": status, "at": time.time()})

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
            self._emit("removed", {"model_name": model, "at": time.time()})

    def _remove(self, wid: str) -> None:
        inst = self.instances.pop(wid)
        self._detach(wid, inst.health.model_name)
        self._dirty.add(inst.health.model_name)

    def _make_room(self) -> None:
        if len(self.instances) < self.settings.monitor_max_instances:
            return
        # the least recently heard instance goes, offline ones before live ones
        victim = min(self.instances.items(), key=lambda kv: (kv[1].status != "offline", kv[1].seen_at))[0]
        self._remove(victim)
        self.counters["evicted"] += 1

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for lst in list(self.listeners):
            try:
                lst.queue.put_nowait((event, data))
            except asyncio.QueueFull:
                lst.dropped = True
                self.listeners.discard(lst)

    def _aggregate(self, m: Model) -> dict[str, Any]:
        insts = [self.instances[w] for w in m.workers]
        live = [i for i in insts if i.status in LIVE] or insts
        freshest = max(live, key=lambda i: i.data_at)
        rates = [i.rps for i in insts if i.status in LIVE and i.rps is not None]
        return {"insts": insts, "live": [i for i in insts if i.status in LIVE], "freshest": freshest,
                "pending": freshest.pending, "rps": round(sum(rates), 3) if rates else None}

    def _entry(self, m: Model) -> dict[str, Any]:
        agg = self._aggregate(m)
        insts: list[Instance] = agg["insts"]
        live: list[Instance] = agg["live"]
        fresh: Instance = agg["freshest"]
        newest = max(insts, key=lambda i: i.seen_at).health  # descriptive fields from the latest body
        now = time.monotonic()
        capacity = fresh.capacity
        utilization = round(fresh.pending / capacity, 4) if capacity else 0.0
        level = fresh.level if fresh.level in ("healthy", "warning", "critical") else p.backpressure_level(
            utilization, self.settings.backpressure_warning, self.settings.backpressure_critical)
        processed = [i.health.queue_metrics.last_processed_at for i in insts]
        return {
            "model_name": m.name,
            "token": p.token(m.name),
            "kind": newest.kind,
            "status": min((i.status for i in insts), key=STATUS_ORDER.__getitem__),
            "capabilities": sorted({c for i in insts for c in i.health.capabilities}),
            "model_info": newest.model_info,
            "endpoint": next((i.health.endpoint for i in live if i.health.endpoint), newest.endpoint),
            "nats_topic": newest.nats_topic,
            "version": newest.version,
            "queue_metrics": {
                "pending_messages": fresh.pending,  # JetStream's depth for the model: the same for every replica
                "active_processing": sum(i.active for i in live),
                "queue_capacity": capacity,
                "total_processed": sum(i.health.queue_metrics.total_processed for i in insts),
                "total_failed": sum(i.health.queue_metrics.total_failed for i in insts),
                "last_processed_at": max((t for t in processed if t is not None), default=None),
            },
            "backpressure_status": {"level": level, "utilization": utilization},
            "requests_per_s": agg["rps"],
            "first_seen": m.first_seen,
            "last_seen": max(i.last_seen for i in insts),
            "uptime": round(max((self._uptime(i, now) for i in live), default=0.0), 1),
            "instance_count": len(insts),
            "online_count": len(live),
            "instances": [self._instance(i, now) for i in sorted(insts, key=lambda i: i.health.worker_id)],
            "history": {"t": [round(t, 1) for t, _, _ in m.history], "queue_depth": [d for _, d, _ in m.history],
                        "requests_per_s": [r for _, _, r in m.history]},
        }

    def _uptime(self, inst: Instance, now: float) -> float:
        return inst.health.uptime_s + (now - inst.seen_at if inst.status in LIVE else 0.0)

    def _instance(self, inst: Instance, now: float) -> dict[str, Any]:
        h = inst.health
        return {
            "worker_id": h.worker_id, "status": inst.status, "worker_status": h.status, "endpoint": h.endpoint,
            "version": h.version, "first_seen": inst.first_seen, "last_seen": inst.last_seen,
            "age_s": round(now - inst.seen_at, 2), "uptime": round(self._uptime(inst, now), 1),
            "started_at": h.started_at, "heartbeat_interval_s": h.heartbeat_interval_s, "seq": h.seq,
            "queue_metrics": {**h.queue_metrics.model_dump(), "pending_messages": inst.pending,
                              "active_processing": inst.active},
            "backpressure_status": {"level": inst.level,
                                    "utilization": round(inst.pending / inst.capacity, 4) if inst.capacity else 0.0},
            "requests_per_s": inst.rps,
        }
