"""A finished request, whoever brought it: one type, one constructor per way a request can end, one `record()`.

The SQLite row, the Prometheus metrics and the instance's totals are all written from a `Finished` by
`Ledger.record`, so no caller assembles a log row by hand and a new metric reads a field here rather
than a column of the log.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from . import protocol as p
from .store import REQUEST_COLUMNS

Status = Literal["ok", "cancelled", "rejected", "expired", "failed", "handed_back", "dead_letter"]
Source = Literal["nats", "http"]

# Statuses that are not a failure of the request; a hand-back is a drain, not a verdict.
_NOT_FAILED = ("ok", "handed_back")


@dataclass(frozen=True)
class Intake:
    """What is known of a request before it runs."""

    req_id: str
    worker_id: str
    source: Source = "nats"
    raw_input: str | None = None
    trace_id: str | None = None
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


class RequestLog(Protocol):
    def request(self, **row: Any) -> None: ...


class RequestMetrics(Protocol):
    def observe(self, finished: Finished) -> None: ...


class Ledger:
    """Where every finished request goes: the log row, the metrics, and this instance's totals."""

    def __init__(self, log: RequestLog, metrics: RequestMetrics) -> None:
        self.log, self.metrics = log, metrics
        self.total_processed = 0
        self.total_failed = 0
        self.last_processed_at: float | None = None

    def record(self, finished: Finished) -> None:
        self.log.request(**finished.columns())
        self.metrics.observe(finished)
        if finished.status == "ok":
            self.total_processed += 1
            self.last_processed_at = finished.ts
        elif finished.counts_as_failure:
            self.total_failed += 1
