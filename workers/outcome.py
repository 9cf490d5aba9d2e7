"""A finished request, whoever brought it: one type, one constructor per way a request can end, one `record()`.

The SQLite row, the Prometheus metrics and the instance's totals are all written from a `Finished` by
`Ledger.record`, so no caller assembles a log row by hand and a new metric reads a field here rather
than a column of the log. The same `record()` feeds the heartbeat's sliding window (workers/window.py) and
hands a `RequestEvent` to whoever publishes them (telemetry: the monitor's Requests view).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from . import protocol as p
from . import tracing
from .store import REQUEST_COLUMNS

Status = Literal["ok", "cancelled", "rejected", "expired", "failed", "handed_back", "dead_letter"]
Source = Literal["nats", "http"]

# Statuses that are not a failure of the request; a hand-back is a drain, not a verdict.
_NOT_FAILED = ("ok", "handed_back")
_ERROR = re.compile(r"^\d{3} ([A-Za-z0-9_.-]+): ")  # "<status> <type>: <message>", as `refused` writes it
PROMPT_CHARS = 2000  # of input and output in a RequestEvent (LOG_PROMPTS)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intake:
    """What is known of a request before it runs."""

    req_id: str
    worker_id: str
    source: Source = "nats"
    raw_input: str | None = None
    trace_id: str | None = None
    traceparent: str | None = None  # the caller's W3C trace context: the parent of this request's spans
    deliveries: int = 1  # JetStream delivery count (0: never queued)
    queue_ms: float = 0.0  # enqueue -> taken by a worker


@dataclass(frozen=True)
class RunFacts:
    """What running it on the engine produced (filled by the Runner)."""

    formatted_input: str | None = None
    params_json: str | None = None
    grammar: str | None = None
    response_text: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_ms: float | None = None
    dur_ms: float = 0.0
    finish_reason: p.FinishReason = "stop"
    cached_tokens: int | None = None  # prompt tokens taken from the KV cache instead of computed (batched engine)
    batch_id: int | None = None  # embeddings: the decode call that served it (requests embedded together share it)


@dataclass(frozen=True)
class Finished:
    """A request that has ended, and how."""

    intake: Intake
    status: Status
    run: RunFacts = field(default_factory=RunFacts)
    finish_reason: p.FinishReason | None = None
    error: str | None = None
    dur_ms: float | None = None
    ts: float = field(default_factory=time.time)

    # --- one constructor per terminal state ------------------------------------------------

    @classmethod
    def ok(cls, intake: Intake, run: RunFacts) -> Finished:
        """Answered; a generation stopped by its caller's cancel is `cancelled`, with what it had produced."""
        status: Status = "cancelled" if run.finish_reason == "cancelled" else "ok"
        return cls(intake, status, run, run.finish_reason, dur_ms=run.dur_ms)

    @classmethod
    def refused(cls, intake: Intake, err: p.BadRequest, dur_ms: float = 0.0) -> Finished:
        """Answered with an error before or while running: expired, cancelled while queued, or rejected input."""
        status: Status = "expired" if err.type == "expired" else "cancelled" if err.type == "cancelled" else "rejected"
        finish: p.FinishReason = "cancelled" if status == "cancelled" else "error"
        return cls(intake, status, finish_reason=finish, error=f"{err.status} {err.type}: {err.message}",
                   dur_ms=dur_ms)

    @classmethod
    def failed(cls, intake: Intake, exc: BaseException, dur_ms: float) -> Finished:
        """An unexpected failure; the message goes back to JetStream for another try."""
        return cls(intake, "failed", finish_reason="error", error=repr(exc), dur_ms=dur_ms)

    @classmethod
    def handed_back(cls, intake: Intake) -> Finished:
        """Not finished here: the drain ran out of time and the message was returned to the queue."""
        return cls(intake, "handed_back", error="drain timeout: returned to the queue")

    @classmethod
    def dead_letter(cls, intake: Intake, message: str) -> Finished:
        """JetStream gave up after max_deliver attempts; the caller was told and the message removed."""
        return cls(intake, "dead_letter", finish_reason="error", error=f"500 dead_letter: {message}")

    # --- views -------------------------------------------------------------------------------

    @property
    def counts_as_failure(self) -> bool:
        return self.status not in _NOT_FAILED

    def columns(self) -> dict[str, Any]:
        """The `requests` row of the SQLite log: the fields the log has a column for (a field added for a
        metric stays out of the log until someone gives it a column)."""
        values = {**asdict(self.intake), **asdict(self.run), "ts": self.ts, "status": self.status,
                  "finish_reason": self.finish_reason, "error": self.error, "dur_ms": self.dur_ms}
        return {k: values[k] for k in REQUEST_COLUMNS if k in values}

    @property
    def error_code(self) -> str | None:
        """The error body's type (`context_overflow`, `expired`, …) when it ended in one."""
        m = _ERROR.match(self.error or "")
        return m[1] if m else None

    def event(self, origin: Origin) -> p.RequestEvent:
        """What the monitor's Requests view shows of it; prompt and answer only if `origin.log_prompts`."""
        i, run = self.intake, self.run
        text = origin.log_prompts
        return p.RequestEvent(
            ts=self.ts, model_name=origin.model_name, worker_id=i.worker_id, kind=origin.kind, req_id=i.req_id,
            source=i.source, status=self.status, finish_reason=self.finish_reason, error_code=self.error_code,
            error=self.error, latency_ms=_ms(self.dur_ms), queue_ms=round(i.queue_ms, 3), ttft_ms=_ms(run.ttft_ms),
            tokens_in=run.tokens_in, tokens_out=run.tokens_out, cached_tokens=run.cached_tokens,
            trace_id=i.trace_id, instance=origin.instance,
            input=_clip(i.raw_input or run.formatted_input) if text else None,
            output=_clip(run.response_text) if text else None,
        )


