"""`GET /metrics`: fleet gauges in the Prometheus text format, computed from the registry at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers import protocol as p

from .registry import STATUS_ORDER, Registry

LEVELS: tuple[p.Level, ...] = ("healthy", "warning", "critical")


class FleetCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        services = self.registry.services()
        instances = GaugeMetricFamily("fleet_instances", "Worker instances by model and status",
                                      labels=["model", "status"])
        pending = GaugeMetricFamily("fleet_queue_pending", "Requests queued or in hand for the model (JetStream)",
                                    labels=["model"])
        capacity = GaugeMetricFamily("fleet_queue_capacity", "Queue capacity of the model", labels=["model"])
        utilization = GaugeMetricFamily("fleet_queue_utilization", "pending / capacity", labels=["model"])
        level = GaugeMetricFamily("fleet_backpressure_level", "1 for the model's current level", labels=["model",
                                                                                                         "level"])
        active = GaugeMetricFamily("fleet_requests_running", "Requests running across instances", labels=["model"])
        rate = GaugeMetricFamily("fleet_requests_per_second", "Finished requests per second", labels=["model"])
        processed = GaugeMetricFamily("fleet_requests_processed", "Requests finished by the listed instances",
                                      labels=["model"])
        failed = GaugeMetricFamily("fleet_requests_failed", "Requests failed by the listed instances",
                                   labels=["model"])
        wait = GaugeMetricFamily("fleet_expected_wait_seconds", "What a request queued now would wait (the largest "
                                 "over the live instances)", labels=["model"])
        window = {name: GaugeMetricFamily(f"fleet_window_{name}", help_, labels=["model"]) for name, help_ in (
            ("latency_p50_ms", "Median latency over the workers' stats window (median of the instances')"),
            ("latency_p95_ms", "95th percentile latency over the stats window (the largest instance's)"),
            ("tokens_per_second", "Tokens generated per second over the stats window"),
            ("error_rate", "Errors / requests over the stats window"))}
        for s in services:
            name, qm, bp = s.model_name, s.queue_metrics, s.backpressure_status
            counts = dict.fromkeys(STATUS_ORDER, 0)
            for i in s.instances:
                counts[i.status] += 1
            for status, n in counts.items():
                instances.add_metric([name, status], n)
            pending.add_metric([name], qm.pending_messages)
            capacity.add_metric([name], qm.queue_capacity)
            utilization.add_metric([name], bp.utilization)
            for lv in LEVELS:
                level.add_metric([name, lv], 1 if bp.level == lv else 0)
            active.add_metric([name], qm.active_processing)
            if s.requests_per_s is not None:
                rate.add_metric([name], s.requests_per_s)
            processed.add_metric([name], qm.total_processed)
            failed.add_metric([name], qm.total_failed)
            if bp.expected_wait_s is not None:
                wait.add_metric([name], bp.expected_wait_s)
            if (st := s.stats) is not None:
                for key, value in (("latency_p50_ms", st.latency_p50_ms), ("latency_p95_ms", st.latency_p95_ms),
                                   ("tokens_per_second", st.tokens_per_s), ("error_rate", st.error_rate)):
                    if value is not None:
                        window[key].add_metric([name], value)
        yield from (instances, pending, capacity, utilization, level, active, rate, processed, failed, wait,
                    *window.values())

        stats = self.registry.stats()
        yield GaugeMetricFamily("fleet_models", "Models known to the monitor", value=stats.models)
        yield GaugeMetricFamily("monitor_sse_clients", "Open server-sent-event streams", value=stats.sse_clients)
        yield GaugeMetricFamily("monitor_nats_connected", "1 while the monitor is connected to NATS",
                                value=1 if self.registry.nats_connected else 0)
        messages = CounterMetricFamily("monitor_messages", "Messages the monitor took in", labels=["kind"])
        for kind, n in (("heartbeats", stats.heartbeats), ("reports", stats.reports),
                        ("request_events", stats.request_events),
                        ("health_replies", stats.health_replies), ("invalid", stats.invalid),
                        ("oversized", stats.oversized), ("foreign", stats.foreign)):
            messages.add_metric([kind], n)
        yield messages
        yield CounterMetricFamily("monitor_instances_evicted", "Instances dropped to stay within "
                                  "MONITOR_MAX_INSTANCES", value=stats.evicted)
        yield CounterMetricFamily("monitor_instances_purged", "Offline instances purged after PURGE_AFTER",
                                  value=stats.purged)


def render_metrics(registry: Registry) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(registry))
    return generate_latest(reg)
