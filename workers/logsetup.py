"""Operator output through `logging`: one line per message on stderr, verbosity from LOG_LEVEL, format from
LOG_FORMAT.

Each entry point calls `setup_logging()` once; modules log with `logging.getLogger(__name__)`. The default format
(`text`) is the message alone, so a start-up failure stays the one line a user can act on (`error: …`), not a
record dump. `LOG_FORMAT=json` makes every line one JSON object for a log collector: `ts`, `level`, `logger`,
`message`, and whatever the call gave with `extra=` (`req_id`, `trace_id`, `model`, `latency_ms`, …). The
per-request lines (the worker's `workers.requests`, the gateway's `gateway.access`) are written in JSON only: the
text output stays what it was.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "setup_logging"]

# Libraries that narrate their own internals at INFO; their warnings still show.
_QUIET = ("asyncio", "nats", "aiosqlite", "httpx", "httpcore", "huggingface_hub", "urllib3", "uvicorn.access",
          "sse_starlette", "filelock")
# One line per request: for log collectors (LOG_FORMAT=json), not for a terminal.
PER_REQUEST = ("workers.requests", "gateway.access")
FORMATS = ("text", "json")
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601 with ms), level, logger, message, the `extra=` fields (null
    when not known), and `exc` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Log to stderr at `level` (default: LOG_LEVEL, else INFO), one line per message, as `fmt` (default:
    LOG_FORMAT, else text)."""
    wanted = level or os.environ.get("LOG_LEVEL") or "INFO"
    numeric = logging.getLevelName(wanted.strip().upper())
    known = isinstance(numeric, int)
    if not known:
        numeric = logging.INFO
    shape = (fmt or os.environ.get("LOG_FORMAT") or "text").strip().lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if shape == "json" else logging.Formatter("%(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    for name in PER_REQUEST:
        logging.getLogger(name).setLevel(numeric if shape == "json" else logging.WARNING)
    if not known:
        logging.getLogger(__name__).warning("LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR); using INFO",
                                            wanted)
    if shape not in FORMATS:
        logging.getLogger(__name__).warning("LOG_FORMAT=%s is not a format (text, json); using text", shape)
