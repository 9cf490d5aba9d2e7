"""The monitor's HTTP side (Starlette): REST, server-sent events, Prometheus gauges and the dashboard.

Read-only by design: no endpoint changes a worker. `GET /api/requests?model=&status=&limit=` lists the last
finished requests, newest first; `GET /api/history` every model's chart samples. With MONITOR_TOKEN set,
everything but /healthz asks for the token, as `Authorization: Bearer <token>` or the cookie the login form sets;
wrong tokens are answered ever more slowly per client address (throttle.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .config import MonitorSettings
from .feed import Feed
from .metrics import render_metrics
from .registry import Registry
from .shapes import Healthz
from .throttle import Throttle, client_key

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
COOKIE = "fleet_monitor"
# Wire strings are only ever set as text by app.js; the policy is a second wall should that ever slip.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
WRONG = "That token is not right."
SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

Handler = Callable[[Request], Awaitable[Response]]


def create_app(settings: MonitorSettings, registry: Registry | None = None, *, feed: bool = True) -> Starlette:
    """The ASGI app; its lifespan connects to NATS in the background, so the page is up even while NATS is not.

    With `feed=False` nothing connects: the app serves `registry` as whoever holds it feeds it (the fast tests).
    """
    reg = registry or Registry(settings)
    source = Feed(reg, settings) if feed else None
    session = hmac.new(settings.monitor_token.encode(), b"fleet-monitor-session", hashlib.sha256).hexdigest()

    throttle = Throttle(settings.monitor_login_delay, settings.monitor_login_delay_max)

    def has_session(request: Request) -> bool:
        return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session.encode())

    async def check_token(request: Request, given: str) -> tuple[int, int]:
        """(200, 0) for the right token; (401, 0) for a wrong one, answered after its address's delay; (429, s)
        while that address still waits out its last one: not checked at all, `s` seconds to go."""
        addr = client_key(request.client.host if request.client else None)
        if wait := throttle.blocked(addr):
            return 429, math.ceil(wait)
        if hmac.compare_digest(given.encode(), settings.monitor_token.encode()):
            throttle.succeeded(addr)
            return 200, 0
        await asyncio.sleep(throttle.failed(addr))
        return 401, 0

    def guarded(handler: Handler, page: bool = False) -> Handler:
        async def guard(request: Request) -> Response:
            if not settings.monitor_token or has_session(request):
                return await handler(request)
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                status, wait = await check_token(request, bearer[7:].strip())
                if status == 200:
                    return await handler(request)
                if status == 429:
                    return JSONResponse({"error": f"too many wrong tokens from this address; try again in {wait} s"},
                                        status_code=429, headers={"Retry-After": str(wait)})
            if page:
                return login_page(status=401)
            return JSONResponse({"error": "this monitor needs its token: send 'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return guard

    async def dashboard(_: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_bytes(), headers={**SECURITY, "Content-Security-Policy": CSP})

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=SECURITY)

    async def login(request: Request) -> Response:
        form = await _form(request)
        if form is None:
            return login_page(status=413, note="That form is too large.")
        given = (form.get("token") or [""])[0]
        if not settings.monitor_token:
            return login_page(status=401, note=WRONG)
        status, wait = await check_token(request, given)
        if status == 429:
            return login_page(status=429, note=f"Too many wrong tokens from here: wait {wait} s and try again.",
                              headers={"Retry-After": str(wait)})
        if status != 200:
            return login_page(status=401, note=WRONG)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return resp

    async def services(_: Request) -> Response:
        return JSONResponse([s.model_dump(mode="json") for s in reg.services()], headers=SECURITY)

    async def service(request: Request) -> Response:
        model = request.path_params["model"]
        entry = reg.service(model)
        if entry is None:
            known = ", ".join(reg.models) or "none yet"
            return JSONResponse({"error": f"no model named {model!r} is known; known: {known}"}, status_code=404)
        return JSONResponse(entry.model_dump(mode="json"), headers=SECURITY)

    async def requests(request: Request) -> Response:
        q = request.query_params
        limit = q.get("limit", str(settings.monitor_requests_max))
        if not limit.isdigit() or int(limit) < 1:
            return JSONResponse({"error": "limit is a whole number of 1 or more (the monitor keeps the last "
                                 f"{settings.monitor_requests_max}, MONITOR_REQUESTS_MAX)"}, status_code=400,
                                headers=SECURITY)
        found = reg.requests.select(q.get("model") or None, q.get("status") or None, int(limit))
        return JSONResponse([r.model_dump(mode="json") for r in found], headers=SECURITY)

    async def history(_: Request) -> Response:
        return JSONResponse({name: h.model_dump(mode="json") for name, h in reg.history().items()}, headers=SECURITY)

    async def events(_: Request) -> Response:
        return EventSourceResponse(_stream(reg), ping=settings.monitor_sse_ping, send_timeout=10,
                                   headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def metrics(_: Request) -> Response:
        return Response(render_metrics(reg), media_type="text/plain; version=0.0.4")

    async def healthz(_: Request) -> Response:
        ok = reg.nats_connected
        body = Healthz(status="ok" if ok else "degraded", nats_connected=ok, **reg.stats().model_dump())
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if source is None:
            yield
            return
        async with source.running():
            yield

    app = Starlette(routes=[
        Route("/", guarded(dashboard, page=True)),
        Route("/static/{name}", guarded(asset, page=True)),
        Route("/login", login, methods=["POST"]),
        Route("/api/services", guarded(services)),
        Route("/api/services/{model}", guarded(service)),
        Route("/api/requests", guarded(requests)),
        Route("/api/history", guarded(history)),
        Route("/api/events", guarded(events)),
        Route("/metrics", guarded(metrics)),
        Route("/healthz", healthz),
    ], lifespan=lifespan)
    app.state.registry, app.state.feed = reg, source
    return app


async def _stream(reg: Registry) -> AsyncIterator[dict[str, Any]]:
    """A snapshot, then every event; the listener goes away with the connection (or when it falls behind)."""
    lst = reg.listen()
    try:
        # json.dumps of the dump rather than model_dump_json: the same bytes as ever (separators, float repr)
        snapshot = reg.snapshot()
        yield {"event": snapshot.event, "data": json.dumps(snapshot.model_dump(mode="json")), "retry": 2000}
        while not lst.dropped:
            try:
                event = await asyncio.wait_for(lst.queue.get(), timeout=1.0)
            except TimeoutError:
                continue
            yield {"event": event.event, "data": json.dumps(event.model_dump(mode="json"))}
    finally:
        reg.unlisten(lst)


async def _form(request: Request, limit: int = 4096) -> dict[str, list[str]] | None:
    """The login form, read no further than `limit` bytes (None beyond: a token is never that long)."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            return None
    return parse_qs(data.decode(errors="replace"))


def login_page(status: int = 200, note: str = "", headers: dict[str, str] | None = None) -> HTMLResponse:
    note = f'<p class="bad">{html.escape(note)}</p>' if note else ""
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Fleet monitor: sign in</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>
body{{font:15px system-ui,sans-serif;background:#0f1420;color:#e6e9ef;display:grid;place-items:center;height:100vh;
margin:0}}form{{background:#171e2e;padding:28px 32px;border-radius:10px;border:1px solid #263048;min-width:300px}}
h1{{font-size:18px;margin:0 0 14px}}input{{width:100%;box-sizing:border-box;padding:9px;border-radius:6px;
border:1px solid #33405c;background:#0f1420;color:inherit;margin:6px 0 14px}}button{{padding:8px 16px;
border-radius:6px;border:0;background:#3b82f6;color:#fff;font-weight:600}}.bad{{color:#f87171}}</style></head>
<body><form method="post" action="/login"><h1>Fleet monitor</h1>{note}<label for="token">Monitor token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></body></html>"""
    return HTMLResponse(page, status_code=status,
                        headers={**SECURITY, "Content-Security-Policy": LOGIN_CSP, **(headers or {})})
