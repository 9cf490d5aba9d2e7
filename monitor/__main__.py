"""`python -m monitor` (web: dashboard, REST, SSE on MONITOR_ADDR) or `python -m monitor tui [--once]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from workers.access import is_loopback
from workers.httpkit import listen
from workers.logsetup import setup_logging
from workers.settings import redact

from .config import ConfigError, MonitorSettings, load_settings
from .feed import login_refused


def exposure_warning(settings: MonitorSettings) -> str | None:
    """The one start-up line for a monitor other machines can reach without a token (it still starts: it only reads)."""
    host, port = settings.host_port
    if settings.monitor_token or is_loopback(host):
        return None
    return (f"warning: the monitor listens on {host}:{port}, beyond this machine, without MONITOR_TOKEN: anyone who "
            "can reach it sees the fleet's models, workers and queues; set MONITOR_TOKEN or "
            f"MONITOR_ADDR=127.0.0.1:{port}")


def serve(settings: MonitorSettings) -> int:
    import uvicorn

    from .web import create_app

    host, port = settings.host_port
    try:
        sock = listen(host, port)
    except OSError as e:
        print(f"error: cannot listen on MONITOR_ADDR={settings.monitor_addr} ({e.strerror}); "
              "stop what holds it or set MONITOR_ADDR=127.0.0.1:9000", file=sys.stderr)
        return 1
    if refused := asyncio.run(login_refused(settings)):
        print(f"error: {refused}", file=sys.stderr)
        return 1
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"monitor: dashboard on http://{shown}:{port}/ · NATS {redact(settings.nats_url)}"
          + (" · token required" if settings.monitor_token else ""), flush=True)
    if warning := exposure_warning(settings):
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(settings), log_level="warning", timeout_graceful_shutdown=2,
                            access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="monitor", description="Watch the worker fleet: web dashboard or terminal.")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("web", help="dashboard, REST and SSE on MONITOR_ADDR (the default)")
    t = sub.add_parser("tui", help="live table in the terminal (q quits)")
    t.add_argument("--once", action="store_true", help="print one snapshot and exit")
    t.add_argument("--sort", default="m", choices=["m", "s", "i", "d", "l", "r", "t"],
                   help="initial sort key: model, status, instances, depth, level, req/s, last seen")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.cmd == "tui":
            from . import tui

            return tui.once(settings) if args.once else asyncio.run(tui.live(settings, args.sort))
        return serve(settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
