"""`python -m gateway`: the OpenAI-compatible API for the whole fleet on GATEWAY_ADDR (default 127.0.0.1:8000)."""

from __future__ import annotations

import asyncio
import sys

from monitor.feed import login_refused
from workers import tracing
from workers.access import is_loopback
from workers.httpkit import listen
from workers.logsetup import setup_logging
from workers.settings import redact

from .config import ConfigError, GatewaySettings, load_settings


def preflight(settings: GatewaySettings) -> None:
    """Read the files the settings name (API keys, the roles) now, so that a bad one stops the gateway with one line
    (ConfigError) before it listens. (WEBHOOK_SECRET_FILE is read with the settings themselves.)"""
    from .clients import load_keys
    from .routing import load_roles

    if settings.gateway_keys_file:
        load_keys(settings.gateway_keys_file)
    load_roles(settings.gateway_roles_file)


def exposure_warning(settings: GatewaySettings) -> str | None:
    """The one start-up line for a gateway other machines can reach without API keys (GATEWAY_KEYS_FILE): anyone
    who reaches it can run every model in the fleet."""
    host, port = settings.host_port
    if is_loopback(host) or settings.gateway_keys_file:
        return None
    return (f"warning: the gateway listens on {host}:{port}, beyond this machine, without API keys: anyone who can "
            f"reach it can use every model of the fleet; put it behind a proxy that checks them, or set "
            f"GATEWAY_ADDR=127.0.0.1:{port}")


def serve(settings: GatewaySettings) -> int:
    import uvicorn

    from .app import create_app

    host, port = settings.host_port
    try:
        sock = listen(host, port)
    except OSError as e:
        print(f"error: cannot listen on GATEWAY_ADDR={settings.gateway_addr} ({e.strerror}); stop what holds it or "
              "set GATEWAY_ADDR=127.0.0.1:8001", file=sys.stderr)
        return 1
    if refused := asyncio.run(login_refused(settings.discovery())):
        print(f"error: {refused}", file=sys.stderr)
        return 1
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"gateway: OpenAI API on http://{shown}:{port}/v1 · NATS {redact(settings.nats_url)}", flush=True)
    if warning := exposure_warning(settings):
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(settings), log_level="warning", timeout_graceful_shutdown=5, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv:
        print("usage: python -m gateway (settings come from the environment: GATEWAY_ADDR, NATS_URL, …)",
              file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    setup_logging()
    try:
        settings = load_settings()
        preflight(settings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tracing.setup("fleet-gateway")  # only with OTEL_EXPORTER_OTLP_ENDPOINT
    try:
        return serve(settings)
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()  # the spans still batched go out


if __name__ == "__main__":
    sys.exit(main())
