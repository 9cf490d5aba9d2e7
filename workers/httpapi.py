"""The worker's HTTP app: operations (`/metrics`, `/healthz`, `/readyz`, `/logs`, `/grammars`, cancel)
plus the OpenAI-compatible routes from `openai_api`, behind the access rules of `access`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import protocol as p
from .access import OPEN_PATHS, BearerAuth, exposure
from .openai_api import error
from .openai_api import routes as openai_routes
from .store import read_recent
from .surface import Serving

PROMPT_COLUMNS = ("raw_input", "formatted_input", "response_text")
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

    async def gbnf_of(request: Request) -> tuple[str | None, str]:
        raw = (await request.body()).decode(errors="replace")
        with contextlib.suppress(ValueError):
            body = json.loads(raw)
            if isinstance(body, dict):
                return body.get("name"), str(body.get("gbnf") or body.get("grammar") or "")
        return None, raw

    async def create_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name, text = await gbnf_of(request)
        if not name:
            return error(400, "invalid_request", 'send {"name": "...", "gbnf": "root ::= ..."}')
        try:
            grammars.writable(name)
            if grammars.get(name) is not None:
                return error(409, "exists", f"grammar {name} exists; PUT /grammars/{name} replaces it")
            grammars.put(name, text)
        except p.BadRequest as e:
            return error(e.status, e.type, e.message)
        return JSONResponse({"name": name, "gbnf": text}, status_code=201)

    async def read_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name = request.path_params["name"]
        text = grammars.get(name)
        if text is None:
            return error(404, "not_found", f"no grammar named {name}")
        return JSONResponse({"name": name, "gbnf": text})

    async def write_grammar(request: Request) -> Response:
        if (grammars := worker.grammars) is None:
            return no_grammars()
        name = request.path_params["name"]
        try:
            if request.method == "PUT":
                _, text = await gbnf_of(request)
                replaced = grammars.put(name, text)
                return JSONResponse({"name": name, "gbnf": text}, status_code=200 if replaced else 201)
            if grammars.delete(name):
                return Response(status_code=204)
            return error(404, "not_found", f"no stored grammar named {name}")
        except p.BadRequest as e:
            return error(e.status, e.type, e.message)

    async def cancel(request: Request) -> Response:
        req_id = request.path_params["req_id"]
        state = await worker.cancel(req_id)
        return JSONResponse({"req_id": req_id, "state": state, "cancelled": state == "running"},
                            status_code=200 if state == "running" else 202)

    announce(worker, closed)
    return Starlette(routes=[
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
    ], middleware=[Middleware(BearerAuth, key=s.api_key, unauthorized=unauthorized)] if keyed else [])


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


def server(app: Starlette, host: str, port: int) -> Server:
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 lifespan="off"))
