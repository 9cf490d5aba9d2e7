"""The worker's HTTP app: operations (`/metrics`, `/healthz`, `/readyz`, `/logs`, `/grammars`, cancel)
plus the OpenAI-compatible routes from `openai_api`, behind the access rules of `access`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import protocol as p
from .access import OPEN_PATHS, BearerAuth, exposure
from .httpkit import error, error_fields, internal_error, read_body, refusal, refusing
from .openai_api import routes as openai_routes
from .store import read_recent
from .surface import Serving

PROMPT_COLUMNS = ("raw_input", "formatted_input", "response_text")
GRAMMAR_PARAMS = {"invalid_grammar": "gbnf", "invalid_name": "name"}  # refusals of a grammar body: the field
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's default); past it a 431
Handler = Callable[[Request], Awaitable[Response]]
log = logging.getLogger(__name__)


def build_app(worker: Serving) -> Starlette:
    """The app for HTTP_ADDR. Built once at start-up, it says then (log line and event) what guards it."""
    s = worker.settings
    keyed = bool(s.api_key.get_secret_value())
    closed = exposure(*(s.http_host_port or ("127.0.0.1", 0)), keyed=keyed)

    def mutating(fn: Handler) -> Handler:
        """Grammar writes, cancels and /logs: closed on a listener beyond loopback without a key."""
        async def guard(request: Request) -> Response:
            return error(403, "forbidden", closed) if closed else await fn(request)
        return guard

    async def metrics(_: Request) -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": worker.status, "worker_id": s.worker_id})

    async def readyz(_: Request) -> Response:
        return JSONResponse({"status": worker.status}, status_code=200 if worker.status == "online" else 503)

    async def logs(request: Request) -> Response:
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 1000))
        except ValueError:
            return error(400, "invalid_request", "limit must be a whole number")
        if not s.log_path.exists():
            return JSONResponse({"requests": []})
        rows = read_recent(s.log_path, "requests", limit)
        if not s.log_prompts_http:  # prompts and answers may be private: only when the operator says so
            for row in rows:
                for col in PROMPT_COLUMNS:
                    row.pop(col, None)
        return JSONResponse({"requests": rows, "prompts_included": s.log_prompts_http})

    def no_grammars() -> Response:
        return error(404, "not_found", f"{s.model_name} does not take grammars")

    async def list_grammars(_: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        return JSONResponse({"grammars": [{"name": n, "source": src} for n, src in grammars.names().items()]})

    def grammar_route(fn: Handler) -> Handler:
        return refusing(fn, GRAMMAR_PARAMS)

    async def gbnf_of(request: Request) -> tuple[str | None, str]:
        """A grammar body, `{"name": …, "gbnf": …}` or the GBNF text itself, read within MAX_REQUEST_BYTES (the
        store refuses one past GRAMMAR_MAX_BYTES or GRAMMAR_MAX_DEPTH before llama.cpp sees it)."""
        raw = await read_body(request, s.max_request_bytes)
        name = None
        if raw.lstrip().startswith(b"{"):
            body = GrammarBody.model_validate(p.loads(raw))
            name, text = body.name, body.gbnf or body.grammar or ""
        else:
            try:
                text = raw.decode()
            except UnicodeDecodeError as e:
                raise p.BadRequest("invalid_input", f"body is not UTF-8 (byte {e.start}); send UTF-8 text") from None
        return name, text

    @grammar_route
    async def create_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name, text = await gbnf_of(request)
        if not name:
            return error(400, "invalid_request", 'send {"name": "...", "gbnf": "root ::= ..."}', "name")
        grammars.writable(name)
        if grammars.get(name) is not None:
            return error(409, "exists", f"grammar {name} exists; PUT /grammars/{name} replaces it", "name")
        await grammars.put(name, text)
        return JSONResponse({"name": name, "gbnf": text}, status_code=201)

    async def read_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name = request.path_params["name"]
        text = grammars.get(name)
        if text is None:
            return error(404, "not_found", f"no grammar named {name}")
        return JSONResponse({"name": name, "gbnf": text})

    @grammar_route
    async def write_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name = request.path_params["name"]
        if request.method == "PUT":
            _, text = await gbnf_of(request)
            replaced = await grammars.put(name, text)
            return JSONResponse({"name": name, "gbnf": text}, status_code=200 if replaced else 201)
        if grammars.delete(name):
            return Response(status_code=204)
        return error(404, "not_found", f"no stored grammar named {name}")

    async def cancel(request: Request) -> Response:
        req_id = request.path_params["req_id"]
        if not p.REQ_ID.match(req_id):
            return error(400, "invalid_request", "req_id is 1-128 letters, digits, '_', '-', '.' or ':'", "req_id")
        state = await worker.cancel(req_id)
        if state == "not_found":
            return error(404, "not_found", f"no worker has request {req_id} queued or running (it finished, "
                         "expired, or never came); nothing was cancelled")
        return JSONResponse({"req_id": req_id, "state": state, "cancelled": state in ("running", "queued")},
                            status_code=202 if state == "pending" else 200)

    async def no_route(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return JSONResponse({"error": error_fields(exc.status_code, type_, f"{exc.detail}: {request.method} "
                                                   f"{request.url.path[:200]}")},
                            status_code=exc.status_code, headers=exc.headers)

    guards = [Middleware(TraceHeader), Middleware(CatchAll, worker=worker)]
    if keyed:
        guards.append(Middleware(BearerAuth, key=s.api_key, unauthorized=unauthorized))
    announce(worker, closed)
    return Starlette(exception_handlers={HTTPException: no_route}, middleware=guards, routes=[
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/logs", mutating(logs)),
        Route("/grammars", list_grammars, methods=["GET"]),
        Route("/grammars", mutating(create_grammar), methods=["POST"]),
        Route("/grammars/{name}", read_grammar, methods=["GET"]),
        Route("/grammars/{name}", mutating(write_grammar), methods=["PUT", "DELETE"]),
        Route("/v1/requests/{req_id}", mutating(cancel), methods=["DELETE"]),
        *openai_routes(worker),
    ])


class GrammarBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    gbnf: str | None = None
    grammar: str | None = None  # the same as gbnf


class TraceHeader:
    """ASGI middleware: every answer to a request that carried a trace id (`Fleet-Trace-Id` or a W3C
    `traceparent`) carries it back in `Fleet-Trace-Id`, errors and streams included; a malformed one is a 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            trace = p.trace_id(Headers(scope=scope)) if scope["type"] == "http" else None
        except p.BadRequest as e:
            await refusal(e)(scope, receive, send)
            return
        if trace is None:
            await self.app(scope, receive, send)
            return

        async def traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(p.H_TRACE_ID, trace)
            await send(message)

        await self.app(scope, receive, traced)


