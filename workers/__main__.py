"""`python -m workers <name>` or `python -m workers --env envs/worker.<name>.env`: run one worker."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import tracing
from .config import ConfigError, available_workers, load_settings
from .connection import NatsUnavailable
from .logsetup import setup_logging
from .worker import StartupError, Worker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fleet-worker", description="Run one model worker in the foreground.")
    ap.add_argument("name", nargs="?", help=f"worker name from envs/ ({', '.join(available_workers())})")
    ap.add_argument("--env", help="path to an env file instead of envs/worker.<name>.env")
    args = ap.parse_args(argv)
    if not args.name and not args.env:
        ap.error("give a worker name or --env FILE")
    setup_logging()
    try:
        settings = load_settings(args.name, args.env)
        tracing.setup(f"fleet-worker-{settings.model_name}")  # only with OTEL_EXPORTER_OTLP_ENDPOINT
        asyncio.run(Worker(settings).run())
    except (ConfigError, StartupError, NatsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()  # the spans still batched go out
    return 0


if __name__ == "__main__":
    sys.exit(main())
