"""The worker's HTTP side: `/metrics`, `/healthz`, `/readyz` (the HTTP API issue extends this app)."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .metrics import Metrics


def build_app(metrics: Metrics, status: Callable[[], str]) -> Starlette:
    async def metrics_endpoint(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": status()})

    async def readyz(_: Request) -> Response:
        current = status()
        return JSONResponse({"status": current}, status_code=200 if current == "online" else 503)

    return Starlette(routes=[
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ])


class Server(uvicorn.Server):
    """uvicorn inside the worker's event loop; the worker owns the signals, not uvicorn."""

    def capture_signals(self):  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()


def server(app: Starlette, host: str, port: int) -> Server:
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 lifespan="off"))
