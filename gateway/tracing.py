"""The gateway's part of a request's trace: one server span per OpenAI-route request, and its access log line.

The span continues the HTTP client's W3C `traceparent` (or starts a trace) and is the parent of everything the
request causes in the fleet: its own traceparent replaces the client's in the NATS headers (`forward`), so each
worker's `fleet.request` span is its child, and the trace id lands in the worker's request row. With tracing off
(no OTEL_EXPORTER_OTLP_ENDPOINT) no span is made, but a request that came without a traceparent still gets a new
one, so every gateway request has a trace id in the worker's row. A streamed answer's span ends when its headers
go out, not when its last event does.

The access line (logger `gateway.access`, written with LOG_FORMAT=json) has method, path, status, model, client,
latency_ms, req_id and trace_id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from workers import protocol as p
from workers import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["HttpSpan"]

access = logging.getLogger("gateway.access")


class HttpSpan:
    """One HTTP request's trace: started when the request comes in, ended with its status by `end`."""

    def __init__(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        self.method, self.path = method, path
        self.req_id: str | None = None
        self.requested: str | None = None  # the body's `model` (a name, a role, `auto`)
        self.trace_id: str | None = None  # the one the worker's row gets (Fleet-Trace-Id wins over traceparent)
        self.span: Span | None = None
        given = headers.get(p.H_TRACEPARENT)
        if (tracer := tracing.tracer()) is not None:
            from opentelemetry.trace import SpanKind

            self.span = tracer.start_span(f"{method} {path}", context=tracing.extract(given), kind=SpanKind.SERVER,
                                          attributes={"http.request.method": method, "url.path": path})
            self.traceparent = tracing.traceparent_of(self.span)
        else:
            self.traceparent = given if given and p.TRACEPARENT.fullmatch(given) else tracing.new_traceparent()

    def forward(self, client_headers: dict[str, str], req_id: str, requested: Any) -> dict[str, str]:
        """The trace headers of this request's fleet requests: the client's, with this span as their parent."""
        headers = {**client_headers, p.H_TRACEPARENT: self.traceparent}
        self.req_id, self.trace_id = req_id, p.trace_id(headers)
        self.requested = None if requested is None else str(requested)
        return headers

    def end(self, request: Request, status: int, seconds: float) -> None:
        """Close the span with what became of the request, and write its access line."""
        model: str | None = request.state.model
        trace_id = self.trace_id or self.traceparent[3:35]
        if self.span is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_attributes({k: v for k, v in {
                "http.response.status_code": status, "status": status, "req_id": self.req_id,
                "model.requested": self.requested, "model": model}.items() if v is not None})
            if status >= 500:
                self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            self.span.end()
        if access.isEnabledFor(logging.INFO):
            latency = round(seconds * 1000, 3)
            access.info("%s %s %d %s %.0f ms", self.method, self.path, status, model or "-", latency, extra={
                "method": self.method, "path": self.path, "status": status, "model": model,
                "requested": self.requested, "client": request.state.client,
                "remote": request.client.host if request.client else None, "latency_ms": latency,
                "req_id": self.req_id, "trace_id": trace_id})
