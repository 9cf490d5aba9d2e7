"""The registry's bookkeeping on its own clock: bounds, purge, status thresholds, rates."""

from __future__ import annotations

import json
from typing import Any

from monitor.config import load_settings
from monitor.registry import Registry, decode_health
from monitor.shapes import Pressure, ServiceEntry, ServiceRemoved, StatusChange
from workers import protocol as p


def health(worker_id: str, model: str = "m", *, interval: float = 1.0, processed: int = 0, status: str = "online",
           pending: int = 0, slots: dict[str, int] | None = None) -> p.Health:
    body: dict[str, Any] = {
        "model_name": model, "worker_id": worker_id, "kind": "inference", "status": status,
        "capabilities": ["text-generation"], "nats_topic": f"inference.request.{model}", "version": "0",
        "model_info": {"architecture": "gemma3"},
        "queue_metrics": {"pending_messages": pending, "active_processing": 0, "queue_capacity": 10,
                          "total_processed": processed, "total_failed": 0},
        "backpressure_status": {"level": p.backpressure_level(pending / 10), "utilization": pending / 10},
        "started_at": 0.0, "uptime_s": 1.0, "heartbeat_interval_s": interval, "seq": 1,
    }
    if slots is not None:
        body["queue_metrics"]["slots"] = slots
    return decode_health(json.dumps(body).encode())  # as workers send it: no endpoint, no last_processed_at


def entry(reg: Registry, name: str) -> ServiceEntry:
    got = reg.service(name)
    assert got is not None, f"{name} is not in the registry"
    return got


def test_memory_stays_bounded_whatever_the_fleet_does():
    reg = Registry(load_settings(monitor_max_instances=50, monitor_history_len=10, monitor_history_interval=0.1))
    for i in range(500):
        reg.observe_health(health(f"w{i}", f"model-{i % 70}"), now=i * 0.01)
        reg.tick(now=i * 0.01 + 0.1)
    assert len(reg.instances) == 50 and len(reg.models) <= 50
    assert reg.counters["evicted"] == 450
    assert all(len(m.history) <= 10 for m in reg.models.values())
    assert sum(len(m.workers) for m in reg.models.values()) == 50


def test_stale_after_one_interval_offline_after_two_then_purged():
    reg = Registry(load_settings(purge_after=40))
    lst = reg.listen()
    reg.observe_health(health("w1", interval=10), now=0)
    for t, want in ((11.0, "online"), (12.5, "stale"), (19.9, "stale"), (20.1, "offline"), (39.9, "offline")):
        reg.tick(now=t)
        assert reg.instances["w1"].status == want, t
    reg.tick(now=40.1)
    assert not reg.instances and not reg.models
    events = []
    while not lst.queue.empty():
        events.append(lst.queue.get_nowait())
    changes = [(e.from_, e.to) for e in events if isinstance(e, StatusChange)]
    assert changes == [("new", "online"), ("online", "stale"), ("stale", "offline")]
    assert isinstance(events[-1], ServiceRemoved) and events[-1].model_name == "m"


def test_stopping_is_offline_at_once_and_a_new_heartbeat_revives():
    reg = Registry(load_settings())
    reg.observe_health(health("w1", interval=10), now=0)
    reg.observe_health(health("w1", interval=10, status="stopping"), now=1)
    assert reg.instances["w1"].status == "offline"
    reg.observe_health(health("w1", interval=10, status="starting"), now=2)
    assert entry(reg, "m").status == "starting"


def test_requests_per_second_come_from_processed_deltas():
    reg = Registry(load_settings())
    reg.observe_health(health("a", processed=0), now=0)
    reg.observe_health(health("a", processed=20), now=2)
    reg.observe_health(health("b", processed=5), now=2)
    reg.observe_health(health("b", processed=11), now=4)
    m = entry(reg, "m")
    assert m.requests_per_s == 13.0 and m.queue_metrics.total_processed == 31


def test_dotted_names_group_as_written_and_answer_to_their_token():
    reg = Registry(load_settings())
    reg.observe_health(health("a", "nomic-embed-v1.5"), now=0)
    reg.observe_health(health("b", "nomic-embed-v1.5"), now=0)
    assert [s.model_name for s in reg.services()] == ["nomic-embed-v1.5"]
    assert entry(reg, "nomic-embed-v1_5").instance_count == 2


def test_reports_move_the_queue_between_heartbeats():
    reg = Registry(load_settings())
    reg.observe_health(health("a", pending=0), now=0)
    reg.observe_report(p.BackpressureReport(model_name="m", worker_id="a", pending_messages=9, active_processing=1,
                                            queue_capacity=10, utilization=0.9, status="critical", worker_count=1,
                                            timestamp=0.0), now=0.5)
    m = entry(reg, "m")
    assert m.queue_metrics.pending_messages == 9
    assert m.backpressure_status == Pressure(level="critical", utilization=0.9)


BATCHED = {"slots": 4, "busy": 1, "waiting": 0, "kv_tokens": 4096, "kv_reserved": 1000, "kv_kept": 500}


def test_slots_and_kv_show_per_instance_and_sum_over_the_live_ones():
    reg = Registry(load_settings())
    reg.observe_health(health("a", slots=BATCHED), now=0)
    reg.observe_health(health("b", slots={"slots": 2, "busy": 2, "waiting": 1}), now=0)  # per-context engine
    reg.observe_health(health("c", interval=1, slots=BATCHED), now=-10)  # offline by now: not counted
    reg.tick(now=0)
    dump = entry(reg, "m").model_dump(mode="json")
    insts = {i["worker_id"]: i for i in dump["instances"]}
    assert insts["a"]["slots"] == {**BATCHED, "kv_used": 0.3662}
    assert insts["b"]["slots"] == {"slots": 2, "busy": 2, "waiting": 1, "kv_tokens": None, "kv_reserved": None,
                                   "kv_kept": None, "kv_used": None}
    assert dump["slots"] == {"slots": 6, "busy": 3, "waiting": 1, "kv_tokens": 4096, "kv_reserved": 1000,
                             "kv_kept": 500, "kv_used": 0.3662}


def test_a_worker_without_slots_shows_null_and_leaves_kv_null():
    reg = Registry(load_settings())
    reg.observe_health(health("old"), now=0)  # a worker older than the field
    dump = entry(reg, "m").model_dump(mode="json")
    assert dump["slots"] is None and dump["instances"][0]["slots"] is None
    reg.observe_health(health("new", slots={"slots": 2, "busy": 0}), now=0)
    assert entry(reg, "m").model_dump(mode="json")["slots"] == {
        "slots": 2, "busy": 0, "waiting": 0, "kv_tokens": None, "kv_reserved": None, "kv_kept": None,
        "kv_used": None}


def test_reports_move_the_slots_and_an_older_body_does_not_undo_them():
    reg = Registry(load_settings())
    reg.observe_health(health("a", slots=BATCHED), now=0)
    busy = p.SlotUsage(slots=4, busy=4, waiting=2, kv_tokens=4096, kv_reserved=4000, kv_kept=0)
    reg.observe_report(p.BackpressureReport(model_name="m", worker_id="a", pending_messages=2, active_processing=4,
                                            queue_capacity=10, utilization=0.2, status="healthy", worker_count=1,
                                            timestamp=0.0, slots=busy), now=1)
    reg.observe_health(health("a", slots=BATCHED), now=0.5)  # held up on the way: older than the report
    got = entry(reg, "m").instances[0].slots
    assert got is not None and (got.busy, got.waiting, got.kv_reserved, got.kv_used) == (4, 2, 4000, 0.9766)