class CatchAll:
    """ASGI middleware: no plain-text 500. An exception no route expected is answered with the contract's 500 body
    and logged once with its traceback; after the response has started (a stream) it can only be ended."""

    def __init__(self, app: ASGIApp, worker: Serving) -> None:
        self.app, self.worker = app, worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            return  # the caller left while sending its body: nobody to answer
        except Exception as e:
            body = internal_error(self.worker, e, f"{scope['method']} {scope['path'][:200]}")
            if not started:
                await JSONResponse({"error": body}, status_code=500)(scope, receive, send)


def unauthorized() -> Response:
    response = error(401, "authentication_error", "this worker needs its API key: send 'Authorization: Bearer "
                     "<API_KEY>' (the openai client's api_key)")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def announce(worker: Serving, closed: str | None) -> None:
    """One line at start-up (and an event) when a key guards the API or when its mutating routes are closed."""
    s = worker.settings
    if closed:
        log.warning("%s: %s", s.model_name, closed)
        worker.store.event("http.closed", closed, level="warning", addr=s.http_addr)
    elif s.api_key.get_secret_value():
        msg = f"HTTP API on {s.http_addr} needs the API key on every route but {', '.join(sorted(OPEN_PATHS))}"
        log.info("%s: %s", s.model_name, msg)
        worker.store.event("http.auth", msg, addr=s.http_addr)


class Server(uvicorn.Server):
    """uvicorn inside the worker's event loop; the worker owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse in the contract's JSON instead of plain
    text: 431 for headers past h11's limit (16 KB), 400 for anything else that is not HTTP/1.1."""

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > MAX_HEADER_BYTES:
            status, type_, message = 431, "headers_too_large", (
                f"the request headers are larger than {MAX_HEADER_BYTES} bytes; send smaller ones")
        else:
            status, type_, message = 400, "invalid_http", "the request is not valid HTTP/1.1"
        body = json.dumps({"error": error_fields(status, type_, message)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def server(app: Starlette, host: str, port: int) -> Server:
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 lifespan="off", http=Protocol,
                                 h11_max_incomplete_event_size=MAX_HEADER_BYTES))
