"""The gateway's ASGI app: the OpenAI routes (routes.py), `/v1/models` from discovery, and the health checks.

Discovery is the monitor's own: its Feed (heartbeats, backpressure reports, `$SRV.PING` sweeps) fills a Registry in
this process, and the Feed's NATS connection carries the requests too. `/v1/models` lists every model the registry
holds (an offline one until PURGE_AFTER: `status` and `instances` say so); `/health` is 200 while NATS is
connected, `/health/ready` 200 once at least one model has an online worker (503 otherwise, for orchestrators).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from monitor.feed import Feed
from monitor.registry import Registry
from monitor.shapes import ServiceEntry

from .cache import ResponseCache
from .clients import Clients
from .config import GatewaySettings
from .fleet import Fleet
from .jobs import job_routes
from .metrics import GatewayMetrics
from .routes import Parts, routes
from .routing import Router


def model_card(entry: ServiceEntry, router: Router) -> dict[str, Any]:
    """One model as `/v1/models` lists it: OpenAI's fields, then the fleet's (`breaker`: this gateway's circuit
    breaker for the model, closed / open / half_open)."""
    name = entry.model_name
    return {"id": name, "object": "model", "created": int(entry.first_seen), "owned_by": "fleet",
            "kind": entry.kind, "instances": entry.online_count, "context_length": entry.model_info.get("context_size"),
            "capabilities": entry.capabilities, "roles": router.roles_of(name), "status": entry.status,
            "breaker": router.breaker_state(name), "model_info": entry.model_info}


def ready_models(registry: Registry) -> list[str]:
    """The models with at least one online worker."""
    return [e.model_name for e in registry.services() if any(i.status == "online" for i in e.instances)]


def create_app(settings: GatewaySettings) -> Starlette:
    """The ASGI app; its lifespan connects to NATS in the background (requests get 503 until it is up)."""
    registry = Registry(settings.discovery())
    feed = Feed(registry, registry.settings, requests=False)  # one event per request it sends: not needed here
    fleet = Fleet(feed, registry)
    metrics = GatewayMetrics()
    parts = Parts(fleet, settings, Router(registry, settings), ResponseCache(settings, lambda: feed.nc),
                  Clients(settings, metrics), metrics)

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(e, parts.router)
                                                        for e in registry.services()]})

    async def health(_: Request) -> Response:
        ok = registry.nats_connected
        return JSONResponse({"status": "ok" if ok else "degraded", "nats_connected": ok},
                            status_code=200 if ok else 503)

    async def ready(_: Request) -> Response:
        names = ready_models(registry) if registry.nats_connected else []
        return JSONResponse({"status": "ready" if names else "not_ready", "nats_connected": registry.nats_connected,
                             "models": names}, status_code=200 if names else 503)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with feed.running():
            yield

    app = Starlette(routes=[
        *routes(parts),
        *job_routes(parts),
        *parts.metrics.routes(),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.registry, app.state.fleet, app.state.parts = registry, fleet, parts
    return app
