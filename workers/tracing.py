"""OpenTelemetry spans of the fleet, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

A process calls `setup(service)` once at start and `shutdown()` on its way out (it flushes what the batch processor
still holds). Without the endpoint nothing is imported or built: `enabled()` is false and every call here returns
at once. The OTLP/HTTP exporter reads the standard OTEL_* variables itself (endpoint, headers, OTEL_BSP_* batching);
OTEL_SERVICE_NAME, when set, names the service instead of the one given here.

A worker's spans are made after the fact from its `Finished` record (`record`), with the start and end times of
what was measured (queue wait, time to first token, run time), so the engine loop carries no tracing code:
`fleet.request` (child of the caller's `traceparent`, which the gateway sets to its own server span) with
`queue.wait`, then `engine.prefill` and `engine.decode` (or `engine.embed`). The same call writes the request's
log line (logger `workers.requests`: one per finished request, fields for LOG_FORMAT=json).
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol as p

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = ["enabled", "extract", "new_traceparent", "record", "setup", "shutdown", "tracer", "traceparent_of"]

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
REQUESTS = "workers.requests"  # the per-request log line; quiet in the text format (logsetup.py)
log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUESTS)



# What `record` reads of a finished request (outcome.Finished, Intake, RunFacts, Origin), as narrow interfaces.
class Intake(Protocol):
    @property
    def req_id(self) -> str: ...
    @property
    def worker_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def trace_id(self) -> str | None: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def deliveries(self) -> int: ...
    @property
    def queue_ms(self) -> float: ...


class Run(Protocol):
    @property
    def tokens_in(self) -> int: ...
    @property
    def tokens_out(self) -> int: ...
    @property
    def ttft_ms(self) -> float | None: ...


class Finished(Protocol):
    @property
    def intake(self) -> Intake: ...
    @property
    def run(self) -> Run: ...
    @property
    def status(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def dur_ms(self) -> float | None: ...
    @property
    def ts(self) -> float: ...
    @property
    def counts_as_failure(self) -> bool: ...


class Origin(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def kind(self) -> str: ...


_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def setup(service: str) -> bool:
    """Tracing for this process when OTEL_EXPORTER_OTLP_ENDPOINT is set: spans batched and sent over OTLP/HTTP,
    as `service` (unless OTEL_SERVICE_NAME says otherwise). False (and nothing set up) without the endpoint."""
    global _provider, _tracer
    if not os.environ.get(ENDPOINT) or _provider is not None:
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, _tracer = provider, provider.get_tracer("nats-llm-fleet", p.VERSION)
    log.debug("tracing: spans of %s go to %s", service, os.environ[ENDPOINT])
    return True


def shutdown() -> None:
    """Send the spans still batched and stop; a no-op when tracing is off."""
    global _provider, _tracer
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as e:  # the collector is gone: the process still exits cleanly
            log.warning("tracing: could not flush the last spans (%s)", e)
    _provider, _tracer = None, None


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer | None:
    return _tracer


def new_traceparent() -> str:
    """A W3C traceparent starting a new trace (sampled), for a request that came without one."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def traceparent_of(span: Span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def extract(traceparent: str | None) -> Any:
    """The OpenTelemetry context whose parent is `traceparent` (None: a new trace; a malformed one is ignored)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({p.H_TRACEPARENT: traceparent})


def record(finished: Finished, origin: Origin | None) -> None:
    """What a finished request leaves outside the worker: its log line and, with tracing on, its spans."""
    i, run = finished.intake, finished.run
    model = origin.model_name if origin else None
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("%s %s %s %.0f ms", i.req_id, finished.status, model or "", finished.dur_ms or 0.0,
                         extra={"req_id": i.req_id, "trace_id": i.trace_id, "model": model, "worker_id": i.worker_id,
                                "status": finished.status, "latency_ms": _ms(finished.dur_ms),
                                "queue_ms": _ms(i.queue_ms), "ttft_ms": _ms(run.ttft_ms), "tokens_in": run.tokens_in,
                                "tokens_out": run.tokens_out, "error": finished.error})
    if _tracer is not None:
        try:
            _spans(_tracer, finished, origin)
        except Exception:  # spans are news, not the request's outcome
            log.exception("tracing: could not make the spans of %s", i.req_id)


def _spans(tracer: Tracer, finished: Finished, origin: Origin | None) -> None:
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

    i, run = finished.intake, finished.run
    end = int(finished.ts * 1e9)
    ran = end - _ns(finished.dur_ms)  # the run started when the queue wait ended
    enqueued = ran - _ns(i.queue_ms)
    attributes: dict[str, str | int] = {
        "req_id": i.req_id, "model": origin.model_name if origin else "", "worker_id": i.worker_id,
        "status": finished.status, "tokens_in": run.tokens_in, "tokens_out": run.tokens_out, "source": i.source,
        "deliveries": i.deliveries}
    if i.trace_id:
        attributes["fleet.trace_id"] = i.trace_id
    root = tracer.start_span("fleet.request", context=extract(i.traceparent), kind=SpanKind.CONSUMER,
                             start_time=enqueued, attributes=attributes)
    inside = set_span_in_context(root)

    def child(name: str, start: int, stop: int) -> None:
        tracer.start_span(name, context=inside, start_time=start).end(end_time=max(start, stop))

    if i.deliveries:  # 0: refused at the ingress, never queued
        child("queue.wait", enqueued, ran)
    if finished.status in ("ok", "cancelled") and finished.dur_ms:
        if run.ttft_ms is None and origin is not None and origin.kind == "embedding":
            child("engine.embed", ran, end)
        else:
            first = min(end, ran + _ns(run.ttft_ms if run.ttft_ms is not None else finished.dur_ms))
            child("engine.prefill", ran, first)
            child("engine.decode", first, end)
    if finished.counts_as_failure and finished.status != "cancelled":
        root.set_status(Status(StatusCode.ERROR, finished.error or finished.status))
    root.end(end_time=end)


def _ns(ms: float | None) -> int:
    return int((ms or 0.0) * 1e6)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
