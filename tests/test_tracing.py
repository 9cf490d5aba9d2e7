"""Tracing and JSON logs: a chat completion through `python -m gateway` to a real gemma3-270m worker, both sending
their spans over OTLP/HTTP to a receiver in this process, and both logging JSON lines.

The receiver is a plain HTTP server decoding `ExportTraceServiceRequest` protobuf bodies, as a collector would. The
spans must form one trace: the client's traceparent → the gateway's server span → the worker's `fleet.request` →
`queue.wait`, `engine.prefill`, `engine.decode`, with the times the worker's SQLite row holds.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from workers import tracing
from workers.ops import broker

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online
from .gateway_support import GatewayProc, request_row, spawn_worker, start_gateway, until

pytestmark = pytest.mark.model  # a real worker loads gemma3-270m

MODEL = "gemma3-270m"
TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SLACK_MS = 5.0  # rounding of the row's times and of the span times made from them


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body; the spans are kept in arrival order."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", broker.free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: _value(a.value) for a in s.attributes}
                    with self.lock:
                        self.spans.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                               s.parent_span_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano,
                                               attrs))

    def trace(self, trace_id: str, names: set[str], timeout: float = 30) -> dict[str, Span]:
        """The spans of `trace_id` by name, once every one of `names` has arrived."""
        ends = time.monotonic() + timeout
        while True:
            with self.lock:
                found = {s.name: s for s in self.spans if s.trace_id == trace_id}
            if names <= set(found):
                return found
            assert time.monotonic() < ends, f"spans of {trace_id}: got {sorted(found)}, want {sorted(names)}"
            time.sleep(0.1)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@dataclass
class Fleet:
    receiver: Receiver
    gateway: GatewayProc
    worker: WorkerProc

    def chat(self, headers: dict[str, str] | None = None) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0}
        r = httpx.post(f"{self.gateway.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)
        assert r.status_code == 200, r.text
        return r


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    receiver.thread.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
            "LOG_FORMAT": "json"}
    servers = serve_nats(tmp)
    server = next(servers)
    worker = spawn_worker(GEMMA_ENV, server.url, tmp / "data", tmp, MODEL_PATH=model_path,
                          PROMPT_TEMPLATE=GEMMA_TEMPLATE, **otel)
    gateway: GatewayProc | None = None
    try:
        asyncio.run(wait_online(server.url, worker))
        gateway = start_gateway(server.url, tmp, **otel)
        gw = gateway
        until(lambda: MODEL in _models(gw), "the gateway did not discover the worker")
        yield Fleet(receiver, gateway, worker)
    finally:
        if gateway is not None:
            gateway.stop()
        worker.kill()
        next(servers, None)
        receiver.server.shutdown()
        receiver.server.server_close()


def _models(gw: GatewayProc) -> set[str]:
    return {m["id"] for m in httpx.get(f"{gw.url}/v1/models", timeout=5).json()["data"]}



WORKER_SPANS = {"fleet.request", "queue.wait", "engine.prefill", "engine.decode"}
GATEWAY_SPAN = "POST /v1/chat/completions"


def test_a_chat_completion_is_one_trace_from_the_clients_traceparent_to_the_engine(fleet: Fleet) -> None:
    r = fleet.chat({"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
    req_id = r.headers["Fleet-Req-Id"]
    spans = fleet.receiver.trace(TRACE, WORKER_SPANS | {GATEWAY_SPAN})
    gw, req = spans[GATEWAY_SPAN], spans["fleet.request"]
    assert gw.service == "fleet-gateway" and req.service == f"fleet-worker-{MODEL}"
    assert gw.parent_id == CLIENT_SPAN
    assert gw.attributes | {"req_id": req_id, "status": 200, "model": MODEL, "model.requested": MODEL} == gw.attributes
    assert req.parent_id == gw.span_id
    assert {spans[n].parent_id for n in WORKER_SPANS - {"fleet.request"}} == {req.span_id}
    row = request_row(fleet.worker, req_id, "status = 'ok'")
    assert row["trace_id"] == TRACE
    assert req.attributes["req_id"] == req_id and req.attributes["status"] == "ok"
    assert req.attributes["tokens_out"] == row["tokens_out"] > 0 and req.attributes["tokens_in"] == row["tokens_in"]
    assert req.attributes["model"] == MODEL and req.attributes["worker_id"] == row["worker_id"]
    # the times are the row's: queue wait, then prefill to the first token, then decode to the end
    wait, prefill, decode = spans["queue.wait"], spans["engine.prefill"], spans["engine.decode"]
    assert abs(wait.ms - row["queue_ms"]) < SLACK_MS
    assert abs(prefill.ms - row["ttft_ms"]) < SLACK_MS
    assert abs(prefill.ms + decode.ms - row["dur_ms"]) < SLACK_MS
    assert wait.end_ns == prefill.start_ns and prefill.end_ns == decode.start_ns
    assert req.start_ns == wait.start_ns and req.end_ns == decode.end_ns
    # and the worker's part lies within the gateway's request (one clock: same machine)
    assert gw.start_ns <= req.start_ns and req.end_ns <= gw.end_ns + int(SLACK_MS * 1e6)


def test_a_request_without_traceparent_gets_a_trace_that_the_row_and_the_spans_share(fleet: Fleet) -> None:
    req_id = fleet.chat().headers["Fleet-Req-Id"]
    trace_id = request_row(fleet.worker, req_id, "status = 'ok'")["trace_id"]
    assert trace_id and len(trace_id) == 32 and trace_id != TRACE
    spans = fleet.receiver.trace(trace_id, WORKER_SPANS | {GATEWAY_SPAN})
    assert spans[GATEWAY_SPAN].parent_id == ""  # the gateway started it
    assert spans[GATEWAY_SPAN].attributes["req_id"] == spans["fleet.request"].attributes["req_id"] == req_id
    assert spans["fleet.request"].parent_id == spans[GATEWAY_SPAN].span_id


def _json_lines(log: Path, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith(skip)]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_carry_each_requests_id_trace_and_latency(fleet: Fleet) -> None:
    trace = "1" * 32
    req_id = fleet.chat({"traceparent": f"00-{trace}-{CLIENT_SPAN}-01"}).headers["Fleet-Req-Id"]
    request_row(fleet.worker, req_id)

    def line_of(log: Path, logger: str, skip: tuple[str, ...] = ()) -> dict[str, Any] | None:
        return next((e for e in _json_lines(log, skip) if e["logger"] == logger and e.get("req_id") == req_id), None)

    banner = ("gateway: OpenAI API on",)  # printed, not logged: the start-up line for a terminal
    until(lambda: line_of(fleet.gateway.log, "gateway.access", banner) is not None, "no gateway access line")
    access = line_of(fleet.gateway.log, "gateway.access", banner)
    assert access is not None
    assert access | {"method": "POST", "path": "/v1/chat/completions", "status": 200, "model": MODEL,
                     "trace_id": trace, "level": "INFO", "client": None} == access
    assert access["latency_ms"] > 0 and access["ts"].endswith("Z")
    native = ("llama_",)  # llama.cpp's own C output on stderr, not Python's logging
    until(lambda: line_of(fleet.worker.log, "workers.requests", native) is not None, "no worker request line")
    done = line_of(fleet.worker.log, "workers.requests", native)
    assert done is not None
    assert done | {"trace_id": trace, "model": MODEL, "status": "ok", "level": "INFO"} == done
    assert done["latency_ms"] > 0 and done["tokens_out"] > 0
    assert any(e["message"].startswith(f"{MODEL}: ready on") for e in _json_lines(fleet.worker.log, native))


def test_tracing_is_off_without_an_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert tracing.setup("fleet-test") is False
    assert not tracing.enabled() and tracing.tracer() is None
    tracing.shutdown()
