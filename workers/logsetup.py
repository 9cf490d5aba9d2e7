"""Operator output through `logging`: one plain line per message on stderr, verbosity from LOG_LEVEL.

Each entry point calls `setup_logging()` once; modules log with `logging.getLogger(__name__)`. The format is the
message alone, so a start-up failure stays the one line a user can act on (`error: …`), not a record dump.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

# Libraries that narrate their own internals at INFO; their warnings still show.
_QUIET = ("asyncio", "nats", "aiosqlite", "httpx", "httpcore", "huggingface_hub", "urllib3", "uvicorn.access",
          "sse_starlette", "filelock")


def setup_logging(level: str | None = None) -> None:
    """Log to stderr at `level` (default: LOG_LEVEL, else INFO), one line per message."""
    wanted = level or os.environ.get("LOG_LEVEL") or "INFO"
    numeric = logging.getLevelName(wanted.strip().upper())
    known = isinstance(numeric, int)
    if not known:
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    if not known:
        logging.getLogger(__name__).warning("LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR); using INFO",
                                            wanted)