@dataclass(frozen=True)
class Origin:
    """Who finished the requests, as their RequestEvents say."""

    model_name: str
    kind: p.Kind = "inference"
    instance: str | None = None  # as in Health
    log_prompts: bool = False  # LOG_PROMPTS: put prompt and answer (first PROMPT_CHARS) in the events


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:PROMPT_CHARS]


class RequestLog(Protocol):
    def request(self, **row: Any) -> None: ...


class RequestMetrics(Protocol):
    def observe(self, finished: Finished) -> None: ...


class RequestWindow(Protocol):
    """The heartbeat's sliding window (workers/window.py)."""

    def record(self, finished: Finished) -> None: ...

    def stats(self, now: float | None = None) -> p.WindowStats: ...


EventSink = Callable[[p.RequestEvent], None]


class Ledger:
    """Where every finished request goes: the log row, the metrics, the sliding window, this instance's totals,
    and (once `events` is set, with an `origin` to name the worker) a RequestEvent to publish."""

    def __init__(self, log: RequestLog, metrics: RequestMetrics, window: RequestWindow | None = None,
                 origin: Origin | None = None, events: EventSink | None = None) -> None:
        self.log, self.metrics, self.window, self.origin, self.events = log, metrics, window, origin, events
        self.total_processed = 0
        self.total_failed = 0
        self.last_processed_at: float | None = None

    def record(self, finished: Finished) -> None:
        self.log.request(**finished.columns())
        self.metrics.observe(finished)
        if self.window is not None:
            self.window.record(finished)
        if self.events is not None and self.origin is not None:
            try:
                self.events(finished.event(self.origin))
            except Exception:  # an event is news, not the request's outcome: never let it break the request
                log.exception("could not hand over the request event of %s", finished.intake.req_id)
        tracing.record(finished, self.origin)  # its log line, and its spans when OTEL_EXPORTER_OTLP_ENDPOINT is set
        if finished.status == "ok":
            self.total_processed += 1
            self.last_processed_at = finished.ts
        elif finished.counts_as_failure:
            self.total_failed += 1
